"""Parity with upstream MuseTalk: every array of every fixture folder, within its tolerance.

Fixture folders: each folder under ../shared/parity/ plus those named in the
environment variable MUSETALK_PARITY_FIXTURES (colon-separated). Nothing here
depends on a particular fixture: settings come from its parity.json.

Bounds (CPU float32, from ../shared/parity/README.md): coords, bbox_cases and
crops exact; whisper_chunks, latents and pred_latents max abs error <= 1e-4 x
max abs value; faces within 1; blended frames PSNR >= 40 dB with nothing
outside the blend region changed. ``test_gpu_float16_path`` runs the chain on
CUDA in float16 with the GPU bound instead (faces and blended frames >= 35 dB);
it is skipped where there is no CUDA GPU.
"""

from __future__ import annotations

import hashlib
import json
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import PARITY_ROOT
from musetalk_worker.engines.musetalk import boxes as box_math
from musetalk_worker.engines.musetalk.audio import AudioPrompts
from musetalk_worker.engines.musetalk.blend import FaceBlender, visible_part
from musetalk_worker.decode import load_audio, probe
from musetalk_worker.engines.musetalk.generate import FaceGenerator
from musetalk_worker.engines.musetalk.latents import LatentEncoder, crop_face
from musetalk_worker.engines.musetalk.masks import MaskMaker
from musetalk_worker.engines.musetalk.models import load_audio_encoder, load_face_parser, load_unet, load_vae
from musetalk_worker.options import MuseTalkOptions


def _fixture_dirs() -> list[Path]:
    dirs = sorted(p for p in PARITY_ROOT.iterdir() if (p / "parity.json").is_file()) if PARITY_ROOT.is_dir() else []
    extra = os.environ.get("MUSETALK_PARITY_FIXTURES", "")
    dirs += [Path(p) for p in extra.split(os.pathsep) if p]
    return dirs


FIXTURES = _fixture_dirs()
if not FIXTURES:
    pytest.skip(f"no parity fixture folders under {PARITY_ROOT} or in MUSETALK_PARITY_FIXTURES", allow_module_level=True)


