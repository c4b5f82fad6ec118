"""Face restoration (GFPGAN v1.4) with the real architecture and random weights, on the CPU.

The blending and pipeline tests use spandrel's GFPGAN at a small size (64 px,
narrow), injected where the loaded network goes; one test loads the full
512 px network through the worker's loader from a checkpoint in the
release's layout, converted as the image's build converts it.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("spandrel", reason="face restoration needs spandrel (requirements/worker.txt)")
from spandrel.architectures.GFPGAN import GFPGAN  # noqa: E402

from musetalk_worker import ErrorCode, LipSyncError, MuseTalkOptions  # noqa: E402
from musetalk_worker.engines.musetalk import pipeline as pipeline_module  # noqa: E402
from musetalk_worker.engines.musetalk.blend import FaceBlender, visible_part  # noqa: E402
from musetalk_worker.engines.musetalk.masks import BlendMask  # noqa: E402
from musetalk_worker.engines.musetalk.pipeline import MuseTalkPipeline  # noqa: E402
from musetalk_worker.restoration.align import FFHQ_512, context_window, similarity  # noqa: E402
from musetalk_worker.restoration.network import WEIGHTS, FaceRestorer, load_restorer  # noqa: E402
from musetalk_worker.restoration.warp import Placement  # noqa: E402
from musetalk_worker.weights import load_lock  # noqa: E402

WIDTH, HEIGHT = 320, 240
BOX = (110, 70, 230, 200)


def _tiny_restorer(seed: int = 0) -> FaceRestorer:
    """GFPGAN's architecture at 64 px with random weights, its noise gains made non-zero (as trained ones are),
    so that fresh noise per call would show."""
    torch.manual_seed(seed)
    net = GFPGAN(out_size=64, channel_multiplier=1, narrow=0.0625).eval()
    with torch.no_grad():
        for name, parameter in net.named_parameters():
            if name.startswith("stylegan_decoder.style_conv") and name.endswith(".weight") and parameter.numel() == 1:
                parameter.fill_(0.1)
    return FaceRestorer(net, size=64)


@pytest.fixture(scope="module")
def restorer() -> FaceRestorer:
    return _tiny_restorer()


def _case(seed: int = 0):
    """A frame, a generated face, a blend mask that is zero on the box's upper half, and the face's placement."""
    rng = np.random.default_rng(seed)
    frame = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    face = torch.from_numpy(rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8))
    x1, y1, x2, y2 = BOX
    alpha = rng.integers(1, 256, (y2 - y1, x2 - x1), dtype=np.uint8)
    alpha[: (y2 - y1) // 2] = 0
    mask = BlendMask(BOX, alpha)
    # A face of about the box's size: the template's points scaled into the box.
    points = (FFHQ_512 - 256) * 0.3 + np.array([(x1 + x2) / 2, (y1 + y2) / 2])
    matrix = similarity(points, FFHQ_512)
    region = visible_part(BOX, WIDTH, HEIGHT)
    window = context_window(matrix, region, WIDTH, HEIGHT)
    return frame, face, mask, Placement(matrix, window, region)


def _blend(restorer, weight=0.7, region="face", seed=0, restore=True) -> np.ndarray:
    frame, face, mask, placement = _case(seed)
    blender = FaceBlender(torch.device("cpu"))
    x1, y1, x2, y2 = placement.region
    composite = blender.composite([frame[y1:y2, x1:x2]], face, [mask], WIDTH, HEIGHT)
    if restore:
        wx1, wy1, wx2, wy2 = placement.window
        composite = blender.restore(composite, [frame[wy1:wy2, wx1:wx2]], [placement], restorer, weight, region)
    return blender.finish(composite).paste(0, frame.copy())


def test_restoration_changes_only_the_blend_mask_and_weight_zero_changes_nothing(restorer):
    frame, _, mask, _ = _case()
    plain = _blend(restorer, restore=False)
    restored = _blend(restorer)
    changed = np.any(restored != plain, axis=2)
    x1, y1, x2, y2 = BOX
    inside = np.zeros_like(changed)
    inside[y1:y2, x1:x2] = mask.alpha > 0
    assert changed.any() and not (changed & ~inside).any(), "only pixels the blend mask lets through may change"
    assert changed[inside].mean() > 0.5
    np.testing.assert_array_equal(_blend(restorer, weight=0.0), plain)


def test_restoration_is_deterministic_and_the_mouth_region_changes_less(restorer):
    first, again = _blend(restorer), _blend(restorer)
    np.testing.assert_array_equal(first, again)
    # The fixed noise is what makes that so: fresh noise (upstream's default) would differ.
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        one, two = (restorer.net(x, return_rgb=False, randomize_noise=True)[0] for _ in range(2))
    assert not torch.equal(one, two)
    plain = _blend(restorer, restore=False)
    face = np.any(first != plain, axis=2)
    mouth = np.any(_blend(restorer, region="mouth") != plain, axis=2)
    assert mouth.any() and mouth.sum() < 0.8 * face.sum()
    assert not (mouth & ~face).any()


def test_a_batch_restores_as_its_faces_one_by_one(restorer):
    batch = torch.rand(3, 3, 64, 64) * 255
    together = restorer(batch)
    alone = torch.cat([restorer(face[None]) for face in batch])
    assert together.shape == batch.shape and torch.allclose(together, alone, atol=1e-3)
    chunked = FaceRestorer(restorer.net, size=64, batch=2)(batch)
    assert torch.allclose(chunked, together, atol=1e-3)


def test_bfloat16_runs_and_float16_is_refused(restorer):
    batch = torch.rand(2, 3, 64, 64) * 255
    half = FaceRestorer(_tiny_restorer().net.to(torch.bfloat16), size=64, dtype=torch.bfloat16)(batch)
    assert half.dtype == torch.float32 and (half - restorer(batch)).abs().mean() < 8
    with pytest.raises(ValueError, match="float16"):
        FaceRestorer(restorer.net, size=64, dtype=torch.float16)


def _models_with_gfpgan(tmp_path: Path, fixture_models: Path) -> Path:
    """The fixture's models folder plus GFPGAN v1.4 with random weights, in the release's layout
    (``{"params_ema": ...}``), converted to safetensors by the build's converter."""
    from builder.pth_to_safetensors import convert

    models = tmp_path / "models"
    models.mkdir()
    for item in fixture_models.iterdir():
        (models / item.name).symlink_to(item)
    (models / "gfpgan").mkdir()
    torch.manual_seed(0)
    release = models / "gfpgan" / "GFPGANv1.4.pth"
    torch.save({"params_ema": GFPGAN().state_dict()}, release)
    convert(release, models / WEIGHTS, {})
    release.unlink()  # as --remove-converted-sources leaves it: the worker never reads the pickle
    return models


