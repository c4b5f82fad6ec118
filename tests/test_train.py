"""Training: the cache `prepare` writes, LoRA adapters (identity, save/load, switching), and `fit` (loss, resume, DDP).

The fitting tests use a UNet and a VAE of MuseTalk's shapes (8 -> 4 latent channels at 32x32, 256x256 faces,
384-d audio prompts) but a few channels wide, so a step takes well under a second on a shared CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file

from musetalk_worker.engines.musetalk.latents import LatentEncoder
from musetalk_worker.engines.musetalk.models import load_audio_encoder, load_unet, load_vae
from musetalk_worker.errors import LipSyncError
from musetalk_worker.faces import FaceDetection
from musetalk_worker.train import adapter as adapters
from musetalk_worker.train.data import FrameCache
from musetalk_worker.train.fit import FitOptions, _Forward, fit
from musetalk_worker.train.prepare import DatasetPreparer, PrepareOptions, ShardWriter, read_manifest

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, fixture_models) -> Path:
    """A models folder with a narrow MuseTalk-shaped UNet and VAE (random, seeded) and the fixture's Whisper."""
    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    config = {"in_channels": 8, "out_channels": 4, "sample_size": 32, "cross_attention_dim": 384,
              "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "block_out_channels": [16, 32],
              "layers_per_block": 1, "norm_num_groups": 8, "attention_head_dim": 4}
    unet = UNet2DConditionModel(**config)
    (root / "musetalkV15").mkdir()
    (root / "musetalkV15" / "musetalk.json").write_text(json.dumps(config))
    torch.save(unet.state_dict(), root / "musetalkV15" / "unet.pth")
    AutoencoderKL(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                  sample_size=256).save_pretrained(root / "sd-vae")
    (root / "whisper").symlink_to(fixture_models / "whisper")
    return root


class _Faces:
    """A face in every frame that is not flat grey, at a fixed place (tests need no detector)."""

    name = "fixed"

    def detect(self, frames):
        h, w = frames[0].shape[:2]
        landmarks = np.stack([np.linspace(w * 0.2, w * 0.8, 68), np.linspace(h * 0.3, h * 0.8, 68)], 1)
        face = FaceDetection(landmarks.astype(np.float32), (int(w * 0.2), int(h * 0.2), int(w * 0.8), int(h * 0.8)))
        return [face if frame.std() > 1 else None for frame in frames]


def _write_video(path: Path, frames: list, audio: Path) -> None:
    h, w = frames[0].shape[:2]
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "bgr24", "-s", f"{w}x{h}", "-r", "25",
                    "-i", "pipe:0", "-i", str(audio), "-shortest", "-c:v", "libx264", "-crf", "10", "-pix_fmt",
                    "yuv444p", "-c:a", "aac", str(path)], input=b"".join(f.tobytes() for f in frames), check=True)


