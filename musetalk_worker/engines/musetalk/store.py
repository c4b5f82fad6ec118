"""Per-source-frame data kept on disk between the two passes of a job.

The first pass computes, for each source frame, its face box, VAE latents,
blend mask and the five alignment points of face restoration; the second pass needs them (and the frame itself) again in
ping-pong order, possibly many times. Keeping them in memory would grow with
the length of the source, so they go to one append-only data file and are
read back with positioned reads (no memory map, so they never count as the
process's resident memory). Only a small index stays in memory.

A finished store can be saved as a folder (data file + ``index.json`` with a
CRC-32 of the data) and opened again later: that is an avatar cache entry.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ...avatar_cache import CorruptEntryError, file_crc32
from .boxes import Box
from .masks import BlendMask

LATENT_SHAPE = (8, 32, 32)
_LATENT_BYTES = int(np.prod(LATENT_SHAPE)) * 4
DATA_FILE = "source.bin"
INDEX_FILE = "index.json"
# 2: entries carry the five alignment points (face restoration).
_FORMAT = 2


class CorruptStoreError(CorruptEntryError):
    """A saved store whose index or data do not check out."""


@dataclasses.dataclass(frozen=True)
class _Entry:
    frame_offset: int
    box: Optional[Box]
    latent_offset: int = -1
    mask_offset: int = -1
    # The five points (x1, y1, ..., x5, y5) of restoration.align.five_points; None without landmarks.
    points: Optional[Tuple[float, ...]] = None


class SourceStore:
    """Frames, boxes, latents, masks and alignment points of one source, in a scratch file.

    A frame without a face has no box, latent or mask; one whose box was given
    (not detected) has no points either. ``meta`` is a small
    JSON-serialisable dict saved with the index (what the source was).
    """

    def __init__(self, folder: Path, height: int, width: int):
        """Starts an empty store in ``folder`` (which must exist)."""
        self.folder = Path(folder)
        self.height, self.width = height, width
        self._frame_bytes = height * width * 3
        self._fd = os.open(self.folder / DATA_FILE, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._size = 0
        self._entries: List[_Entry] = []
        self.meta: Dict[str, Any] = {}

    @classmethod
    def open(cls, folder: Path) -> "SourceStore":
        """Opens a store saved with :meth:`save_index`, checking its data against the saved CRC.

        Raises:
            CorruptStoreError: the index is unreadable or the data changed.
        """
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            if index["format"] != _FORMAT:
                raise CorruptStoreError(f"{folder} has store format {index['format']}, not {_FORMAT}")
            entries = [_Entry(e[0], None if e[1] is None else tuple(e[1]), e[2], e[3],
                              None if e[4] is None else tuple(float(v) for v in e[4])) for e in index["entries"]]
            store = cls.__new__(cls)
            store.folder, store.height, store.width = folder, int(index["height"]), int(index["width"])
            store._frame_bytes = store.height * store.width * 3
            store.meta = dict(index.get("meta", {}))
            store._fd = os.open(folder / DATA_FILE, os.O_RDONLY)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as error:
            raise CorruptStoreError(f"{folder}: unreadable store ({error})") from error
        store._size = os.fstat(store._fd).st_size
        store._entries = entries
        if store._size != index["size"] or store._crc32() != index["crc32"]:
            store.close(delete=False)
            raise CorruptStoreError(f"{folder}: data does not match its index (truncated or changed)")
        return store

    def save_index(self) -> None:
        """Writes ``index.json`` beside the data (with ``meta``) so the store can be opened again."""
        os.fsync(self._fd)
        index = {
            "format": _FORMAT, "height": self.height, "width": self.width, "size": self._size,
            "crc32": self._crc32(), "meta": self.meta,
            "entries": [[e.frame_offset, e.box, e.latent_offset, e.mask_offset, e.points] for e in self._entries],
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def faces(self) -> int:
        """Number of frames with a face."""
        return sum(e.box is not None for e in self._entries)

    def add(self, frame: np.ndarray, mask: Optional[BlendMask] = None, latent: Optional[torch.Tensor] = None,
            points: Optional[np.ndarray] = None) -> None:
        """Stores one source frame, with its blend mask, latents and five alignment points when it has a face."""
        frame_offset = self._append(np.ascontiguousarray(frame, np.uint8).tobytes())
        if mask is None:
            self._entries.append(_Entry(frame_offset, None))
            return
        latent_offset = self._append(latent.to(torch.float32).contiguous().numpy().tobytes())
        mask_offset = self._append(np.ascontiguousarray(mask.alpha, np.uint8).tobytes())
        kept = None if points is None else tuple(float(v) for v in np.asarray(points, np.float64).ravel())
        self._entries.append(_Entry(frame_offset, tuple(mask.box), latent_offset, mask_offset, kept))

    def box(self, index: int) -> Optional[Box]:
        """The face box (extra margin applied) of a source frame, or None."""
        return self._entries[index].box

    def points(self, index: int) -> Optional[np.ndarray]:
        """The five alignment points (5, 2) of a frame with detected landmarks, else None."""
        points = self._entries[index].points
        return None if points is None else np.array(points, np.float64).reshape(5, 2)

    def frame(self, index: int) -> np.ndarray:
        """The BGR source frame."""
        data = self._read(self._entries[index].frame_offset, self._frame_bytes)
        return np.frombuffer(data, np.uint8).reshape(self.height, self.width, 3).copy()

    def pixels(self, index: int, box: Box) -> np.ndarray:
        """The BGR pixels of a source frame inside ``box`` (which must lie inside the frame).

        Reads only the rows the box spans, so blending need not read whole frames.
        """
        x1, y1, x2, y2 = box
        row = self.width * 3
        data = self._read(self._entries[index].frame_offset + y1 * row, (y2 - y1) * row)
        return np.frombuffer(data, np.uint8).reshape(y2 - y1, self.width, 3)[:, x1:x2].copy()

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

    def close(self, delete: bool = True) -> None:
        """Closes the data file, and deletes it unless ``delete`` is False."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            (self.folder / DATA_FILE).unlink(missing_ok=True)

    def _crc32(self) -> int:
        return file_crc32(self.folder / DATA_FILE)

    def _append(self, data: bytes) -> int:
        offset = self._size
        written = os.pwrite(self._fd, data, offset)
        if written != len(data):
            raise OSError(f"short write to {self.folder / DATA_FILE}: {written} of {len(data)} bytes (disk full?)")
        self._size += written
        return offset

    def _read(self, offset: int, size: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise OSError(f"short read from {self.folder / DATA_FILE} at {offset}")
        return data