def test_the_worker_loads_the_converted_release_strictly_and_warms_it_up(tmp_path, fixture_models):
    assert load_lock().components["gfpgan"].files[0].converted_path == WEIGHTS
    models = _models_with_gfpgan(tmp_path, fixture_models)
    loaded = load_restorer(models, torch.device("cpu"))
    torch.manual_seed(0)
    reference = GFPGAN().eval()  # the same random weights, straight from spandrel
    assert loaded.size == 512 and not loaded.net.training
    assert all(not p.requires_grad for p in loaded.net.parameters())
    face = torch.rand(1, 3, 512, 512) * 255
    with torch.inference_mode():
        expected = reference((face / 255 - 0.5) / 0.5, return_rgb=False, randomize_noise=False)[0]
    expected = (expected.clamp(-1, 1) + 1) / 2 * 255
    assert (loaded(face) - expected).abs().max() <= 1e-3

    pipe = MuseTalkPipeline.from_models(models, device="cpu", landmarks="dlib")
    assert pipe.restorer is not None and pipe.restorer.size == 512
    calls = []
    real = pipe.restorer.net.forward
    pipe.restorer.net.forward = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
    pipe.warm_up()
    assert calls == [], "an eager CPU engine's warm-up runs nothing (no first-call set-up to take off a job)"
    pipe.restorer.warm_up()
    assert calls == [torch.Size([1, 3, 512, 512])]