def test_prepare_writes_shards_reports_faceless_frames_and_resumes(tiny_models, media_dir, tmp_path):
    videos = tmp_path / "videos"
    (videos / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    textured = [rng.integers(0, 255, (96, 64, 3), dtype=np.uint8) for _ in range(5)]
    grey = [np.full((96, 64, 3), 128, np.uint8)] * 3
    _write_video(videos / "talk.mp4", textured + grey, media_dir / "eng.wav")
    _write_video(videos / "more" / "empty.mp4", grey, media_dir / "eng.wav")
    (videos / "notes.txt").write_text("not a video")
    vae = load_vae(tiny_models, CPU, torch.float32)
    preparer = DatasetPreparer(_Faces(), vae, load_audio_encoder(tiny_models, CPU), PrepareOptions(shard_frames=2))
    cache = tmp_path / "cache"
    manifest = preparer.run(videos, cache, progress=False)

    talk, empty = manifest["clips"]["talk"], manifest["clips"]["more_empty"]
    assert talk["status"] == "ok" and talk["frames"] == 8 and talk["kept"] == 5
    assert talk["faceless_frames"] == [5, 6, 7]
    assert [s["frames"] for s in talk["shards"]] == [2, 2, 1]
    assert empty["status"] == "skipped" and "no face" in empty["reason"]
    shard = load_file(str(cache / talk["shards"][0]["file"]))
    assert shard["frame"].tolist() == [0, 1]
    assert shard["crop"].shape == (2, 256, 256, 3) and shard["crop"].dtype == torch.uint8
    assert shard["latent"].shape == (2, 8, 32, 32) and shard["prompt"].shape == (2, 50, 384)
    assert shard["landmarks"].shape == (2, 68, 2) and shard["box"].shape == (2, 4)
    # The latents are the engine's own (mouth-blanked + whole) of the stored crop.
    torch.testing.assert_close(shard["latent"][:1], LatentEncoder(vae).encode([shard["crop"][0].numpy()]))

    class _Refuses:
        def detect(self, frames):
            raise AssertionError("a finished clip was prepared again")

    preparer.faces = _Refuses()
    assert preparer.run(videos, cache, progress=False) == read_manifest(cache)


def _synthetic_cache(root: Path, models: Path, frames: int = 40) -> Path:
    """A cache whose mouth (the crop's lower half) is dark or bright as the audio prompt says."""
    vae = load_vae(models, CPU, torch.float32)
    rng = np.random.default_rng(1)
    pattern = torch.from_numpy(rng.standard_normal((50, 384)).astype(np.float32))
    writer = ShardWriter(root, "clip", shard_frames=16)
    for first in range(0, frames, 8):
        loud = torch.tensor([(i // 3) % 2 for i in range(first, first + 8)], dtype=torch.float32)
        crops = np.full((8, 256, 256, 3), 120, np.uint8)
        crops[:, 128:] = (40 + 170 * loud.numpy()).astype(np.uint8)[:, None, None, None]
        writer.add(frame=torch.arange(first, first + 8), crop=torch.from_numpy(crops),
                   latent=LatentEncoder(vae).encode(list(crops)), prompt=(2 * loud - 1)[:, None, None] * pattern,
                   landmarks=torch.zeros(8, 68, 2), box=torch.zeros(8, 4, dtype=torch.int32))
    (root / "manifest.json").write_text(json.dumps({"format": 1, "fps": "25", "clips": {"clip": {
        "status": "ok", "source": "clip.mp4", "frames": frames, "kept": frames, "faceless_frames": [],
        "shards": writer.close()}}}))
    return root


@pytest.fixture(scope="module")
def synthetic_cache(tmp_path_factory, tiny_models) -> Path:
    return _synthetic_cache(tmp_path_factory.mktemp("cache"), tiny_models)


def _outputs(unet, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, prompts = torch.randn(2, 8, 32, 32, generator=generator), torch.randn(2, 50, 384, generator=generator)
    with torch.no_grad():
        return unet(x, torch.zeros(1, dtype=torch.long), encoder_hidden_states=prompts).sample


def test_a_new_lora_is_the_identity_and_training_changes_only_its_parameters(tiny_models, synthetic_cache):
    unet = load_unet(tiny_models, "v15", CPU, torch.float32)
    base_out = _outputs(unet)
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    params = adapters.add_lora(unet, rank=4, alpha=4)
    assert torch.equal(_outputs(unet), base_out)
    assert {id(p) for p in unet.parameters() if p.requires_grad} == {id(p) for p in params}

    cache = FrameCache(synthetic_cache)
    forward = _Forward(load_vae(tiny_models, CPU, torch.float32), CPU)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    before = {k: v.clone() for k, v in adapters.lora_tensors(unet).items()}
    forward.loss(unet, cache.sample(cache.train, 2, torch.Generator().manual_seed(0))).backward()
    optimizer.step()
    after = unet.state_dict()
    for key, value in base.items():
        peft_key = key.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(after.get(key, after.get(peft_key)), value), key
    assert any(not torch.equal(before[k], v) for k, v in adapters.lora_tensors(unet).items())


def test_the_held_out_part_is_each_clips_tail(synthetic_cache):
    cache = FrameCache(synthetic_cache, holdout=0.2)
    assert [len(c) for c in cache.train] == [32] and [len(c) for c in cache.held_out] == [8]
    assert cache.held_out[0][0] == ("shards/clip-0002.safetensors", 0)
    batch = cache.sample(cache.train, 3, torch.Generator().manual_seed(0))
    assert batch.latents.shape == (3, 8, 32, 32) and batch.targets.shape == (3, 3, 256, 256)
    assert float(batch.targets.min()) >= -1 and float(batch.targets.max()) <= 1


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, tiny_models, synthetic_cache):
    """A LoRA fitted for 30 steps on the synthetic cache, and the JSON lines it printed."""
    out = tmp_path_factory.mktemp("adapter")
    lines = []
    summary = fit(synthetic_cache, tiny_models, out, FitOptions(steps=30, rank=4, lr=1e-2, batch=4, eval_every=15),
                  device="cpu", emit=lines.append)
    return out, summary, lines


def test_fit_loss_falls_on_data_whose_mouth_follows_the_audio(fitted):
    out, summary, lines = fitted
    assert summary["steps"] == 30 and lines[-1] == summary
    assert [line["step"] for line in lines[:-1]] == [0, 15, 30]
    assert summary["loss_end"] < 0.9 * summary["loss_start"], summary
    assert summary["eval"]["after"]["mouth_l1"] < summary["eval"]["before"]["mouth_l1"]
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["rank"] == 4 and meta["alpha"] == 4 and meta["kind"] == "lora"
    assert meta["tensors_sha256"] == adapters.sha256_file(out / "adapter.safetensors")
    assert set(meta["base"]["files"]) == {"musetalkV15/musetalk.json", "musetalkV15/unet.pth"}
    assert meta["eval"] == summary["eval"] and not (out / "checkpoint.pt").exists()


def test_adapter_round_trip_is_exact_and_the_base_stays_bit_identical(fitted, tiny_models):
    out, _, _ = fitted
    unet = load_unet(tiny_models, "v15", CPU, torch.float32)
    base_out = _outputs(unet)
    base_modules = {n: type(m) for n, m in unet.named_modules()}
    info = adapters.load_adapter(unet, out, base=json.loads((out / "adapter.json").read_text())["base"]["files"])
    saved = load_file(str(out / "adapter.safetensors"))
    assert adapters.lora_tensors(unet, info.name).keys() == saved.keys()
    assert all(torch.equal(adapters.lora_tensors(unet, info.name)[k], v) for k, v in saved.items())
    with_adapter = _outputs(unet)
    assert not torch.equal(with_adapter, base_out)

    adapters.use_adapter(unet, None)
    assert torch.equal(_outputs(unet), base_out)
    adapters.use_adapter(unet, info.name)
    assert torch.equal(_outputs(unet), with_adapter)
    adapters.unload_adapter(unet, info.name)
    assert torch.equal(_outputs(unet), base_out)
    assert {n: type(m) for n, m in unet.named_modules()} == base_modules


def test_load_adapter_refuses_corrupt_files_and_other_base_weights(fitted, tiny_models, tmp_path):
    out, _, _ = fitted
    unet = load_unet(tiny_models, "v15", CPU, torch.float32)
    with pytest.raises(LipSyncError, match="adapter: .*other base weights") as error:
        adapters.load_adapter(unet, out, base={"musetalkV15/unet.pth": "0" * 64})
    assert error.value.code.value == "invalid_input"
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter.json").write_text((out / "adapter.json").read_text())
    data = bytearray((out / "adapter.safetensors").read_bytes())
    data[-1] ^= 1
    (broken / "adapter.safetensors").write_bytes(bytes(data))
    with pytest.raises(LipSyncError, match="does not match the SHA-256"):
        adapters.load_adapter(unet, broken)
    assert torch.equal(_outputs(unet), _outputs(load_unet(tiny_models, "v15", CPU, torch.float32)))


def test_fit_resumes_from_its_checkpoint(tiny_models, synthetic_cache, tmp_path):
    options = FitOptions(steps=4, rank=2, lr=1e-3, batch=1, eval_every=3, checkpoint_every=2)

    def interrupt(line):
        if line["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(synthetic_cache, tiny_models, tmp_path, options, device="cpu", emit=interrupt)
    assert (tmp_path / "checkpoint.pt").exists() and not (tmp_path / "adapter.json").exists()
    lines = []
    summary = fit(synthetic_cache, tiny_models, tmp_path, options, device="cpu", emit=lines.append)
    assert [line["step"] for line in lines[:-1]] == [3, 4]  # no new step-0 evaluation: it resumed at step 2
    assert summary["steps"] == 4 and summary["eval"]["before"]["step"] == 0


def test_full_fit_runs_under_torchrun_with_two_cpu_processes(tiny_models, synthetic_cache, tmp_path):
    out = tmp_path / "full"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
         "-m", "musetalk_worker.train", "fit", "--data", str(synthetic_cache), "--models", str(tiny_models),
         "--out", str(out), "--steps", "2", "--batch", "1", "--device", "cpu", "--full"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line.get("step") for line in lines[:-1]] == [0, 1, 2]  # rank 0 alone prints, once per evaluation
    assert set(lines[-1]) == {"steps", "loss_start", "loss_end", "adapter", "eval"} and lines[-1]["steps"] == 2
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["kind"] == "full" and meta["file"] == "unet.safetensors"
    base = load_unet(tiny_models, "v15", CPU, torch.float32).state_dict()
    trained = load_file(str(out / "unet.safetensors"))
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k], base[k]) for k in base)
