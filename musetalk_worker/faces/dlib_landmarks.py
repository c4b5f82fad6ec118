"""The ``dlib`` face back-end: dlib's HOG face detector + its 68-point shape predictor.

Runs on the CPU with no OpenMMLab, for machines where mmcv cannot be built.
The 68-point model (``shape_predictor_68_face_landmarks.dat``, shipped by
``face_recognition_models``) was trained on iBUG 300-W, whose licence excludes
commercial use.

Speed: the HOG detector's cost grows with the pixel count, so frames larger
than 720p are searched first on a copy whose shorter side is
``detect_short_side`` pixels (faces down to a ninth of that side), and again
at full size only when that finds nothing. Frames under half that size are
searched again upsampled once, for faces under HOG's 80 px window. The
landmarks are always fitted on the full-size frame.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
    # Frames up to 720p are searched at full size: a box found on a smaller copy
    # and scaled back moves the landmark fit by several pixels.
    detect_short_side = 720

    def __init__(self, detector: Any, predictor: Any):
        self._dlib = _import_dlib()
        self.detector = detector
        self.predictor = predictor

    @classmethod
    def load(cls) -> DlibAnalyzer:
        """Build the detector and load the shape predictor from ``face_recognition_models``."""
        dlib = _import_dlib()
        path = shape_predictor_path()
        logger.info("loading dlib shape predictor %s", path)
        return cls(dlib.get_frontal_face_detector(), dlib.shape_predictor(str(path)))

    def detect(self, frames: Sequence[np.ndarray]) -> list[FaceDetection | None]:
        """Batch of BGR uint8 frames -> one result per frame, None where no face."""
        return [self._detect_one(frame) for frame in frames]

    def _detect_one(self, frame: np.ndarray) -> FaceDetection | None:
        # RGB, as dlib's own tools feed these models: the shape predictor's fit
        # moves by up to 10 px on a grayscale copy of the same frame.
        rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
        height, width = rgb.shape[:2]
        rect = self._find_largest(rgb)
        if rect is None:
            return None
        landmarks = np.array([(p.x, p.y) for p in self.predictor(rgb, rect).parts()], dtype=np.float32)
        # dlib's rectangle as it is (its right/bottom are the last pixels inside), clipped to the frame.
        detector_box = (
            max(0, rect.left()),
            max(0, rect.top()),
            min(width, rect.right()),
            min(height, rect.bottom()),
        )
        return FaceDetection(landmarks=landmarks, detector_box=detector_box)

    def _find_largest(self, rgb: np.ndarray) -> Any:
        """The largest face as a dlib rectangle in full-size pixels, or None."""
        short_side = min(rgb.shape[:2])
        first = min(1.0, self.detect_short_side / short_side)
        attempts = [(first, 0)]
        if first < 1.0:
            attempts.append((1.0, 0))
        elif short_side < self.detect_short_side / 2:
            # Only in small frames can a usable face be under HOG's 80 px window.
            attempts.append((1.0, 1))
        for scale, upsample in attempts:
            image = rgb if scale == 1.0 else cv2.resize(rgb, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
            rects = self.detector(image, upsample)
            if len(rects):
                rect = max(rects, key=lambda r: r.area())
                if scale == 1.0:
                    return rect
                corners = (rect.left(), rect.top(), rect.right(), rect.bottom())
                return self._dlib.rectangle(*(round(v / scale) for v in corners))
        return None


def _import_dlib() -> Any:
    try:
        import dlib
    except ImportError as e:
        raise LipSyncError(
            ErrorCode.MODELS_MISSING, f"the dlib face back-end needs dlib, which does not import: {_INSTALL_HINT}"
        ) from e
    return dlib
