"""Smoke tests of the benchmark scripts: random models, synthetic media, speed.py and memory.py (tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import pytest
import torch

from bench.media import make_job_media, make_video
from bench.memory import allocator_env, judge_after_job, production_allocator
from bench.random_models import RESNET18_FILE, UNET_CONFIG, build_models, random_state
from bench.speed import STAGES
from conftest import ROOT, ffprobe
from musetalk_worker.device import cpu_has_native_bfloat16
from musetalk_worker.engines.musetalk import models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    return build_models(tmp_path_factory.mktemp("bench-models"), tiny=True)


def test_tiny_models_load_with_the_engine_loaders(tiny_models):
    cpu = torch.device("cpu")
    unet = models.load_unet(tiny_models, "v15", cpu, torch.float32)
    assert unet.config.in_channels == 8 and unet.config.cross_attention_dim == 384
    assert models.load_vae(tiny_models, cpu, torch.float32).config.scaling_factor == 0.18215
    encoder = models.load_audio_encoder(tiny_models, cpu)
    assert encoder.encoder.config.encoder_layers == 4 and encoder.extractor.feature_size == 80
    models.load_face_parser(tiny_models, cpu)
    # The ImageNet ResNet-18 upstream's BiSeNet starts from (in the weights lock too).
    from torchvision.models import resnet18

    backbone = torch.load(tiny_models / RESNET18_FILE, weights_only=True)
    resnet18(weights=None).load_state_dict(backbone)
    # Like the published file, the parser's checkpoint holds the auxiliary heads the loader drops.
    state = torch.load(tiny_models / models.FACE_PARSING_WEIGHTS, weights_only=True)
    assert state["conv_out16.conv.conv.weight"].shape == (64, 128, 3, 3)
    assert state["conv_out32.conv_out.weight"].shape == (19, 64, 1, 1)


def test_latentsync_folders_load_with_the_engine_loader(tmp_path):
    """``--latentsync``: each version's folder as the image holds it, loadable as a job loads it (strict keys)."""
    from musetalk_worker.engines.latentsync.models import LatentSyncModels
    from musetalk_worker.engines.latentsync.pipeline import RESOLUTIONS

    dest = build_models(tmp_path, tiny=True, latentsync=["1.5", "1.6"])
    for version in ("1.5", "1.6"):
        loaded = LatentSyncModels.load(dest / f"latentsync-{version}", torch.device("cpu"), torch.float32)
        assert loaded.resolution == RESOLUTIONS[version]
        assert loaded.unet.config.block_out_channels == (32, 64, 64, 64)
        assert loaded.audio.encoder.dims.n_audio_state == loaded.unet.config.cross_attention_dim == 384
        keep, size = loaded.mouth_mask().keep, loaded.resolution
        assert 0.5 < float(keep.mean()) < 0.95, "most of the face is kept"
        assert float(keep[0, 0, size * 3 // 4, size // 2]) == 0.0 == float(keep[0, 0, size // 4, size // 2]) - 1, \
            "the mouth is regenerated, the eyes kept"
    unet = dest / "latentsync-1.5" / "latentsync_unet.safetensors"
    before = unet.stat().st_mtime_ns
    build_models(dest, tiny=True, latentsync=["1.5"])
    assert unet.stat().st_mtime_ns == before, "a second build keeps what is there"
    with pytest.raises(ValueError, match="unknown LatentSync version"):
        build_models(dest, tiny=True, latentsync=["2.0"])


def test_models_are_cached_and_a_build_of_another_size_is_refused(tiny_models):
    unet_file = tiny_models / "musetalkV15" / "unet.pth"
    before = unet_file.stat().st_mtime_ns
    build_models(tiny_models, tiny=True)
    assert unet_file.stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="random models"):
        build_models(tiny_models, tiny=False)


def test_real_unet_config_has_musetalks_size_and_values_are_seeded():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNET_CONFIG)
    assert round(sum(p.numel() for p in unet.parameters()) / 1e6, 1) == 849.9
    shapes = {"a.weight": torch.Size([64, 32, 3, 3]), "a.bias": torch.Size([64]), "norm.weight": torch.Size([64])}
    first, other = random_state(shapes, 0), random_state(shapes, 1)
    again = random_state(dict(reversed(shapes.items())), 0)
    assert all(torch.equal(first[k], again[k]) for k in shapes)
    assert not torch.equal(first["a.weight"], other["a.weight"])
    assert abs(first["a.weight"].std().item() - (32 * 9) ** -0.5) < 0.005
    assert torch.equal(first["norm.weight"], torch.ones(64))


