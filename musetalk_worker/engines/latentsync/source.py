"""A LatentSync job's source: its 25 fps frames with their face alignment, prepared in order as the output
needs them, and kept as an avatar cache entry.

Frames go to a file (in the job's scratch, or in the cache entry being made);
only their alignment matrices (24 bytes each) and GFPGAN's five points stay in
memory. Output frame ``i`` is source frame ``i`` until the source is used up,
then the output runs backwards and forwards over it (ping-pong).

A wholly prepared source saved with :meth:`AlignedSource.save` (the frames
file and ``aligned.json``: the matrices, the points and a CRC-32 of the frames)
opens again with :meth:`AlignedSource.open`: nothing is decoded or detected.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Dict, Generator, List, Optional

import numpy as np
import torch

from ...avatar_cache import CorruptEntryError, file_crc32
from ...decode import MediaInfo, iter_video_frames, read_image
from ...errors import ErrorCode, LipSyncError
from ...faces import FaceAnalyzer
from ...frame_spill import FrameSpill
from ...restoration.align import AlignmentTrack, five_points
from ...timing import StageTimer
from .align import FaceAligner, points_from_68

FPS = Fraction(25)
FRAMES_FILE = "frames.bin"
INDEX_FILE = "aligned.json"
# Bump when what an entry holds, or how it is computed, changes.
_FORMAT = 1


class CorruptSourceError(CorruptEntryError):
    """A saved source whose index or frames do not check out."""


class AlignedSource:
    """The source's frames (RGB) with their alignment: prepared as they are needed (:meth:`prepare`), or all
    at once from an avatar cache entry (:meth:`open`). ``meta`` is saved with the entry."""

    BATCH = 8  # frames per face-detector call

    def __init__(self, frames: FrameSpill, matrices: List[Optional[torch.Tensor]],
                 points: List[Optional[np.ndarray]], meta: Dict[str, Any],
                 decoded: Optional[Generator[np.ndarray, None, None]] = None, faces: Optional[FaceAnalyzer] = None,
                 aligner: Optional[FaceAligner] = None, timer: Optional[StageTimer] = None):
        self._frames, self._matrices, self._points, self.meta = frames, matrices, points, meta
        self._decoded, self._faces, self._aligner, self._timer = decoded, faces, aligner, timer
        self.from_cache = False
        # GFPGAN's smoothed alignment over the five points (None without a face).
        self.track = AlignmentTrack(lambda i: self._points[i], lambda: len(self))

    @classmethod
    def prepare(cls, info: MediaInfo, faces: FaceAnalyzer, aligner: FaceAligner, folder: Path,
                timer: StageTimer) -> "AlignedSource":
        """A source to prepare from ``info`` as output frames ask for it, its frames written into ``folder``."""
        # A generator both ways, so an early end can close the decoder.
        decoded = iter_video_frames(info, fps=FPS) if info.kind == "video" else (f for f in [read_image(info.path)])
        frames = FrameSpill(Path(folder) / FRAMES_FILE, info.height, info.width)
        return cls(frames, [], [], {}, decoded, faces, aligner, timer)

    @classmethod
    def open(cls, folder: Path) -> "AlignedSource":
        """The source saved in ``folder`` by :meth:`save`, its frames checked against the saved CRC.

        Raises:
            CorruptSourceError: the index is unreadable, or the frames changed or do not match it.
        """
        folder = Path(folder)
        try:
            index = json.loads((folder / INDEX_FILE).read_text())
            if index["format"] != _FORMAT:
                raise CorruptSourceError(f"{folder} has source format {index['format']}, not {_FORMAT}")
            matrices = [None if m is None else torch.tensor(m, dtype=torch.float32).reshape(2, 3)
                        for m in index["matrices"]]
            points = [None if p is None else np.array(p, np.float64).reshape(5, 2) for p in index["points"]]
            if file_crc32(folder / FRAMES_FILE) != index["crc32"]:
                raise CorruptSourceError(f"{folder}: the frames do not match their index (truncated or changed)")
            frames = FrameSpill.open(folder / FRAMES_FILE, int(index["height"]), int(index["width"]))
            meta = dict(index["meta"])
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as error:
            raise CorruptSourceError(f"{folder}: unreadable prepared source ({error})") from error
        if not len(frames) == len(matrices) == len(points):
            frames.close(delete=False)
            raise CorruptSourceError(f"{folder}: {len(frames)} frames for {len(matrices)} alignments")
        source = cls(frames, matrices, points, meta)
        source.from_cache = True
        return source

    def save(self) -> None:
        """Writes the index beside the frames (and ``meta``), so the source can be opened again.

        Raises:
            RuntimeError: the source is not prepared to its end (:meth:`finish` first).
        """
        if self._decoded is not None:
            raise RuntimeError("only a wholly prepared source can be saved: call finish() first")
        self._frames.sync()
        index = {
            "format": _FORMAT, "height": self.height, "width": self.width, "crc32": file_crc32(self._frames.path),
            "meta": self.meta,
            "matrices": [None if m is None else m.reshape(-1).tolist() for m in self._matrices],
            "points": [None if p is None else np.asarray(p, np.float64).reshape(-1).tolist() for p in self._points],
        }
        (self.folder / INDEX_FILE).write_text(json.dumps(index))

    @property
    def folder(self) -> Path:
        """The folder the frames are in (an avatar cache entry's name is its avatar id)."""
        return self._frames.path.parent

    @property
    def height(self) -> int:
        return self._frames.shape[0]

    @property
    def width(self) -> int:
        return self._frames.shape[1]

    @property
    def faces(self) -> int:
        """Prepared frames with a face."""
        return sum(m is not None for m in self._matrices)

    def __len__(self) -> int:
        return len(self._frames)

    def __getitem__(self, index: int) -> np.ndarray:
        return self._frames[index]

    def matrix(self, index: int) -> Optional[torch.Tensor]:
        """Source frame ``index``'s (2, 3) alignment matrix, or None when it has no face."""
        return self._matrices[index]

    def ensure(self, index: int) -> None:
        """Prepares source frames up to ``index`` (or the source's end)."""
        while self._decoded is not None and len(self) <= index:
            self._prepare_batch()

    def finish(self) -> None:
        """Prepares the rest of the source (what an avatar cache entry keeps)."""
        while self._decoded is not None:
            self._prepare_batch()

    def output_source(self, index: int) -> int:
        """The source frame of output frame ``index``, preparing source frames up to it when needed."""
        self.ensure(index)
        if len(self) == 0:
            raise LipSyncError(ErrorCode.UNSUPPORTED_MEDIA, "the source video has no frames to decode.",
                               stage="decode")
        count = len(self)
        if self._decoded is not None or index < count:
            return index
        k = index % (2 * count)
        return k if k < count else 2 * count - 1 - k

    def close(self, delete: bool = True) -> None:
        """Stops the decoder, closes the frames file and deletes it unless ``delete`` is False."""
        if self._decoded is not None:
            self._decoded.close()
            self._decoded = None
        self._frames.close(delete=delete)

    def _prepare_batch(self) -> None:
        with self._timer("decode"):
            batch = [frame for _, frame in zip(range(self.BATCH), self._decoded)]
        if len(batch) < self.BATCH:
            self._decoded.close()
            self._decoded = None
        if not batch:
            return
        with self._timer("faces"):
            detections = self._faces.detect(batch)
        for frame, detection in zip(batch, detections):
            index = self._frames.append(frame[..., ::-1])
            if detection is None:
                self._matrices.append(None)
                self._points.append(None)
                continue
            self._matrices.append(self._aligner.fit(points_from_68(detection.landmarks), index))
            self._points.append(five_points(detection.landmarks))
