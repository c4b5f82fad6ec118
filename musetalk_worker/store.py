"""Per-source-frame data kept on disk between the two passes of a job.

The first pass computes, for each source frame, its face box, VAE latents and
blend mask; the second pass needs them (and the frame itself) again in
ping-pong order, possibly many times. Keeping them in memory would grow with
the length of the source, so they go to one append-only scratch file and are
read back with positioned reads (no memory map, so they never count as the
process's resident memory). Only a small index stays in memory.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import List, Optional

import numpy as np
import torch

from .boxes import Box
from .masks import BlendMask

LATENT_SHAPE = (8, 32, 32)
_LATENT_BYTES = int(np.prod(LATENT_SHAPE)) * 4


@dataclasses.dataclass(frozen=True)
class _Entry:
    frame_offset: int
    box: Optional[Box]
    latent_offset: int = -1
    mask_offset: int = -1


class SourceStore:
    """Frames, boxes, latents and masks of one source, in a scratch file.

    A frame without a face has no box, latent or mask.
    """

    def __init__(self, path: Path, height: int, width: int):
        self.path = Path(path)
        self.height, self.width = height, width
        self._frame_bytes = height * width * 3
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._size = 0
        self._entries: List[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def faces(self) -> int:
        """Number of frames with a face."""
        return sum(e.box is not None for e in self._entries)

    def add(self, frame: np.ndarray, mask: Optional[BlendMask] = None, latent: Optional[torch.Tensor] = None) -> None:
        """Stores one source frame, with its blend mask and latents when it has a face."""
        frame_offset = self._append(np.ascontiguousarray(frame, np.uint8).tobytes())
        if mask is None:
            self._entries.append(_Entry(frame_offset, None))
            return
        latent_offset = self._append(latent.to(torch.float32).contiguous().numpy().tobytes())
        mask_offset = self._append(np.ascontiguousarray(mask.alpha, np.uint8).tobytes())
        self._entries.append(_Entry(frame_offset, tuple(mask.box), latent_offset, mask_offset))

    def box(self, index: int) -> Optional[Box]:
        """The face box (extra margin applied) of a source frame, or None."""
        return self._entries[index].box

    def frame(self, index: int) -> np.ndarray:
        """The BGR source frame."""
        data = self._read(self._entries[index].frame_offset, self._frame_bytes)
        return np.frombuffer(data, np.uint8).reshape(self.height, self.width, 3).copy()

    def latent(self, index: int) -> torch.Tensor:
        """The [8, 32, 32] latents of a frame with a face."""
        data = self._read(self._entries[index].latent_offset, _LATENT_BYTES)
        return torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(LATENT_SHAPE)

    def mask(self, index: int) -> BlendMask:
        """The blend mask of a frame with a face."""
        entry = self._entries[index]
        x1, y1, x2, y2 = entry.box
        data = self._read(entry.mask_offset, (y2 - y1) * (x2 - x1))
        return BlendMask(entry.box, np.frombuffer(data, np.uint8).reshape(y2 - y1, x2 - x1))

    def close(self) -> None:
        """Closes and deletes the scratch file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.path.unlink(missing_ok=True)

    def _append(self, data: bytes) -> int:
        offset = self._size
        written = os.pwrite(self._fd, data, offset)
        if written != len(data):
            raise OSError(f"short write to {self.path}: {written} of {len(data)} bytes (disk full?)")
        self._size += written
        return offset

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read from {self.path} at {offset}")
        return data
