"""The face stage: per frame, the 68 face landmarks and a face detector's box.

Two back-ends share one interface (:class:`FaceAnalyzer`):

- ``dwpose``: upstream MuseTalk's method, S3FD for the face box and DWPose
  (RTMPose-L whole-body, through mmpose) for the landmarks. Needs the
  OpenMMLab stack and two weight files.
- ``dlib``: dlib's HOG face detector and its 68-point shape predictor (shipped by
  ``face_recognition_models``). Needs no OpenMMLab and runs on CPU; the
  68-point model was trained on iBUG 300-W, whose licence excludes commercial
  use.

Nothing heavy is imported here: a back-end's libraries load when it is chosen.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ..errors import ErrorCode, LipSyncError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

BACKENDS = ("dwpose", "dlib", "auto")

# Weight files of the dwpose back-end, relative to the models folder.
DWPOSE_WEIGHTS = Path("dwpose") / "dw-ll_ucoco_384.pth"
S3FD_WEIGHTS = Path("s3fd") / "s3fd-619a316812.pth"

OPENMMLAB_HINT = (
    "install the OpenMMLab stack with scripts/setup.sh (mmcv 2.1.0 built by "
    "scripts/build_mmcv.sh, then requirements/openmmlab.txt, xtcocotools and "
    "mmpose 1.3.2 + mmdet 3.3.0 with --no-deps), or use face_backend 'dlib'"
)


@dataclasses.dataclass(frozen=True)
class FaceDetection:
    """One frame's face: 68 landmarks (iBUG order, float, x/y in pixels) and the detector's box."""

    landmarks: np.ndarray  # shape (68, 2), float32
    detector_box: tuple[int, int, int, int]  # (x1, y1, x2, y2), ints, clipped at 0 from below


class FaceAnalyzer(Protocol):
    """Finds one face per frame. ``name`` is ``"dwpose"`` or ``"dlib"``."""

    name: str

    def detect(self, frames: Sequence[np.ndarray]) -> list[FaceDetection | None]:
        """Batch of BGR uint8 frames (all the same size) -> one result per frame, None where no face."""
        ...


def load_face_analyzer(
    backend: str, models_dir: Path, device: torch.device | str = "cpu"
) -> FaceAnalyzer:
    """Build the face analyzer for ``backend``: ``"dwpose"``, ``"dlib"`` or ``"auto"``.

    ``auto`` picks ``dwpose`` when mmpose imports and ``models_dir`` holds both
    of its weight files, else ``dlib``. ``device`` is used by ``dwpose`` only
    (dlib runs on the CPU).

    Raises:
        LipSyncError: ``MODELS_MISSING`` when the chosen back-end's libraries or
            weights are not installed (the message says what to install), and
            ``INVALID_INPUT`` for an unknown back-end name.
    """
    models_dir = Path(models_dir)
    if backend not in BACKENDS:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"unknown face back-end {backend!r}: use one of {', '.join(BACKENDS)}",
        )
    if backend == "auto":
        backend = _auto_backend(models_dir)
        logger.info("face back-end 'auto' chose %r", backend)
    if backend == "dwpose":
        _require_files(models_dir, (S3FD_WEIGHTS, DWPOSE_WEIGHTS))
        if not _mmpose_importable():
            raise LipSyncError(
                ErrorCode.MODELS_MISSING,
                f"the dwpose face back-end needs mmpose, which does not import here: {OPENMMLAB_HINT}",
            )
        from .dwpose import DWPoseAnalyzer

        return DWPoseAnalyzer.from_files(
            s3fd_path=models_dir / S3FD_WEIGHTS,
            dwpose_path=models_dir / DWPOSE_WEIGHTS,
            device=device,
        )
    from .dlib_landmarks import DlibAnalyzer

    return DlibAnalyzer.load()


def _auto_backend(models_dir: Path) -> str:
    missing = [str(p) for p in (S3FD_WEIGHTS, DWPOSE_WEIGHTS) if not (models_dir / p).is_file()]
    if missing:
        logger.info("dwpose weights not in %s (%s): using dlib", models_dir, ", ".join(missing))
        return "dlib"
    if not _mmpose_importable():
        return "dlib"
    return "dwpose"


def _require_files(models_dir: Path, relative_paths: Sequence[Path]) -> None:
    missing = [str(models_dir / p) for p in relative_paths if not (models_dir / p).is_file()]
    if missing:
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            "the dwpose face back-end needs weights that are missing: "
            + ", ".join(missing)
            + " (the weights downloader fetches them at build time; or use face_backend 'dlib')",
        )


def _mmpose_importable() -> bool:
    if importlib.util.find_spec("mmpose") is None:
        logger.info("mmpose is not installed")
        return False
    try:
        import mmpose.apis  # noqa: F401
    # mmcv/mmdet/mmpose check each other's versions with assert at import time.
    except (ImportError, AssertionError) as e:
        logger.warning("mmpose is installed but does not import: %s", e)
        return False
    return True
