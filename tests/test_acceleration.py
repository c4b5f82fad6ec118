"""The deployment's acceleration choices: settings, fixed-shape batches, and torch.compile on the CPU.

torch.compile runs here for real (Inductor, C++ on the CPU): the first
compile of the fixture's small UNet and VAE decoder takes a minute or two on
two cores. Its speed on a GPU is measured by bench/speed.py, not here.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import torch._dynamo.utils

from musetalk_worker import MuseTalkOptions
from musetalk_worker.engines.musetalk.generate import FaceGenerator
from musetalk_worker.engines.musetalk.models import load_unet, load_vae
from musetalk_worker.options import Acceleration, WorkerSettings
from musetalk_worker.engines.musetalk.pipeline import MuseTalkPipeline


def test_settings_are_read_and_checked():
    settings = WorkerSettings.from_env(
        {"MUSETALK_HALF_DTYPE": "bfloat16", "MUSETALK_COMPILE": "reduce-overhead", "MUSETALK_CHANNELS_LAST": "true"}
    )
    assert settings.acceleration == Acceleration("bfloat16", "reduce-overhead", True)
    assert WorkerSettings.from_env({}).acceleration == Acceleration("float16", "off", False)
    with pytest.raises(ValueError, match="MUSETALK_COMPILE"):
        WorkerSettings.from_env({"MUSETALK_COMPILE": "fast"})
    with pytest.raises(ValueError, match="MUSETALK_HALF_DTYPE"):
        WorkerSettings.from_env({"MUSETALK_HALF_DTYPE": "float8"})
    with pytest.raises(ValueError, match="compile"):
        Acceleration(compile="max")


def test_a_padded_batch_gives_what_the_unpadded_one_does(fixture_models):
    cpu = torch.device("cpu")
    unet, vae = load_unet(fixture_models, "v15", cpu, torch.float32), load_vae(fixture_models, cpu, torch.float32)
    torch.manual_seed(0)
    latents, prompts = torch.randn(3, 8, 32, 32), torch.randn(3, 50, 384)
    plain, padded = FaceGenerator(unet, vae), FaceGenerator(unet, vae, fixed_batch=5)
    expected = plain.predict_latents(latents, prompts)
    got = padded.predict_latents(latents, prompts)
    assert got.shape == expected.shape == (3, 4, 32, 32)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    faces = padded.decode(got)
    assert faces.shape == (3, 256, 256, 3)
    assert (faces.int() - plain.decode(expected).int()).abs().max() <= 1


def _frames(path) -> np.ndarray:
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"],
                         capture_output=True, check=True).stdout
    return np.frombuffer(raw, np.uint8)


def test_an_eager_cpu_engine_runs_nothing_at_warm_up(fixture_models):
    """On the CPU a first call costs what the next does: a warm-up would only delay readiness."""
    pipe = MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib")
    calls = []
    assert pipe._unets, "the default version's UNet is loaded"
    vae = pipe.vae(torch.float32)
    for network in (*pipe._unets.values(), vae.decoder):
        network.register_forward_hook(lambda module, args, out: calls.append(type(module).__name__))
    pipe.warm_up()
    assert calls == []
    with torch.inference_mode():
        vae.decode(torch.zeros(1, 4, 32, 32))
    assert calls == ["Decoder"], "the hook counts the decoder's calls"


def test_a_compiled_engine_compiles_at_warm_up_and_matches_the_eager_one(fixture_models, media_dir, tmp_path):
    audio = tmp_path / "speech.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(media_dir / "eng.wav"), "-t", "0.5", str(audio)], check=True)
    # 12 output frames in batches of 5: the last batch (2 frames) is padded to the compiled shape.
    options = MuseTalkOptions(boxes=[(217, 283, 465, 523)], batch_size=5)
    eager = MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib")
    eager(media_dir / "yongen.jpeg", audio, tmp_path / "eager.mp4", options)

    compiled = MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib",
                                           acceleration=Acceleration(compile="default"))
    compiled.warm_up(options)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert graphs >= 2, "the UNet and the VAE decoder compile during warm-up"
    result = compiled(media_dir / "yongen.jpeg", audio, tmp_path / "compiled.mp4", options)
    assert result.frames == 12
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs, "a job must not recompile"
    difference = np.abs(_frames(tmp_path / "compiled.mp4").astype(int) - _frames(tmp_path / "eager.mp4").astype(int))
    assert difference.mean() < 0.05 and np.percentile(difference, 99.9) <= 2


def test_the_vae_loads_on_meta_with_the_files_tensors(fixture_models, tmp_path):
    """The meta-device loader gives from_pretrained's weights bit for bit, in float32 and bfloat16, also from a
    checkpoint with diffusers' old attention names; the initialisation only touches meta tensors (no work)."""
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file, save_file

    from musetalk_worker.vae import load_autoencoder

    folder = fixture_models / "sd-vae"
    cpu = torch.device("cpu")
    for dtype in (torch.float32, torch.bfloat16):
        expected = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype).state_dict()
        loaded = load_autoencoder(folder, cpu, dtype).state_dict()
        assert loaded.keys() == expected.keys()
        assert all(torch.equal(loaded[k], expected[k]) and loaded[k].dtype == dtype for k in expected)
    # The checkpoint as published before the attention projections were renamed.
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    renamed = {}
    for key, value in state.items():
        for new, old in old_names.items():
            if ".attentions." in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
        renamed[key] = value
    assert renamed.keys() != state.keys()
    legacy = tmp_path / "sd-vae"
    legacy.mkdir()
    (legacy / "config.json").write_text((folder / "config.json").read_text())
    save_file(renamed, legacy / "diffusion_pytorch_model.safetensors")
    initialised = []
    original = torch.nn.init.kaiming_uniform_
    torch.nn.init.kaiming_uniform_ = lambda tensor, *a, **k: initialised.append(tensor.device.type) or original(
        tensor, *a, **k)
    try:
        loaded = load_autoencoder(legacy, cpu, torch.float32).state_dict()
    finally:
        torch.nn.init.kaiming_uniform_ = original
    assert set(initialised) <= {"meta"}
    assert all(torch.equal(loaded[k], expected_value) for k, expected_value in
               AutoencoderKL.from_pretrained(folder).state_dict().items())


