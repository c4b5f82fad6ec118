"""The ``dwpose`` face back-end, upstream MuseTalk's method: S3FD boxes + DWPose landmarks.

DWPose is RTMPose-L whole-body (133 keypoints) run through mmpose on the whole
frame; keypoints 23..90 are the 68 face landmarks in iBUG order. A frame has a
face only when S3FD finds one (upstream ignores the landmarks otherwise), so
DWPose runs only on those frames.

Upstream calls mmpose's ``inference_topdown`` one frame at a time, its slowest
stage. Here each frame goes through the same test pipeline and the whole batch
through one ``model.test_step``, which is what ``inference_topdown`` does for
several boxes of one image; the keypoints are the same.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ErrorCode, LipSyncError
from . import FaceDetection
from .s3fd import S3FDDetector

logger = logging.getLogger(__name__)

CONFIG_PATH = Path(__file__).resolve().with_name("dwpose_config.py")
# The 68 face points among the 133 whole-body keypoints.
FACE_KEYPOINTS = slice(23, 91)
# The COCO-WholeBody keypoint metadata (names, flip pairs) inside the mmpose package.
_WHOLEBODY_META = Path(".mim") / "configs" / "_base_" / "datasets" / "coco_wholebody.py"


def build_pose_model(checkpoint: Path | None = None, device: torch.device | str = "cpu") -> Any:
    """DWPose as an mmpose ``TopdownPoseEstimator`` in eval mode, from our config.

    ``checkpoint``: a DWPose checkpoint (``{"state_dict": ..., "meta": ...}`` or a
    bare state dict); None keeps the random initial weights (for tests).
    """
    import mmpose
    from mmpose.apis import init_model

    # init_model takes the keypoint metadata (names, flip pairs for the flip
    # test) from the training set's config; point it at COCO-WholeBody's, by an
    # absolute path since mmpose would look relative to the working directory first.
    wholebody = Path(mmpose.__file__).parent / _WHOLEBODY_META
    options = {"train_dataloader.dataset.metainfo.from_file": str(wholebody)}
    model = init_model(str(CONFIG_PATH), None, device=str(device), cfg_options=options)
    if checkpoint is not None:
        state_dict, dataset_meta = _read_checkpoint(checkpoint)
        _load_weights(model, state_dict, checkpoint)
        # As mmpose does: the checkpoint's own metadata wins.
        if dataset_meta:
            model.dataset_meta = dataset_meta
    return model


def _read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    # The checkpoint's metadata holds numpy objects, which torch >= 2.6 refuses
    # under weights_only=True. The file is trusted: the weights downloader
    # checks its SHA-256 against the lock.
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state_dict = checkpoint.get("state_dict", checkpoint)
    # Checkpoints saved from a wrapped (distributed) model carry this prefix.
    state_dict = {key.removeprefix("module."): value for key, value in state_dict.items()}
    meta = checkpoint.get("meta") or {}
    return state_dict, meta.get("dataset_meta")


def _load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    def wrong_file(why: str) -> LipSyncError:
        return LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"{path} is not a DWPose RTMPose-L whole-body checkpoint ({why}); "
            "get dw-ll_ucoco_384.pth as pinned in the weights lock",
        )

    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as e:  # shapes that do not fit
        raise wrong_file(str(e).splitlines()[0]) from e
    # BatchNorm's step counters are unused in inference; anything else missing
    # would leave random weights in the model.
    missing = [key for key in result.missing_keys if not key.endswith("num_batches_tracked")]
    if missing:
        raise wrong_file(f"{len(missing)} weights missing, e.g. {', '.join(missing[:3])}")
    if result.unexpected_keys:
        logger.warning("%s: ignored %d unexpected weights (e.g. %s)", path, len(result.unexpected_keys),
                       ", ".join(result.unexpected_keys[:3]))


class DWPoseLandmarks:
    """Batched DWPose: frames -> the 68 face keypoints of the whole-frame pose."""

    # Frames per test_step: the crops are 288x384 whatever the frame size.
    max_batch = 32

    def __init__(self, model: Any):
        from mmengine.dataset import Compose
        from mmengine.registry import init_default_scope

        self.model = model
        init_default_scope(model.cfg.get("default_scope", "mmpose"))
        self._pipeline = Compose(model.cfg.test_dataloader.dataset.pipeline)

    def __call__(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        """BGR uint8 frames -> face landmarks [N, 68, 2] float32 in frame pixels."""
        if not len(frames):
            return np.zeros((0, 68, 2), dtype=np.float32)
        chunks = [self._run(frames[start : start + self.max_batch]) for start in range(0, len(frames), self.max_batch)]
        return np.concatenate(chunks)

    def _run(self, frames: Sequence[np.ndarray]) -> np.ndarray:
        from mmengine.dataset import pseudo_collate

        samples = []
        for frame in frames:
            height, width = frame.shape[:2]
            sample = dict(
                img=frame,
                bbox=np.array([[0, 0, width, height]], dtype=np.float32),
                bbox_score=np.ones(1, dtype=np.float32),
            )
            sample.update(self.model.dataset_meta)
            samples.append(self._pipeline(sample))
        with torch.inference_mode():
            results = self.model.test_step(pseudo_collate(samples))
        return np.stack([r.pred_instances.keypoints[0, FACE_KEYPOINTS] for r in results]).astype(np.float32)


class DWPoseAnalyzer:
    """S3FD face boxes + DWPose face landmarks, both batched."""

    name = "dwpose"

    def __init__(self, detector: S3FDDetector, landmarks: DWPoseLandmarks):
        self.detector = detector
        self.landmarks = landmarks

    @classmethod
    def from_files(cls, s3fd_path: Path, dwpose_path: Path, device: torch.device | str = "cpu") -> DWPoseAnalyzer:
        """Load S3FD and DWPose weights onto ``device``."""
        logger.info("loading S3FD %s and DWPose %s on %s", s3fd_path, dwpose_path, device)
        return cls(S3FDDetector.from_file(s3fd_path, device), DWPoseLandmarks(build_pose_model(dwpose_path, device)))

    def detect(self, frames: Sequence[np.ndarray]) -> list[FaceDetection | None]:
        """Batch of BGR uint8 frames (all the same size) -> one result per frame, None where no face."""
        boxes = self.detector.detect(frames)
        with_face = [i for i, box in enumerate(boxes) if box is not None]
        landmarks = self.landmarks([frames[i] for i in with_face])
        results: list[FaceDetection | None] = [None] * len(frames)
        for i, points in zip(with_face, landmarks, strict=True):
            results[i] = FaceDetection(landmarks=points, detector_box=boxes[i])
        return results
