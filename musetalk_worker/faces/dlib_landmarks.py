"""The ``dlib`` face back-end: dlib's HOG face detector + its 68-point shape predictor.

Runs on the CPU with no OpenMMLab, for machines where mmcv cannot be built.
The 68-point model (``shape_predictor_68_face_landmarks.dat``, shipped by
``face_recognition_models``) was trained on iBUG 300-W, whose licence excludes
commercial use.

Speed: the HOG detector's cost grows with the pixel count, so large frames are
searched on a copy whose shorter side is ``detect_short_side`` pixels; that
still finds faces down to about a sixth of the frame's shorter side. A frame
where that finds nothing is searched again at full size (upsampled once when
the first search was already at full size), so smaller faces are found at the
price of a slower miss.
The landmarks are always fitted on the full-size frame.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any, Sequence

import cv2
import numpy as np

from ..errors import ErrorCode, LipSyncError
from . import FaceDetection

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install dlib-bin and face_recognition_models (requirements/worker.txt)"
_PREDICTOR_FILE = Path("models") / "shape_predictor_68_face_landmarks.dat"


def shape_predictor_path() -> Path:
    """Where ``face_recognition_models`` keeps the 68-point model (found without importing it)."""
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"the dlib face back-end needs the package face_recognition_models: {_INSTALL_HINT}",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _PREDICTOR_FILE
    if not path.is_file():
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"{path} is missing from face_recognition_models: reinstall it ({_INSTALL_HINT})",
        )
    return path


class DlibAnalyzer:
    """dlib face detection + 68 landmarks; one face per frame, the largest."""

    name = "dlib"
    # Shorter side of the copy searched first; HOG finds faces of 80 px and up in it.
    detect_short_side = 480

    def __init__(self, detector: Any, predictor: Any):
        self._dlib = _import_dlib()
        self.detector = detector
        self.predictor = predictor

    @classmethod
    def load(cls) -> "DlibAnalyzer":
        """Build the detector and load the shape predictor from ``face_recognition_models``."""
        dlib = _import_dlib()
        path = shape_predictor_path()
        logger.info("loading dlib shape predictor %s", path)
        return cls(dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))

    def detect(self, frames: Sequence[np.ndarray]) -> list[FaceDetection | None]:
        """Batch of BGR uint8 frames -> one result per frame, None where no face."""
        return [self._detect_one(frame) for frame in frames]

    def _detect_one(self, frame: np.ndarray) -> FaceDetection | None:
        # Grayscale: both dlib models work on intensity, and HOG is faster on one channel.
        gray = cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)
        height, width = gray.shape
        box = self._find_largest(gray)
        if box is None:
            return None
        x1, y1, x2, y2 = box
        shape = self.predictor(gray, self._dlib.rectangle(*(int(round(v)) for v in (x1, y1, x2 - 1, y2 - 1))))
        landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float32)
        detector_box = (
            max(0, int(x1)),
            max(0, int(y1)),
            min(width, int(x2)),
            min(height, int(y2)),
        )
        return FaceDetection(landmarks=landmarks, detector_box=detector_box)

    def _find_largest(self, gray: np.ndarray) -> tuple[float, float, float, float] | None:
        """The largest face as (x1, y1, x2, y2) in full-size pixels, x2/y2 exclusive."""
        short_side = min(gray.shape)
        scale = min(1.0, self.detect_short_side / short_side)
        # The retry is at full size; a frame already searched at full size is upsampled once instead.
        attempts = ((scale, 0), (1.0, 1 if scale == 1.0 else 0))
        for scale, upsample in attempts:
            image = gray if scale == 1.0 else cv2.resize(gray, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            rects = self.detector(image, upsample)
            if len(rects):
                rect = max(rects, key=lambda r: r.width() * r.height())
                # dlib's right/bottom are inclusive.
                return (rect.left() / scale, rect.top() / scale, (rect.right() + 1) / scale, (rect.bottom() + 1) / scale)
        return None


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as e:
        raise LipSyncError(
            ErrorCode.MODELS_MISSING, f"the dlib face back-end needs dlib, which does not import: {_INSTALL_HINT}"
        ) from e
    return dlib