def test_the_unet_loads_the_files_tensors(fixture_models):
    """load_unet (meta build, tensors assigned) holds exactly the checkpoint's tensors."""
    state = torch.load(fixture_models / "musetalkV15" / "unet.pth", map_location="cpu", weights_only=True)
    loaded = load_unet(fixture_models, "v15", torch.device("cpu"), torch.float32).state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k].float()) for k in state)


def test_the_networks_load_in_their_dtype_without_diffusers_warnings(fixture_models):
    """The loaders give every tensor the asked dtype without ``module.to(dtype)``, which in diffusers logs a
    warning about float32 modules at every worker start even when there are none (diffusers' loggers do not
    propagate to the root logger, so the test listens on diffusers' own)."""
    import logging

    records: list = []
    listener = logging.Handler(logging.WARNING)
    listener.emit = records.append
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(listener)
    cpu = torch.device("cpu")
    try:
        for dtype in (torch.float32, torch.bfloat16):
            for network in (load_vae(fixture_models, cpu, dtype), load_unet(fixture_models, "v15", cpu, dtype)):
                tensors = [*network.parameters(), *network.buffers()]
                assert tensors and {(t.device.type, t.dtype) for t in tensors} == {("cpu", dtype)}
    finally:
        diffusers_logger.removeHandler(listener)
    assert [record.getMessage() for record in records] == []


def test_on_the_cpu_an_image_gets_the_same_result_in_any_batch(fixture_models):
    """The VAE and face parsing take one image per call on the CPU (faster per image there, bench/README.md), so
    an image's latents, decoded face and parsing classes do not depend on the batch it came in (in whole-batch
    calls the last bits of a decoded face can depend on the batch's size)."""
    from PIL import Image

    from musetalk_worker.device import images_per_call
    from musetalk_worker.engines.musetalk.latents import LatentEncoder
    from musetalk_worker.engines.musetalk.masks import MaskMaker
    from musetalk_worker.engines.musetalk.models import load_face_parser

    cpu = torch.device("cpu")
    assert images_per_call(cpu) == 1
    vae = load_vae(fixture_models, cpu, torch.float32)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)]
    encoder = LatentEncoder(vae)
    assert torch.equal(encoder.encode(crops)[2:3], encoder.encode(crops[2:3]))
    generator = FaceGenerator(load_unet(fixture_models, "v15", cpu, torch.float32), vae)
    latents = torch.randn(4, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(generator.decode(latents)[3:], generator.decode(latents[3:]))
    parser = MaskMaker(load_face_parser(fixture_models, cpu))
    squares = [Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)) for _ in range(4)]
    assert np.array_equal(parser.parse(squares)[1:2], parser.parse(squares[1:2]))
