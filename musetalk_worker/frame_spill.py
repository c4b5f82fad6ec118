"""Decoded frames kept in a scratch file, so an engine can come back to any of them in constant memory."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class FrameSpill:
    """An append-only file of equally sized uint8 frames, read back by index with positioned reads.

    Positioned reads (no memory map) keep the frames out of the process's
    resident memory however long the source is.
    """

    def __init__(self, path: Path, height: int, width: int):
        """Starts an empty file at ``path`` (replacing one there)."""
        self.path = Path(path)
        self.shape = (height, width, 3)
        self._bytes = height * width * 3
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self._count = 0

    @classmethod
    def open(cls, path: Path, height: int, width: int) -> "FrameSpill":
        """The frames of a file written before (read only; an avatar cache entry's).

        Raises:
            OSError: the file is missing, or its size is not a whole number of frames.
        """
        spill = cls.__new__(cls)
        spill.path, spill.shape, spill._bytes = Path(path), (height, width, 3), height * width * 3
        spill._fd = os.open(spill.path, os.O_RDONLY)
        size = os.fstat(spill._fd).st_size
        if spill._bytes == 0 or size % spill._bytes:
            spill.close(delete=False)
            raise OSError(f"{path} holds {size} bytes, not whole {height}x{width} frames")
        spill._count = size // spill._bytes
        return spill

    def __len__(self) -> int:
        return self._count

    def append(self, frame: np.ndarray) -> int:
        """Stores ``frame`` (height, width, 3) and returns its index."""
        os.pwrite(self._fd, np.ascontiguousarray(frame, np.uint8).tobytes(), self._count * self._bytes)
        self._count += 1
        return self._count - 1

    def __getitem__(self, index: int) -> np.ndarray:
        data = os.pread(self._fd, self._bytes, index * self._bytes)
        return np.frombuffer(data, np.uint8).reshape(self.shape)

    def sync(self) -> None:
        """Flushes the frames to the disk (before the file is kept)."""
        os.fsync(self._fd)

    def close(self, delete: bool = True) -> None:
        """Closes the file, and deletes it unless ``delete`` is False."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if delete:
            self.path.unlink(missing_ok=True)