def test_weights_with_other_tensors_are_models_missing(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "gfpgan").mkdir()
    save_file({"toRGB.0.weight": torch.zeros(3, 512, 1, 1)}, tmp_path / WEIGHTS)
    with pytest.raises(LipSyncError) as error:
        load_restorer(tmp_path, torch.device("cpu"))
    assert error.value.code == ErrorCode.MODELS_MISSING and "not GFPGAN v1.4" in str(error.value)
    with pytest.raises(ValueError, match="never float16"):
        load_restorer(tmp_path, torch.device("cpu"), dtype="float16")


@pytest.mark.skipif(importlib.util.find_spec("gfpgan") is None,
                    reason="the reference `gfpgan` package is not installed; it is a test-only oracle: "
                           "pip install --no-deps --no-build-isolation basicsr==1.4.2 gfpgan==1.3.8 facexlib==0.3.0 "
                           "addict future lmdb yapf filterpy (see ../shared/docs/restoration.md section 7)")
def test_the_scaling_is_gfpganers_on_an_aligned_face(tmp_path, monkeypatch):
    # basicsr imports a torchvision module that torchvision 0.17 removed; give it the function it wants.
    shim = types.ModuleType("torchvision.transforms.functional_tensor")
    from torchvision.transforms.functional import rgb_to_grayscale

    shim.rgb_to_grayscale = rgb_to_grayscale
    monkeypatch.setitem(sys.modules, "torchvision.transforms.functional_tensor", shim)
    from facexlib.utils.face_restoration_helper import FaceRestoreHelper
    from gfpgan import GFPGANer

    # GFPGANer builds a face detector and parser (downloading their weights); an aligned face needs neither.
    helper = sys.modules[FaceRestoreHelper.__module__]
    monkeypatch.setattr(helper, "init_detection_model", lambda *args, **kwargs: torch.nn.Identity())
    monkeypatch.setattr(helper, "init_parsing_model", lambda *args, **kwargs: torch.nn.Identity())
    torch.manual_seed(0)
    state = GFPGAN().state_dict()
    with torch.no_grad():  # non-zero noise gains, as trained weights have, so fixed noise matters
        for name in state:
            if name.startswith("stylegan_decoder.style_conv") and name.endswith(".weight") and state[name].numel() == 1:
                state[name].fill_(0.1)
    torch.save({"params_ema": state}, tmp_path / "GFPGANv1.4.pth")
    reference = GFPGANer(model_path=str(tmp_path / "GFPGANv1.4.pth"), upscale=1, arch="clean", channel_multiplier=2,
                         device=torch.device("cpu"))
    forward = reference.gfpgan.forward
    # Upstream draws fresh noise per call; with the fixed noise it is the recipe the worker follows.
    reference.gfpgan.forward = lambda *args, **kwargs: forward(*args, **{**kwargs, "randomize_noise": False})
    face = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)  # BGR, as cv2 reads
    expected = reference.enhance(face, has_aligned=True, paste_back=False)[1][0]

    net = GFPGAN().eval()
    net.load_state_dict(state, strict=True)
    ours = FaceRestorer(net)(torch.from_numpy(face[:, :, ::-1].copy()).permute(2, 0, 1)[None].float())
    got = ours[0].round().to(torch.uint8).permute(1, 2, 0).numpy()[:, :, ::-1]
    assert int((got != expected).sum()) == 0


# --------------------------------------------------------------------------- #
# Through the MuseTalk pipeline (the parity fixture's random-weight models, dlib landmarks).
# --------------------------------------------------------------------------- #

@pytest.fixture(scope="module")
def pipe(fixture_models) -> MuseTalkPipeline:
    return MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib")


@pytest.fixture(scope="module")
def clips(tmp_path_factory, media_dir) -> dict:
    folder = tmp_path_factory.mktemp("restore-clips")
    for name, args in {"video.mp4": ("-i", str(media_dir / "yongen.mp4"), "-t", "0.4", "-c:v", "libx264",
                                     "-crf", "16"),
                       "speech.wav": ("-i", str(media_dir / "eng.wav"), "-t", "0.32")}.items():
        subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args, str(folder / name)], check=True)
    return {p.name: p for p in folder.iterdir()}