def test_media_has_the_requested_size_rate_and_length(tmp_path, media_dir):
    video, speech = make_job_media(tmp_path, width=96, height=160, seconds=1.2, fps=10)
    (stream,) = ffprobe(video)["streams"]
    assert (stream["width"], stream["height"], stream["r_frame_rate"]) == (96, 160, "10/1")
    assert int(stream["nb_read_frames"]) == 12
    (audio,) = ffprobe(speech)["streams"]
    assert (int(audio["sample_rate"]), audio["channels"]) == (16000, 1)
    assert abs(float(audio["duration"]) - 1.2) < 0.001
    # The pan makes consecutive frames differ.
    capture = cv2.VideoCapture(str(video))
    first, second = capture.read()[1], capture.read()[1]
    capture.release()
    assert (first != second).any()
    with pytest.raises(ValueError, match="even"):
        make_video(tmp_path / "odd.mp4", width=95, height=160, seconds=1, fps=10)


def test_speed_runs_end_to_end_and_reports_every_stage(tiny_models, tmp_path, media_dir):
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--models", str(tiny_models), "--device", "cpu", "--dtypes", "fp32,fp16",
         "--batch-sizes", "4", "--width", "128", "--height", "128", "--seconds", "0.5", "--fps", "10",
         "--threads", "1", "--repeat-with-cache", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    for _, label, _ in STAGES:
        assert f"| {label} |" in table
    assert "fp32 b4 (cache miss)" in table and "fp32 b4 (cache hit)" in table
    assert "logical cores" in table
    fp32, fp16 = json.loads(out.read_text())["reports"]
    if cpu_has_native_bfloat16():  # the engine's fp16 on this CPU is bfloat16
        assert "refused" not in fp16 and [r["frames"] for r in fp16["runs"]] == [5, 5]
    else:
        assert "refused" in fp16 and "n/a: fp16 on the CPU computes in bfloat16" in table
    miss, hit = fp32["runs"]
    assert (miss["cache_hit"], hit["cache_hit"]) == (False, True)
    assert miss["frames"] == 5 and {"unet", "vae_decode", "faces", "masks", "latents"} <= set(miss["timings"])
    assert "faces" not in hit["timings"]
    assert fp32["peak_rss_mib"] > fp32["rss_after_load_mib"] > 0


def test_the_production_allocator_is_what_the_last_stage_sets(tmp_path, monkeypatch):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM a AS build\nENV MALLOC_ARENA_MAX=8\nFROM b AS worker\n"
                          "ENV PATH=/x:$PATH \\\n    MALLOC_ARENA_MAX=2 \\\n    OTHER=1\n")
    assert production_allocator(dockerfile) == {"MALLOC_ARENA_MAX": "2"}
    # A child measured under a setting must not inherit another from this process.
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "4096")
    env = allocator_env({"MALLOC_ARENA_MAX": "2"})
    assert env["MALLOC_ARENA_MAX"] == "2" and "MALLOC_MMAP_THRESHOLD_" not in env and env["PATH"]


def test_the_after_job_verdict_judges_the_production_setting_only():
    def report(name, before, after_wait):
        return {"allocator": name, "settings": {}, "exit_code": 0, "frames": 300, "rss_before_mib": before,
                "rss_idle_mib": [[1.0, after_wait], [10.0, after_wait]]}

    passed, sentence = judge_after_job([report("mmap-fixed", 1000, 1500), report("production", 1000, 1060)], 64)
    assert passed and sentence.startswith("PASS") and "+60.0 MiB" in sentence
    passed, sentence = judge_after_job([report("production", 1000, 1070)], 64)
    assert not passed and sentence.startswith("FAIL") and "+70.0 MiB" in sentence
    assert judge_after_job([report("mmap-fixed", 1000, 1500)], 64)[0]
    assert not judge_after_job([{**report("production", 1000, 1000), "exit_code": 1}], 64)[0]


def test_memory_after_job_follows_rss_in_one_process(tiny_models, tmp_path, media_dir):
    # The verdict's tolerance is for the README's 300-frame job; a 5-frame job's RSS moves with the allocator's
    # free lists by tens of MiB, so this checks the measurement, not the verdict (judged in its own test).
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--after-job", "--models", str(tiny_models), "--allocators", "production",
         "--long", "0.5", "--fps", "10", "--width", "128", "--height", "128", "--batch-size", "4", "--threads", "1",
         "--idle", "0,0.2", "--tolerance-mib", "1024", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| production | no variables: the worker's own" in done.stdout and "logical cores" in done.stdout
    (report,) = json.loads(out.read_text())["reports"]
    assert report["frames"] == 5 and report["glibc_malloc"]
    assert report["job_peak_rss_mib"] >= report["rss_after_mib"] > 0 and report["rss_before_mib"] > 0
    assert [wait for wait, _ in report["rss_idle_mib"]] == [0, 0.2] and report["rss_after_trim_mib"] > 0


@pytest.fixture(scope="module")
def latentsync_models() -> Path:
    from bench.speed import latentsync_fixture_models

    models = latentsync_fixture_models()
    if not models.is_dir():
        pytest.skip("no LatentSync parity fixture under ../shared/parity/latentsync")
    return models