class Fixture:
    """One fixture folder: settings, arrays, and the project's models loaded from it."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.settings = json.loads((folder / "parity.json").read_text())
        self.arrays = np.load(folder / "parity.npz")
        device = torch.device("cpu")
        models = folder / "models"
        self.version = "v1" if (models / "musetalk").is_dir() and not (models / "musetalkV15").is_dir() else "v15"
        self.vae = load_vae(models, device, torch.float32)
        self.unet = load_unet(models, self.version, device, torch.float32)
        self.audio_encoder = load_audio_encoder(models, device)
        self.parser = load_face_parser(models, device)
        self.options = MuseTalkOptions(
            version=self.version,
            extra_margin=self.settings["extra_margin"],
            parsing_mode=self.settings["parsing_mode"],
            left_cheek_width=self.settings["left_cheek_width"],
            right_cheek_width=self.settings["right_cheek_width"],
            batch_size=self.settings["batch_size"],
        ).resolved()

    @property
    def fps(self) -> Fraction:
        return Fraction(str(self.settings["fps"]))

    def boxes_with_margin(self) -> list:
        height = self.arrays["frames"].shape[1]
        return [box_math.with_margin(tuple(c), self.options.extra_margin, height) for c in self.arrays["coords"]]

    def ping_pong(self, i: int) -> int:
        n = len(self.arrays["frames"])
        k = i % (2 * n)
        return k if k < n else 2 * n - 1 - k


@pytest.fixture(scope="module", params=FIXTURES, ids=lambda p: p.name)
def fixture(request) -> Fixture:
    torch.manual_seed(0)
    return Fixture(request.param)


def _assert_close(actual: np.ndarray, expected: np.ndarray, name: str) -> None:
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    bound = 1e-4 * float(np.abs(expected).max())
    error = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())
    assert error <= bound, f"{name}: max abs error {error:.3g} > {bound:.3g}"


def test_fixture_files_match_their_hashes(fixture):
    for relative, digest in fixture.settings["files"].items():
        actual = hashlib.sha256((fixture.folder / relative).read_bytes()).hexdigest()
        assert actual == digest, f"{relative} of {fixture.folder.name} is not the file the fixture was made with"


def test_bbox_cases_exact(fixture):
    for case in fixture.settings["bbox_cases"]:
        got = box_math.face_box(np.array(case["landmarks"]), case["detector_box"], case["bbox_shift"])
        assert list(got) == case["bbox"], case


def test_coords_from_landmarks_exact(fixture):
    a = fixture.arrays
    got = [box_math.face_box(lm, det, 0) for lm, det in zip(a["landmarks"], a["detector_boxes"])]
    np.testing.assert_array_equal(np.array(got), a["coords"])


def test_crops_exact(fixture):
    a = fixture.arrays
    for frame, box, expected in zip(a["frames"], fixture.boxes_with_margin(), a["crops"]):
        np.testing.assert_array_equal(crop_face(frame, box), expected)


def test_audio_prompts(fixture):
    a = fixture.arrays
    samples = load_audio(probe(fixture.folder / "audio.wav"))
    assert len(samples) == fixture.settings["audio_samples"]
    window = fixture.audio_encoder.encode_window(samples[: 30 * 16000]).unsqueeze(0)
    _assert_close(window.numpy(), a["whisper_hidden_states"], "whisper_hidden_states")
    prompts = AudioPrompts(fixture.audio_encoder, samples, fixture.fps)
    assert len(prompts) == fixture.settings["num_output_frames"] == len(a["whisper_chunks"])
    _assert_close(prompts[0 : len(prompts)].numpy(), a["whisper_chunks"], "whisper_chunks")


def test_latents(fixture):
    a = fixture.arrays
    latents = LatentEncoder(fixture.vae).encode(list(a["crops"]))
    _assert_close(latents.numpy(), a["latents"], "latents")


def test_generation_and_decode(fixture):
    a = fixture.arrays
    generator = FaceGenerator(fixture.unet, fixture.vae)
    latents = torch.from_numpy(a["latents"])
    prompts = torch.from_numpy(a["whisper_chunks"])
    batch = fixture.settings["batch_size"]
    preds, faces = [], []
    for start in range(0, len(prompts), batch):
        index = [fixture.ping_pong(i) for i in range(start, min(start + batch, len(prompts)))]
        pred = generator.predict_latents(latents[index], prompts[start : start + len(index)])
        preds.append(pred.float().numpy())
        faces.append(generator.decode(pred).numpy())
    _assert_close(np.concatenate(preds), a["pred_latents"], "pred_latents")
    # Decode the fixture's own predictions too, so face errors are not UNet errors carried over.
    own_faces = generator.decode(torch.from_numpy(a["pred_latents"])).numpy()
    difference = np.abs(own_faces.astype(int) - a["faces"].astype(int)).max()
    assert difference <= 1, f"faces differ by up to {difference}"


def _blend(blender: FaceBlender, frame: np.ndarray, face, mask) -> np.ndarray:
    """``frame`` with ``face`` (uint8 BGR, array or tensor) blended in by the engine's blender."""
    height, width = frame.shape[:2]
    x1, y1, x2, y2 = visible_part(mask.box, width, height)
    batch = blender.blend([frame[y1:y2, x1:x2]], torch.as_tensor(face)[None], [mask], width, height)
    return batch.paste(0, frame.copy())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_blending(fixture):
    a = fixture.arrays
    frames = a["frames"]
    boxes = fixture.boxes_with_margin()
    options = fixture.options
    maker = MaskMaker(fixture.parser, options.parsing_mode, options.left_cheek_width, options.right_cheek_width)
    masks = maker.make(list(frames), boxes)
    height, width = frames.shape[1:3]
    for t in range(len(a["faces"])):
        src = fixture.ping_pong(t)
        expected_region = a[f"blended_{t:03d}"]
        rx1, ry1, rx2, ry2, *face = (int(v) for v in a["blend_boxes"][t])
        assert tuple(face) == boxes[src]
        square, _ = box_math.blend_square(boxes[src])
        assert box_math.clip_box(square, width, height) == (rx1, ry1, rx2, ry2)
        out = _blend(FaceBlender(torch.device("cpu")), frames[src], a["faces"][t], masks[src])
        psnr = _psnr(out[ry1:ry2, rx1:rx2], expected_region)
        assert psnr >= 40.0, f"blended frame {t}: PSNR {psnr:.1f} dB < 40 dB"
        outside = np.ones((height, width), bool)
        outside[ry1:ry2, rx1:rx2] = False
        np.testing.assert_array_equal(out[outside], frames[src][outside])


@pytest.mark.gpu
def test_gpu_float16_path(fixture):
    """The whole chain on CUDA in float16 against the same arrays, with the looser GPU bound:
    faces and blended frames PSNR >= 35 dB (the CPU float32 bounds above do not apply)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the float16 GPU path cannot run here")
    a = fixture.arrays
    models = fixture.folder / "models"
    device = torch.device("cuda")
    vae = load_vae(models, device, torch.float16)
    generator = FaceGenerator(load_unet(models, fixture.version, device, torch.float16), vae)
    latents = LatentEncoder(vae).encode(list(a["crops"]))
    prompts = torch.from_numpy(a["whisper_chunks"])
    index = [fixture.ping_pong(i) for i in range(len(prompts))]
    faces = generator.decode(generator.predict_latents(latents[index], prompts))
    for t, face in enumerate(faces.cpu().numpy()):
        psnr = _psnr(face, a["faces"][t])
        assert psnr >= 35.0, f"GPU float16 face {t}: PSNR {psnr:.1f} dB < 35 dB"
    options = fixture.options
    parser = load_face_parser(models, device)
    masks = MaskMaker(parser, options.parsing_mode, options.left_cheek_width, options.right_cheek_width).make(
        list(a["frames"]), fixture.boxes_with_margin())
    for t, face in enumerate(faces):
        rx1, ry1, rx2, ry2 = (int(v) for v in a["blend_boxes"][t][:4])
        out = _blend(FaceBlender(device), a["frames"][index[t]], face, masks[index[t]])
        psnr = _psnr(out[ry1:ry2, rx1:rx2], a[f"blended_{t:03d}"])
        assert psnr >= 35.0, f"GPU float16 blended frame {t}: PSNR {psnr:.1f} dB < 35 dB"
