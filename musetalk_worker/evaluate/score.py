"""Scoring a video: SyncNet's LSE-D / LSE-C / offset, and mouth-region PSNR / L1 against a reference.

The video is read at 25 fps (SyncNet's rate) twice: once for the face boxes
(the smoothing needs the whole track), once to crop and embed. Lip
embeddings are made as the crops arrive, so memory does not grow with the
length of the video.

Where this departs from the SyncNet pipeline: the boxes come from this
project's face stage (``dwpose``: S3FD's box as the original, but at full
resolution and one face per frame; ``dlib``: the HOG detector's tighter box),
there is no scene cut detection or multi-face tracking (one face per frame, so
the score assumes a single shot of one speaker), and the crops are not
re-encoded as an XVID .avi before scoring.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from ..batching import batched
from ..decode import MediaInfo, iter_video_frames, load_audio, probe
from ..errors import ErrorCode, LipSyncError
from ..faces import FaceAnalyzer
from ..engines.musetalk import boxes as box_math
from .crops import smoothed_tracks, syncnet_crop
from .mfcc import STEPS_PER_SECOND, mfcc
from .sync import VSHIFT, SyncScores, sync_scores
from .syncnet import SyncNet

FPS = Fraction(25)
WINDOW_FRAMES = 5
# 20 MFCC steps (0.2 s) per 5-frame window; windows start every 4 steps (one frame).
_MFCC_WINDOW = 20
_MFCC_PER_FRAME = STEPS_PER_SECOND // 25
_SAMPLES_PER_FRAME = 16000 // 25


@dataclasses.dataclass(frozen=True)
class ScoreOptions:
    """How to score: ``batch_size`` windows per SyncNet call, offsets searched in ``-vshift..+vshift``."""

    batch_size: int = 32
    face_batch: int = 8
    vshift: int = VSHIFT

    def __post_init__(self) -> None:
        for name in ("batch_size", "face_batch", "vshift"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class MouthMetrics:
    """Mouth-region (lower half of the MuseTalk face box) PSNR in dB and mean |difference| in 0..1."""

    psnr: float  # inf for identical regions
    l1: float
    frames: int

    def as_dict(self) -> dict:
        """JSON-ready: an infinite PSNR (identical regions) becomes None, which JSON can carry."""
        return {"psnr": None if math.isinf(self.psnr) else self.psnr, "l1": self.l1, "frames": self.frames}


class Scorer:
    """SyncNet and a face analyzer, loaded once; each call scores one video."""

    def __init__(self, syncnet: SyncNet, faces: FaceAnalyzer, options: ScoreOptions = ScoreOptions()):
        self.syncnet = syncnet
        self.faces = faces
        self.options = options
        self.device = next(syncnet.parameters()).device

    def sync(self, video: Path, audio: Optional[Path] = None) -> SyncScores:
        """LSE-D, LSE-C and offset of ``video``'s face against ``audio`` (default: the video's own sound).

        Raises:
            LipSyncError: unreadable media, no face in any frame, or fewer than 5 frames with audio.
        """
        info = _video_info(video)
        samples = load_audio(probe(Path(audio)) if audio is not None else info)
        tracks = self._tracks(info)
        usable = min(len(tracks), len(samples) // _SAMPLES_PER_FRAME)
        # The original scores min_length - 5 windows (one fewer than fit); kept for comparable numbers.
        windows = usable - WINDOW_FRAMES
        if windows < 1:
            raise LipSyncError(ErrorCode.INVALID_INPUT,
                               f"'{Path(video).name}' has {usable} frames with audio; SyncNet needs at least 6.",
                               stage="evaluate")
        coefficients = torch.from_numpy(mfcc(samples)).float()
        lips = self._lip_embeddings(info, tracks, windows)
        audio_embeddings = self._audio_embeddings(coefficients, windows)
        return sync_scores(lips, audio_embeddings, self.options.vshift)

    def mouth(self, video: Path, reference: Path) -> MouthMetrics:
        """PSNR and L1 of ``video``'s mouth region against ``reference``'s, frame by frame at 25 fps.

        The region is found on the reference (the footage the video re-synthesises); frames without a
        face there are left out.

        Raises:
            LipSyncError: the two videos differ in size, or no reference frame has a face.
        """
        ours, theirs = _video_info(video), _video_info(reference)
        if (ours.width, ours.height) != (theirs.width, theirs.height):
            raise LipSyncError(ErrorCode.INVALID_INPUT,
                               f"'{Path(video).name}' is {ours.width}x{ours.height} but the reference is "
                               f"{theirs.width}x{theirs.height}; compare videos of the same size.", stage="evaluate")
        squared = absolute = pixels = 0.0
        frames = 0
        pairs = zip(iter_video_frames(ours, fps=FPS), iter_video_frames(theirs, fps=FPS))
        for batch in batched(pairs, self.options.face_batch):
            for (made, real), found in zip(batch, self.faces.detect([real for _, real in batch])):
                if found is None:
                    continue
                x1, y1, x2, y2 = box_math.clip_box(box_math.face_box(found.landmarks, found.detector_box),
                                                   theirs.width, theirs.height)
                top = (y1 + y2) // 2
                if x2 <= x1 or y2 <= top:
                    continue
                diff = made[top:y2, x1:x2].astype(np.float64) - real[top:y2, x1:x2].astype(np.float64)
                squared += float(np.square(diff).sum())
                absolute += float(np.abs(diff).sum())
                pixels += diff.size
                frames += 1
        if frames == 0:
            raise LipSyncError(ErrorCode.NO_FACE, f"no frame of the reference '{Path(reference).name}' has a face.",
                               stage="evaluate")
        mse = squared / pixels
        psnr = math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)
        return MouthMetrics(psnr=psnr, l1=absolute / pixels / 255.0, frames=frames)

    def _tracks(self, info: MediaInfo) -> np.ndarray:
        boxes: List[Optional[Sequence[float]]] = []
        for batch in batched(iter_video_frames(info, fps=FPS), self.options.face_batch):
            boxes += [None if d is None else d.detector_box for d in self.faces.detect(batch)]
        if not any(b is not None for b in boxes):
            raise LipSyncError(ErrorCode.NO_FACE, f"no face was found in any frame of '{info.path.name}'.",
                               stage="evaluate")
        return smoothed_tracks(boxes)

    @torch.inference_mode()
    def _lip_embeddings(self, info: MediaInfo, tracks: np.ndarray, windows: int) -> torch.Tensor:
        crops = (syncnet_crop(frame, track) for frame, track in zip(iter_video_frames(info, fps=FPS), tracks))
        embeddings = []
        for batch in batched(_windows(crops, windows), self.options.batch_size):
            # [B, 5, H, W, 3] BGR -> [B, 3, 5, H, W], floats in 0..255 as SyncNet was trained.
            x = torch.from_numpy(np.stack(batch)).to(self.device).permute(0, 4, 1, 2, 3).float()
            embeddings.append(self.syncnet.embed_lips(x).cpu())
        return torch.cat(embeddings)

    @torch.inference_mode()
    def _audio_embeddings(self, coefficients: torch.Tensor, windows: int) -> torch.Tensor:
        embeddings = []
        for first in range(0, windows, self.options.batch_size):
            starts = range(first, min(windows, first + self.options.batch_size))
            x = torch.stack([coefficients[:, s * _MFCC_PER_FRAME: s * _MFCC_PER_FRAME + _MFCC_WINDOW] for s in starts])
            embeddings.append(self.syncnet.embed_audio(x.unsqueeze(1).to(self.device)).cpu())
        return torch.cat(embeddings)


def _video_info(path: Path) -> MediaInfo:
    info = probe(Path(path))
    if info.kind != "video":
        raise LipSyncError(ErrorCode.UNSUPPORTED_MEDIA, f"'{Path(path).name}' is not a video.", stage="evaluate")
    return info


def _windows(crops: Iterator[np.ndarray], count: int) -> Iterator[np.ndarray]:
    """The first ``count`` runs of 5 consecutive crops, [5, H, W, 3] each, holding only 5 crops at a time."""
    recent: List[np.ndarray] = []
    for crop in crops:
        recent = (recent + [crop])[-WINDOW_FRAMES:]
        if len(recent) == WINDOW_FRAMES:
            yield np.stack(recent)
            count -= 1
            if count == 0:
                return