def test_speed_measures_latentsync(latentsync_models, tmp_path, media_dir):
    out = tmp_path / "speed.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.speed", "--model", "latentsync", "--device", "cpu", "--dtypes", "fp32",
         "--width", "128", "--height", "128", "--seconds", "1", "--fps", "10", "--steps", "1", "--guidance", "1",
         "--no-deepcache", "--threads", "1", "--repeat-with-cache", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "## LatentSync engine speed" in done.stdout
    assert "| fp32 1 steps g1 no DeepCache (cache miss) | fp32 1 steps g1 no DeepCache (cache hit) |" in done.stdout
    assert str(latentsync_models.resolve()) in done.stdout
    (report,) = json.loads(out.read_text())["reports"]
    miss, hit = report["runs"]
    assert (miss["cache_hit"], hit["cache_hit"]) == (False, True)
    assert miss["frames"] == hit["frames"] == 25
    assert {"faces", "generate", "paste", "encode", "cache"} <= set(miss["timings"])
    # The second job takes the aligned source from the cache: no face detection.
    assert "faces" not in hit["timings"] and "generate" in hit["timings"]


def test_memory_compares_two_latentsync_lengths(latentsync_models, tmp_path, media_dir):
    out = tmp_path / "memory.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", "--model", "latentsync", "--short", "0.7", "--long", "1", "--steps", "1",
         "--width", "128", "--height", "128", "--fps", "10", "--threads", "1", "--tolerance-percent", "50",
         "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "peak RSS ratio 1 s / 0.7 s" in done.stdout and "tolerance 50 %" in done.stdout
    short, long = json.loads(out.read_text())["reports"]
    assert (short["frames"], long["frames"]) == (17, 25)
    assert long["job_peak_rss_mib"] > long["rss_after_load_mib"] > 0


def test_images_per_call_counts_each_networks_arithmetic_per_image(tiny_models):
    """The decoder's counted GFLOP per image against its convolutions' multiply-adds summed by hand (forward
    hooks: 2 x output elements x input channels per group x kernel area), which are nearly all of it."""
    from bench.images_per_call import Measured, measure, render

    measured = measure(tiny_models, "cpu", [1, 2], repeats=1)
    assert set(measured.gflop_per_image) == set(measured.ms_per_image)
    assert all(v > 0 for v in measured.gflop_per_image.values())

    vae = models.load_vae(tiny_models, torch.device("cpu"), torch.float32)
    conv_flops = []

    def count(module, inputs, output):
        kernel = module.kernel_size[0] * module.kernel_size[1]
        conv_flops.append(2 * output.numel() * module.in_channels // module.groups * kernel)

    for module in vae.decoder.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    vae.post_quant_conv.register_forward_hook(count)
    with torch.inference_mode():
        vae.decode(torch.randn(1, 4, 32, 32))
    by_hand = sum(conv_flops) / 1e9
    assert by_hand == pytest.approx(measured.gflop_per_image["VAE decode"], rel=0.02)

    assert measured.dtypes == {name: "float32" for name in measured.ms_per_image}

    table = render(Measured({"VAE decode": {1: 100.0, 2: 50.0}, "face parsing (512x512)": {1: 50.0, 2: 60.0}},
                            {"VAE decode": 2.0, "face parsing (512x512)": 2.0},
                            {"VAE decode": "bfloat16", "face parsing (512x512)": "float32"}),
                   [1, 2], gemm={"bfloat16": 80.0, "float32": 400.0})
    # 2 GFLOP in 50 ms is 40 GFLOP/s: half of the bfloat16 matrix product's 80, a tenth of the float32 one's 400.
    assert "| VAE decode | 100.0 | **50.0** | 2.00 | 40 | 50% | — |" in table
    assert "| face parsing (512x512) | **50.0** | 60.0 | 2.00 | 40 | 10% | — |" in table


def test_measure_cold_start_starts_the_worker_and_times_a_job(tiny_models, tmp_path):
    """What ``bench/on_device.sh cold`` runs: the real handler.py served over HTTP, started and timed, one job."""
    env = {**os.environ, "MUSETALK_WEIGHTS_LOCK": "none", "MUSETALK_OUTPUT_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "scripts/measure_cold_start.py", "--models-dir", str(tiny_models), "--device", "cpu",
         "--landmarks", "dlib", "--local-input-dir", "examples", "--job", "test_input.json", "--runs", "1"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run, summary = (json.loads(line) for line in done.stdout.splitlines())
    assert run["ready_s"] > run["models_load_s"] > 0 and run["first_job_s"] > 0
    assert summary["runs"] == 1 and summary["ready_s_median"] == run["ready_s"]
    assert summary["ready_and_first_job_s_median"] == round(run["ready_s"] + run["first_job_s"], 2)
    assert summary["page_cache"] == "as found" and summary["device"].startswith("CPU")
    assert [p.suffix for p in tmp_path.iterdir()] == [".mp4"], "the job's video, written where it was told"