def _run(pipe, clips, tmp_path, monkeypatch, name, **options):
    """The raw frames a job hands the encoder (the video itself is lossy), and the result."""
    frames = []
    real = pipeline_module.VideoEncoder.write
    monkeypatch.setattr(pipeline_module.VideoEncoder, "write",
                        lambda self, frame: frames.append(frame.copy()) or real(self, frame))
    result = pipe(clips["video.mp4"], clips["speech.wav"], tmp_path / f"{name}.mp4",
                  MuseTalkOptions(batch_size=4, **options))
    monkeypatch.undo()
    return np.stack(frames), result


def test_the_pipeline_restores_inside_the_face_boxes_only_and_the_same_way_twice(pipe, clips, tmp_path,
                                                                                  monkeypatch):
    pipe.restorer = _tiny_restorer()
    try:
        plain, plain_result = _run(pipe, clips, tmp_path, monkeypatch, "plain")
        zero, _ = _run(pipe, clips, tmp_path, monkeypatch, "zero", restore=True, restore_weight=0.0)
        restored, result = _run(pipe, clips, tmp_path, monkeypatch, "restored", restore=True)
        again, _ = _run(pipe, clips, tmp_path, monkeypatch, "again", restore=True)
        mouth, _ = _run(pipe, clips, tmp_path, monkeypatch, "mouth", restore=True, restore_region="mouth")
    finally:
        pipe.restorer = None
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(again, restored)
    assert "restore" in result.timings and "restore" not in plain_result.timings
    changed = np.any(restored != plain, axis=3)
    assert changed.any(axis=(1, 2)).all(), "every frame (all have a face) is restored"
    rows, cols = np.nonzero(changed.any(axis=0))
    # The face boxes of this clip lie in the middle of the frame; nothing near the edges changes.
    assert rows.min() > 0.1 * plain.shape[1] and cols.min() > 0.1 * plain.shape[2]
    assert np.any(mouth != plain) and not np.any((mouth != plain).any(axis=3) & ~changed)


def test_restore_without_weights_or_with_boxes_is_refused_by_name(pipe, clips, tmp_path):
    assert pipe.restorer is None
    with pytest.raises(LipSyncError) as error:
        pipe(clips["video.mp4"], clips["speech.wav"], tmp_path / "x.mp4", MuseTalkOptions(restore=True))
    message = str(error.value)
    assert error.value.code == ErrorCode.MODELS_MISSING
    assert "'gfpgan'" in message and "WEIGHT_COMPONENTS=default,gfpgan" in message
    with pytest.raises(LipSyncError) as error:
        MuseTalkOptions(restore=True, boxes=[(10, 10, 100, 100)])
    assert error.value.code == ErrorCode.INVALID_INPUT and "'boxes'" in str(error.value)
    for bad in ({"restore_weight": 1.5}, {"restore_weight": -0.1}, {"restore_region": "eyes"}):
        with pytest.raises(LipSyncError) as error:
            MuseTalkOptions(**bad)
        assert error.value.code == ErrorCode.INVALID_INPUT and next(iter(bad)) in str(error.value)


def test_an_avatar_prepared_from_boxes_cannot_be_restored(fixture_models, clips, tmp_path):
    cached = MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib", cache_dir=tmp_path / "c")
    cached.restorer = _tiny_restorer()
    first = cached(clips["video.mp4"], clips["speech.wav"], tmp_path / "a.mp4",
                   MuseTalkOptions(boxes=[(80, 60, 200, 200)]))
    with pytest.raises(LipSyncError) as error:
        cached(None, clips["speech.wav"], tmp_path / "b.mp4", MuseTalkOptions(restore=True),
               avatar_id=first.avatar_id)
    assert error.value.code == ErrorCode.INVALID_INPUT and "boxes" in str(error.value)
