"""The prepare pass: face box, crop latents, blend mask and alignment points of each source frame, into a store.

Preparation runs batch by batch on demand (:meth:`Preparation.ensure`), so the
generate pass can start as soon as the frames of its first batch are ready
instead of after the whole source: a job's first output (and first streamed
segment) follows its first batches. The batches are the same whatever the
order of demands, so the prepared data, and the video, do not depend on it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ...batching import batched
from ...decode import MediaInfo, iter_video_frames, read_image
from ...errors import ErrorCode, LipSyncError
from ...faces import FaceAnalyzer
from ...options import MuseTalkOptions
from ...overlap import Prefetcher
from ...restoration.align import five_points
from ...timing import StageTimer
from . import boxes as box_math
from .latents import LatentEncoder, crop_face
from .masks import MaskMaker
from .store import SourceStore

Progress = Callable[[str, int, int], None]


class Preparation:
    """Prepares one source into ``store``, a batch at a time, as far as it is asked.

    ``limit`` is how many source frames may be prepared at most (the frames the
    output uses); None prepares the whole source (for the avatar cache). Use as
    a context manager: leaving it stops the decoder.
    """

    def __init__(
        self,
        info: MediaInfo,
        options: MuseTalkOptions,
        faces: FaceAnalyzer,
        vae: torch.nn.Module,
        mask_net: torch.nn.Module,
        pool: ThreadPoolExecutor,
        store: SourceStore,
        limit: Optional[int],
        timer: StageTimer,
        report: Progress,
    ):
        self.store = store
        self._options = options
        self._faces = faces
        self._latents = LatentEncoder(vae)
        self._masks = MaskMaker(mask_net, options.parsing_mode, options.left_cheek_width,
                                options.right_cheek_width, pool)
        self._pool = pool
        self._timer = timer
        self._report = report
        if info.kind == "video":
            frames: Iterator[np.ndarray] = iter_video_frames(info, max_frames=limit)
            self._expected = min(limit or info.estimated_frames, info.estimated_frames or limit or 1)
        else:
            frames = iter([read_image(info.path)])
            self._expected = 1
        # The next batch decodes while this one is on the models.
        self._decoded = Prefetcher(batched(timer.timed_iter("decode", frames), options.batch_size), depth=1)
        self._batches: Optional[Iterator[List[np.ndarray]]] = None
        self.done = False

    def __enter__(self) -> "Preparation":
        self._decoded.__enter__()
        self._batches = iter(self._decoded)
        self._report("prepare", 0, self._expected)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._decoded.__exit__(exc_type, exc, tb)

    def ensure(self, count: int) -> None:
        """Prepares batches until the store holds ``count`` frames or the source is used up."""
        while not self.done and len(self.store) < count:
            batch = next(self._batches, None)
            if batch is None:
                self.done = True
                break
            self._prepare_batch(batch)
            self._report("prepare", len(self.store), max(self._expected, len(self.store)))

    def finish(self) -> None:
        """Prepares what is left, then checks that some frame has a face.

        Raises:
            LipSyncError(no_face): no prepared frame has a face.
        """
        while not self.done:
            self.ensure(len(self.store) + 1)
        if self.store.faces == 0:
            raise LipSyncError(
                ErrorCode.NO_FACE,
                f"no face was found in any of the {len(self.store)} source frames used; send a video or image "
                "with one clearly visible, roughly frontal face.",
                stage="prepare",
            )

    def _prepare_batch(self, batch: List[np.ndarray]) -> None:
        """Face boxes, latents, blend masks and alignment points of one batch of source frames, appended to the store."""
        timer = self._timer
        with timer("faces"):
            face_boxes, points = self._face_boxes(batch, len(self.store))
        with_face = [i for i, b in enumerate(face_boxes) if b is not None]
        prepared = {}
        if with_face:
            frames, boxes = [batch[i] for i in with_face], [face_boxes[i] for i in with_face]
            with timer("latents"):
                latents = self._latents.encode(list(self._pool.map(crop_face, frames, boxes)))
            with timer("masks"):
                made = self._masks.make(frames, boxes)
            prepared = dict(zip(with_face, zip(made, latents)))
        for i, frame in enumerate(batch):
            mask, latent = prepared.get(i, (None, None))
            self.store.add(frame, mask, latent, points[i] if mask is not None else None)

    def _face_boxes(self, frames: List[np.ndarray], first: int
                    ) -> Tuple[List[Optional[box_math.Box]], List[Optional[np.ndarray]]]:
        """Face boxes (extra margin applied) of a batch of frames, None where there is no face, and the
        five alignment points of each detected face (None for given boxes: they come without landmarks)."""
        options = self._options
        height, width = frames[0].shape[:2]
        if options.boxes is not None:
            found = [_given_box(options.boxes, first + i, width, height) for i in range(len(frames))]
            points: List[Optional[np.ndarray]] = [None] * len(frames)
        else:
            detections = self._faces.detect(frames)
            found = [
                None if d is None else box_math.face_box(d.landmarks, d.detector_box, options.bbox_shift)
                for d in detections
            ]
            points = [None if d is None else five_points(d.landmarks) for d in detections]
        result = []
        for box in found:
            if box is not None:
                box = box_math.with_margin(box, options.extra_margin, height)
                x1, y1, x2, y2 = box_math.clip_box(box, width, height)
                # A box with no pixels inside the frame cannot be cropped: treat as no face.
                box = box if x2 > x1 and y2 > y1 else None
            result.append(box)
        return result, points


class Prepared:
    """A source already prepared in full (an avatar cache hit): nothing left to do."""

    done = True

    def __init__(self, store: SourceStore):
        self.store = store

    def __enter__(self) -> "Prepared":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass

    def ensure(self, count: int) -> None:
        """Nothing to prepare."""

    def finish(self) -> None:
        """Nothing to prepare (a cached entry always has a face)."""


def _given_box(boxes: Sequence[box_math.Box], index: int, width: int, height: int) -> box_math.Box:
    if len(boxes) == 1:
        box = boxes[0]
    elif index < len(boxes):
        box = boxes[index]
    else:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'boxes' has {len(boxes)} entries but the source has more frames; give one box per frame or a single box.",
            stage="prepare",
        )
    x1, y1, x2, y2 = box
    if x2 > width or y2 > height:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"box {list(box)} reaches outside the {width}x{height} source; boxes must lie inside the frame.",
            stage="prepare",
        )
    return tuple(box)

