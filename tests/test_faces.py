"""The face stage: dlib on real media, S3FD and DWPose on small random-weight models."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import PARITY_ROOT

from musetalk_worker.errors import ErrorCode, LipSyncError
from musetalk_worker.faces import DWPOSE_WEIGHTS, S3FD_WEIGHTS, FaceDetection, load_face_analyzer
from musetalk_worker.faces.s3fd import S3FD, S3FDDetector, best_boxes, decode_boxes, level_priors


@pytest.fixture(scope="module")
def one_thread():
    # Two cores are shared by everything in CI: keep torch on one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def video_frame(media_dir: Path) -> np.ndarray:
    capture = cv2.VideoCapture(str(media_dir / "yongen.mp4"))
    ok, frame = capture.read()
    capture.release()
    assert ok, "could not decode a frame of yongen.mp4"
    return frame


@pytest.fixture(scope="module")
def still_image(media_dir: Path) -> np.ndarray:
    image = cv2.imread(str(media_dir / "yongen.jpeg"))
    assert image is not None
    return image


@pytest.fixture(scope="module")
def dlib_analyzer(tmp_path_factory):
    return load_face_analyzer("dlib", tmp_path_factory.mktemp("no-models"))


def _assert_plausible_face(found: FaceDetection | None, frame: np.ndarray) -> None:
    height, width = frame.shape[:2]
    assert isinstance(found, FaceDetection)
    assert found.landmarks.shape == (68, 2) and found.landmarks.dtype == np.float32
    x1, y1, x2, y2 = found.detector_box
    assert all(isinstance(v, int) for v in found.detector_box)
    assert 0 <= x1 < x2 <= width and 0 <= y1 < y2 <= height
    # A talking-head face: at least a sixth of the frame's shorter side.
    assert min(width, height) / 6 < x2 - x1
    # The landmarks lie on the detected face (the jaw may reach a little past a tight box).
    margin_x, margin_y = 0.25 * (x2 - x1), 0.25 * (y2 - y1)
    xs, ys = found.landmarks[:, 0], found.landmarks[:, 1]
    assert (xs > x1 - margin_x).all() and (xs < x2 + margin_x).all()
    assert (ys > y1 - margin_y).all() and (ys < y2 + margin_y).all()
    # iBUG order: nose tip (30) between the eyes' outer corners (36, 45) and above the chin (8).
    lm = found.landmarks
    assert lm[36, 0] < lm[30, 0] < lm[45, 0]
    assert lm[30, 1] < lm[8, 1]


# --- dlib -------------------------------------------------------------------------------------


def test_dlib_finds_the_face_in_a_video_frame_and_an_image(dlib_analyzer, video_frame, still_image):
    assert dlib_analyzer.name == "dlib"
    for frame in (video_frame, still_image):
        (found,) = dlib_analyzer.detect([frame])
        _assert_plausible_face(found, frame)


def test_dlib_reproduces_the_yongen_fixture_inputs(dlib_analyzer):
    # The v15-yongen parity fixture's landmarks and detector boxes came from dlib
    # (RGB, full size, no upsampling): the back-end must give the same numbers.
    path = PARITY_ROOT / "v15-yongen" / "parity.npz"
    if not path.is_file():
        pytest.skip(f"parity fixture not found at {path}")
    with np.load(path) as fixture:
        frames, landmarks, boxes = fixture["frames"][:4], fixture["landmarks"][:4], fixture["detector_boxes"][:4]
    found_all = dlib_analyzer.detect(list(frames))
    for found, want_landmarks, want_box in zip(found_all, landmarks, boxes, strict=True):
        np.testing.assert_array_equal(found.landmarks, want_landmarks)
        assert found.detector_box == tuple(int(v) for v in want_box)


def test_dlib_finds_a_small_face_by_retrying_upsampled(dlib_analyzer, video_frame):
    small = cv2.resize(video_frame, (128, 221), interpolation=cv2.INTER_AREA)
    # The face is ~45 px, under HOG's 80 px window: a plain search misses it ...
    assert not len(dlib_analyzer.detector(cv2.cvtColor(small, cv2.COLOR_BGR2RGB), 0))
    # ... and the upsampled retry finds it.
    (found,) = dlib_analyzer.detect([small])
    _assert_plausible_face(found, small)


def test_dlib_searches_large_frames_on_a_smaller_copy(dlib_analyzer, video_frame):
    wide = np.zeros((1080, 1920, 3), np.uint8)
    wide[:, 650 : 650 + 621] = cv2.resize(video_frame, (621, 1080), interpolation=cv2.INTER_AREA)
    assert min(wide.shape[:2]) > dlib_analyzer.detect_short_side
    (found,) = dlib_analyzer.detect([wide])
    _assert_plausible_face(found, wide)


def test_dlib_blank_frame_has_no_face(dlib_analyzer, video_frame):
    assert dlib_analyzer.detect([np.zeros_like(video_frame)]) == [None]


def test_dlib_batch_equals_single_frames(dlib_analyzer, video_frame):
    frames = [video_frame, np.zeros_like(video_frame), cv2.flip(video_frame, 1)]
    batch = dlib_analyzer.detect(frames)
    singles = [dlib_analyzer.detect([f])[0] for f in frames]
    assert batch[1] is None and singles[1] is None
    for got, want in zip(batch[::2], singles[::2], strict=True):
        assert got.detector_box == want.detector_box
        np.testing.assert_array_equal(got.landmarks, want.landmarks)


# --- S3FD -------------------------------------------------------------------------------------


def test_priors_and_box_decoding_by_hand():
    priors = level_priors(2, 3, stride=8)
    assert priors.shape == (6, 4)
    # Row 1, column 1 of a stride-8 level: centre (12, 12), anchor 4 * 8.
    torch.testing.assert_close(priors[4], torch.tensor([12.0, 12.0, 32.0, 32.0]))
    offsets = torch.tensor([1.0, -1.0, math.log(2) / 0.2, 0.0])
    # Centre moves by offset * 0.1 * 32; width doubles (exp(log 2)), height stays 32.
    want = torch.tensor([15.2 - 32, 8.8 - 16, 15.2 + 32, 8.8 + 16])
    torch.testing.assert_close(decode_boxes(offsets, priors[4]), want)
    # Batched shapes broadcast the same way.
    assert decode_boxes(torch.zeros(2, 6, 4), priors).shape == (2, 6, 4)


def _s3fd_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return S3FD().state_dict()


def _forced_face_state(face_logit: float, loc_bias=(1.0, 0.5, 0.0, 0.0)) -> dict[str, torch.Tensor]:
    """Random S3FD whose heads ignore the image: background everywhere except level 6 (stride 128)."""
    state = _s3fd_state()
    for key in state:
        if "_mbox_" in key and key.endswith(".weight"):
            state[key].zero_()
        elif "_mbox_conf" in key:  # biases: background logit 10, face logit 0 ...
            state[key].fill_(10.0)
            state[key][-1] = 0.0
        elif "_mbox_loc" in key:
            state[key].zero_()
    state["conv7_2_mbox_conf.bias"][:] = torch.tensor([0.0, face_logit])  # ... except here
    state["conv7_2_mbox_loc.bias"][:] = torch.tensor(loc_bias)
    return state


def _detector(state: dict[str, torch.Tensor]) -> S3FDDetector:
    net = S3FD()
    net.load_state_dict(state)
    return S3FDDetector(net)


def test_s3fd_random_weights_batch_runs(one_thread):
    rng = np.random.default_rng(0)
    frames = list(rng.integers(0, 256, (2, 96, 128, 3), dtype=np.uint8))
    detector = _detector(_s3fd_state())
    images = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    with torch.inference_mode():
        levels = detector.net(images)
    # Six levels at strides 4..128 (fc6's padding of 3 makes the later maps 4 wider).
    assert [tuple(logits.shape) for logits, _ in levels][:3] == [(2, 2, 24, 32), (2, 2, 12, 16), (2, 2, 6, 8)]
    assert all(loc.shape[1] == 4 and loc.shape[2:] == logits.shape[2:] for logits, loc in levels)
    scores, boxes = best_boxes(levels)
    assert scores.shape == (2,) and boxes.shape == (2, 4)
    results = detector.detect(frames)
    assert len(results) == 2
    for box in results:
        assert box is None or (len(box) == 4 and all(isinstance(v, int) and v >= 0 for v in box))


def test_s3fd_box_is_clipped_at_zero_and_truncated(one_thread):
    frames = [np.full((128, 128, 3), 90, np.uint8), np.zeros((128, 128, 3), np.uint8)]
    # Level 6's first anchor: centre (64, 64), side 512. The offsets move the centre by
    # (0.1 * 512, 0.05 * 512) -> (115.2, 89.6): box (-140.8, -166.4, 371.2, 345.6).
    boxes = _detector(_forced_face_state(face_logit=10.0)).detect(frames)
    assert boxes == [(0, 0, 371, 345), (0, 0, 371, 345)]


def test_s3fd_score_threshold_is_one_half(one_thread):
    frame = [np.zeros((128, 128, 3), np.uint8)]
    # Softmax of (0, +-0.1): a face score of 0.525 passes, 0.475 does not.
    assert _detector(_forced_face_state(face_logit=0.1)).detect(frame)[0] is not None
    assert _detector(_forced_face_state(face_logit=-0.1)).detect(frame) == [None]


def test_s3fd_weights_load_from_file(tmp_path):
    path = tmp_path / "s3fd.pth"
    torch.save(_s3fd_state(seed=1), path)
    detector = S3FDDetector.from_file(path)
    torch.testing.assert_close(detector.net.conv1_1.weight, _s3fd_state(seed=1)["conv1_1.weight"])


# --- DWPose (mmpose) ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, one_thread) -> Path:
    """A models folder with a seeded random DWPose checkpoint and an S3FD that always finds a face."""
    pytest.importorskip("mmpose.apis", reason="mmpose (OpenMMLab stack) is not installed", exc_type=ImportError)
    from musetalk_worker.faces.dwpose import build_pose_model

    models = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    model = build_pose_model(None)  # mmpose's init_model(our config, no checkpoint)
    assert model.dataset_meta["num_keypoints"] == 133
    # Like the real file: weights plus metadata holding numpy arrays (needs weights_only=False).
    checkpoint = {"state_dict": model.state_dict(), "meta": {"dataset_meta": model.dataset_meta}}
    (models / DWPOSE_WEIGHTS).parent.mkdir(parents=True)
    torch.save(checkpoint, models / DWPOSE_WEIGHTS)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(models / DWPOSE_WEIGHTS, weights_only=True)
    (models / S3FD_WEIGHTS).parent.mkdir(parents=True)
    torch.save(_forced_face_state(face_logit=10.0), models / S3FD_WEIGHTS)
    return models


@pytest.fixture(scope="module")
def dwpose_analyzer(tiny_models):
    return load_face_analyzer("dwpose", tiny_models, "cpu")


def test_dwpose_detects_with_boxes_from_s3fd(dwpose_analyzer):
    assert dwpose_analyzer.name == "dwpose"
    rng = np.random.default_rng(1)
    frames = list(rng.integers(0, 256, (2, 128, 128, 3), dtype=np.uint8))
    results = dwpose_analyzer.detect(frames)
    assert len(results) == 2
    for found in results:
        assert isinstance(found, FaceDetection)
        assert found.landmarks.shape == (68, 2) and found.landmarks.dtype == np.float32
        assert np.isfinite(found.landmarks).all()
        assert found.detector_box == (0, 0, 371, 345)


def test_dwpose_batch_equals_per_frame_inference_topdown(dwpose_analyzer):
    from mmpose.apis import inference_topdown

    rng = np.random.default_rng(2)
    frames = list(rng.integers(0, 256, (3, 96, 128, 3), dtype=np.uint8))
    batched = dwpose_analyzer.landmarks(frames)
    model = dwpose_analyzer.landmarks.model
    for frame, got in zip(frames, batched, strict=True):
        want = inference_topdown(model, frame)[0].pred_instances.keypoints[0][23:91]
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_dwpose_skips_frames_without_a_face(tiny_models, one_thread):
    from musetalk_worker.faces.dwpose import DWPoseAnalyzer

    analyzer = load_face_analyzer("dwpose", tiny_models)
    never = DWPoseAnalyzer(_detector(_forced_face_state(face_logit=-10.0)), analyzer.landmarks)
    assert never.detect([np.zeros((64, 64, 3), np.uint8)] * 2) == [None, None]


def test_auto_prefers_dwpose_and_falls_back_to_dlib(tiny_models, tmp_path):
    assert load_face_analyzer("auto", tiny_models).name == "dwpose"
    (tmp_path / S3FD_WEIGHTS).parent.mkdir(parents=True)
    shutil.copy(tiny_models / S3FD_WEIGHTS, tmp_path / S3FD_WEIGHTS)
    assert load_face_analyzer("auto", tmp_path).name == "dlib"


def test_dwpose_rejects_a_checkpoint_without_its_weights(tiny_models, tmp_path):
    (tmp_path / S3FD_WEIGHTS).parent.mkdir(parents=True)
    shutil.copy(tiny_models / S3FD_WEIGHTS, tmp_path / S3FD_WEIGHTS)
    (tmp_path / DWPOSE_WEIGHTS).parent.mkdir(parents=True)
    for state_dict in ({"unrelated.weight": torch.zeros(1)}, {"backbone.stem.0.conv.weight": torch.zeros(1)}):
        torch.save({"state_dict": state_dict}, tmp_path / DWPOSE_WEIGHTS)
        with pytest.raises(LipSyncError) as caught:
            load_face_analyzer("dwpose", tmp_path)
        assert caught.value.code is ErrorCode.MODELS_MISSING
        assert "not a DWPose" in str(caught.value)


# --- choosing a back-end --------------------------------------------------------------------------


def test_dwpose_without_weights_says_what_is_missing(tmp_path):
    with pytest.raises(LipSyncError) as caught:
        load_face_analyzer("dwpose", tmp_path)
    assert caught.value.code is ErrorCode.MODELS_MISSING
    message = str(caught.value)
    assert str(tmp_path / DWPOSE_WEIGHTS) in message and str(tmp_path / S3FD_WEIGHTS) in message
    assert "dlib" in message


def test_auto_without_dwpose_weights_is_dlib(tmp_path):
    assert load_face_analyzer("auto", tmp_path).name == "dlib"


def test_unknown_backend_is_invalid_input(tmp_path):
    with pytest.raises(LipSyncError) as caught:
        load_face_analyzer("retinaface", tmp_path)
    assert caught.value.code is ErrorCode.INVALID_INPUT
    assert "dwpose" in str(caught.value)
