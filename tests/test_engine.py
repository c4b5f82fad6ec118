"""The engine end to end on real media, with the parity fixture's random-weight models.

Real ffmpeg, real dlib landmarks (they find the drawn face in yongen.mp4), real
model architectures with random weights: the generated mouths are noise, which
is fine for checking timing, lengths, blending regions and error handling.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import cv2
import librosa
import numpy as np
import pytest
import torch

from conftest import ffprobe
from musetalk_worker import MuseTalkOptions, ErrorCode, LipSyncError
from musetalk_worker.engines.musetalk import boxes as box_math
from musetalk_worker.decode import load_audio, probe
from musetalk_worker.engines.musetalk.pipeline import MuseTalkPipeline


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def _frames(path: Path) -> np.ndarray:
    """All frames of a (short) video as BGR arrays."""
    info = probe(path)
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"],
        capture_output=True, check=True,
    ).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


def _streams(path: Path) -> dict:
    info = ffprobe(path)
    return {s["codec_type"]: s for s in info["streams"]}


@pytest.fixture(scope="module")
def pipeline(fixture_models) -> MuseTalkPipeline:
    torch.manual_seed(0)
    return MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib")


@pytest.fixture(scope="module")
def clips(tmp_path_factory, media_dir) -> dict:
    """Real test media cut short (every output frame costs about a CPU second here)."""
    d = tmp_path_factory.mktemp("clips")
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "2", "-c:v", "libx264", "-crf", "16", str(d / "video2s.mp4"))
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "1", "-c:v", "libx264", "-crf", "16", str(d / "video1s.mp4"))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "2", str(d / "speech2s.wav"))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "0.5", str(d / "speech05s.wav"))
    _ffmpeg("-i", str(media_dir / "yongen.wav"), "-t", "0.5", str(d / "stereo48k05s.wav"))
    return {p.stem: p for p in d.iterdir()}


def test_real_video_two_seconds(pipeline, clips, tmp_path):
    out = tmp_path / "out.mp4"
    result = pipeline(clips["video2s"], clips["speech2s"], out, MuseTalkOptions())
    audio_seconds = len(load_audio(probe(clips["speech2s"]))) / 16000
    streams = _streams(out)
    expected_frames = int(np.floor(audio_seconds * 25))
    assert int(streams["video"]["nb_read_frames"]) == expected_frames == result.frames
    assert streams["video"]["r_frame_rate"] == "25/1"
    assert abs(float(streams["audio"]["duration"]) - audio_seconds) < 0.05
    assert result.frames_without_face == 0
    assert set(result.timings) >= {"decode", "faces", "latents", "masks", "unet", "vae_decode", "blend", "encode"}

    source, output = _frames(clips["video2s"]), _frames(out)
    assert output.shape[1:] == source.shape[1:]
    detection = pipeline.faces.detect([source[10]])[0]
    box = box_math.with_margin(box_math.face_box(detection.landmarks, detection.detector_box), 10, source.shape[1])
    (sx1, sy1, sx2, sy2) = box_math.clip_box(box_math.blend_square(box)[0], source.shape[2], source.shape[1])
    difference = np.abs(output[10].astype(int) - source[10].astype(int)).max(axis=2)
    x1, y1, x2, y2 = box
    lower_face = difference[(y1 + y2) // 2 : y2, x1:x2]
    outside = np.ones_like(difference, bool)
    outside[sy1:sy2, sx1:sx2] = False
    # Random weights make a noise mouth under a random mask: count clearly changed pixels, not their mean.
    assert (lower_face > 25).mean() > 0.05, "the mouth region should be replaced by the generated face"
    assert (difference[outside] > 25).mean() < 0.002
    # Outside the blend square only codec noise remains (two lossy encodes at crf 16-18).
    assert _psnr(output[10][outside], source[10][outside]) > 38


def test_still_image_source_at_chosen_fps(pipeline, clips, media_dir, tmp_path):
    out = tmp_path / "still.mp4"
    result = pipeline(media_dir / "yongen.jpeg", clips["speech05s"], out, MuseTalkOptions(fps=30))
    streams = _streams(out)
    assert streams["video"]["r_frame_rate"] == "30/1"
    assert int(streams["video"]["nb_read_frames"]) == 15 == result.frames
    assert result.source_frames == 1


def test_ntsc_frame_rate_is_kept_exactly(pipeline, clips, tmp_path):
    source = tmp_path / "ntsc.mp4"
    _ffmpeg("-i", str(clips["video1s"]), "-vf", "fps=30000/1001", "-t", "0.3", "-c:v", "libx264", str(source))
    assert probe(source).fps == Fraction(30000, 1001)
    out = tmp_path / "ntsc_out.mp4"
    result = pipeline(source, clips["speech05s"], out, MuseTalkOptions())
    streams = _streams(out)
    assert streams["video"]["r_frame_rate"] == "30000/1001"
    assert int(streams["video"]["nb_read_frames"]) == 14 == result.frames  # floor(0.5 s x 29.97)
    assert result.source_frames < result.frames, "the short source is played forwards and backwards"


def test_stereo_48k_audio_becomes_16k_mono_like_librosa(pipeline, clips, media_dir, tmp_path):
    samples = load_audio(probe(clips["stereo48k05s"]))
    reference, _ = librosa.load(clips["stereo48k05s"], sr=16000)
    assert samples.shape == reference.shape
    np.testing.assert_allclose(samples, reference, atol=1e-5)
    out = tmp_path / "stereo.mp4"
    result = pipeline(media_dir / "yongen.jpeg", clips["stereo48k05s"], out, MuseTalkOptions())
    streams = _streams(out)
    assert int(streams["video"]["nb_read_frames"]) == 12 == result.frames
    assert abs(float(streams["audio"]["duration"]) - 0.5) < 0.05


def test_frames_without_a_face_pass_through(pipeline, clips, tmp_path):
    source = tmp_path / "gap.mp4"
    _ffmpeg("-i", str(clips["video1s"]), "-vf", "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(n,4,7)'",
            "-t", "0.48", "-c:v", "libx264", "-crf", "16", str(source))
    out = tmp_path / "gap_out.mp4"
    result = pipeline(source, clips["speech05s"], out, MuseTalkOptions())
    assert result.frames == 12 and result.source_frames == 12 and result.frames_without_face == 4
    output = _frames(out)
    assert len(output) == 12
    assert output[4:8].max() < 20, "blank source frames come out blank"
    source_frames = _frames(source)
    for i in (3, 8):
        assert np.abs(output[i].astype(int) - source_frames[i].astype(int)).max() > 40, "frames with a face are synced"


def test_generation_starts_before_the_source_is_prepared(pipeline, clips, tmp_path):
    # 12 frames in batches of one: preparation may run only a few batches ahead of generation
    # (the reading thread's short queue), so the first generated batch comes long before the last
    # prepared frame, instead of after the whole prepare pass.
    events: list[tuple[str, int, int]] = []
    result = pipeline(clips["video1s"], clips["speech05s"], tmp_path / "overlap.mp4", MuseTalkOptions(batch_size=1),
                      progress=lambda stage, done, total: events.append((stage, done, total)))
    assert result.frames == 12 and result.source_frames == 12
    first_generated = next(i for i, (stage, done, _) in enumerate(events) if stage == "generate" and done > 0)
    last_prepared = max(i for i, (stage, done, _) in enumerate(events) if stage == "prepare" and done == 12)
    assert first_generated < last_prepared, events
    prepared_by_then = max(done for stage, done, _ in events[:first_generated] if stage == "prepare")
    assert prepared_by_then <= 6, f"{prepared_by_then} of 12 frames were prepared before the first batch was generated"


def test_precomputed_boxes_skip_detection_and_the_run_is_deterministic(pipeline, clips, media_dir, tmp_path):
    options = MuseTalkOptions(boxes=[(217, 283, 465, 523)])
    outputs = []
    for name in ("a.mp4", "b.mp4"):
        pipeline(media_dir / "yongen.jpeg", clips["speech05s"], tmp_path / name, options)
        outputs.append(_frames(tmp_path / name))
    np.testing.assert_array_equal(outputs[0], outputs[1])
    image = cv2.imread(str(media_dir / "yongen.jpeg"))
    assert np.abs(outputs[0][5, 400:533, 217:465].astype(int) - image[400:533, 217:465].astype(int)).mean() > 5


def test_a_source_without_any_face_is_an_error(pipeline, clips, tmp_path):
    source = tmp_path / "noface.mp4"
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:s=320x240:r=25:d=0.4", "-c:v", "libx264", str(source))
    with pytest.raises(LipSyncError) as caught:
        pipeline(source, clips["speech05s"], tmp_path / "never.mp4", MuseTalkOptions())
    assert caught.value.code == ErrorCode.NO_FACE
    assert "no face" in str(caught.value)
    assert not (tmp_path / "never.mp4").exists()


def test_an_encoder_failure_reaches_the_caller(pipeline, clips, media_dir, tmp_path):
    # ffmpeg cannot write to a folder: the blend/encode thread fails and the job must say so, not hang.
    with pytest.raises(LipSyncError) as caught:
        pipeline(media_dir / "yongen.jpeg", clips["speech05s"], tmp_path, MuseTalkOptions(batch_size=2))
    assert caught.value.code == ErrorCode.INTERNAL and "ffmpeg failed to encode" in str(caught.value)
    assert tmp_path.is_dir()


@pytest.mark.parametrize("which", ["audio_as_source", "not_media"])
def test_bad_media_is_a_clear_error(pipeline, clips, tmp_path, which):
    if which == "audio_as_source":
        source, audio = clips["speech05s"], clips["speech05s"]
    else:
        source = tmp_path / "notes.txt"
        source.write_text("these bytes are not a video\n" * 50)
        audio = clips["speech05s"]
    with pytest.raises(LipSyncError) as caught:
        pipeline(source, audio, tmp_path / "never.mp4", MuseTalkOptions())
    assert (caught.value.code, caught.value.stage) == (ErrorCode.UNSUPPORTED_MEDIA, "probe")
    if which == "audio_as_source":
        assert "'source' is an audio file with no picture" in str(caught.value)
    else:
        assert source.name in str(caught.value)


def test_probed_inputs_are_checked_but_not_probed_again(pipeline, clips, tmp_path, probe_calls):
    # The worker probes once and hands the MediaInfo pair on; the engine must still refuse a bad pair.
    speech = probe(clips["speech05s"])  # this module's own probe, not the spy
    with pytest.raises(LipSyncError) as caught:
        pipeline(speech, speech, tmp_path / "never.mp4", MuseTalkOptions())
    assert caught.value.code == ErrorCode.UNSUPPORTED_MEDIA and "'source' is an audio file" in str(caught.value)
    assert probe_calls == []


def test_cli_reports_a_bad_input_in_one_line(fixture_models, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "musetalk_worker", "--source", str(tmp_path / "missing.mp4"), "--audio", "x.wav",
         "--out", str(tmp_path / "o.mp4"), "--models", str(fixture_models), "--landmarks", "dlib", "--device", "cpu"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode != 0
    assert proc.stderr.strip().count("\n") == 0
    assert "missing.mp4" in proc.stderr and "does not exist" in proc.stderr


def test_version_1_loads_its_own_unet_and_defaults(fixture_models, clips, media_dir, tmp_path):
    # MuseTalk 1.0's layout: musetalk/musetalk.json + musetalk/pytorch_model.bin (the fixture's UNet stands in).
    models = tmp_path / "models"
    models.mkdir()
    for part in fixture_models.iterdir():
        (models / part.name).symlink_to(part)
    (models / "musetalk").mkdir()
    (models / "musetalk" / "musetalk.json").symlink_to(fixture_models / "musetalkV15" / "musetalk.json")
    (models / "musetalk" / "pytorch_model.bin").symlink_to(fixture_models / "musetalkV15" / "unet.pth")
    resolved = MuseTalkOptions(version="v1").resolved()
    assert (resolved.extra_margin, resolved.parsing_mode) == (0, "raw")

    pipe = MuseTalkPipeline.from_models(models, device="cpu", landmarks="dlib", versions=("v1",))
    out = tmp_path / "v1.mp4"
    result = pipe(media_dir / "yongen.jpeg", clips["speech05s"], out, MuseTalkOptions(version="v1", bbox_shift=-5))
    assert result.frames == 12 and int(_streams(out)["video"]["nb_read_frames"]) == 12
    with pytest.raises(LipSyncError) as caught:
        MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib", versions=("v1",))
    assert caught.value.code == ErrorCode.MODELS_MISSING and "musetalk/" in str(caught.value)


def test_an_fp16_job_on_the_cpu_computes_in_bfloat16_close_to_float32(pipeline, clips, tmp_path):
    """On a CPU with bfloat16 in hardware, ``fp16`` runs the UNet and VAE in bfloat16, with the GPU's bound
    against the float32 job (>= 35 dB per frame)."""
    from musetalk_worker.device import cpu_has_native_bfloat16

    if not cpu_has_native_bfloat16():
        pytest.skip("this CPU has no bfloat16 in hardware (AMX or AVX512-BF16): fp16 jobs are refused on it")
    options = MuseTalkOptions(batch_size=4)
    full = pipeline(clips["video1s"], clips["speech05s"], tmp_path / "f32.mp4", options)
    half = pipeline(clips["video1s"], clips["speech05s"], tmp_path / "bf16.mp4", dataclasses.replace(options, fp16=True))
    assert half.frames == full.frames
    assert next(pipeline.vae(torch.bfloat16).parameters()).dtype == torch.bfloat16
    frames = list(zip(_frames(tmp_path / "f32.mp4"), _frames(tmp_path / "bf16.mp4")))
    assert frames and all(_psnr(a, b) >= 35.0 for a, b in frames)
    assert any(not np.array_equal(a, b) for a, b in frames)  # it did compute in another precision


def test_an_fp16_job_is_refused_on_a_cpu_without_bfloat16(pipeline, clips, tmp_path, monkeypatch):
    """No such CPU here: the capability check is replaced, the refusal is the engine's own."""
    from musetalk_worker import device

    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: False)
    with pytest.raises(LipSyncError, match="bfloat16, which needs a CPU with it in hardware") as caught:
        pipeline(clips["video1s"], clips["speech05s"], tmp_path / "x.mp4", MuseTalkOptions(fp16=True))
    assert caught.value.code == ErrorCode.INVALID_INPUT


@pytest.mark.gpu
def test_a_cuda_float16_job_matches_the_cpu_job(pipeline, fixture_models, clips, tmp_path):
    """The GPU path end to end (device blending, pinned copies, three threads, CUDA event timings)
    against the CPU float32 job, with the GPU bound of the parity README (>= 35 dB)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU on this machine: the GPU path cannot run here")
    gpu = MuseTalkPipeline.from_models(fixture_models, device="cuda", landmarks="dlib")
    options = MuseTalkOptions(batch_size=4)
    cpu_result = pipeline(clips["video1s"], clips["speech05s"], tmp_path / "cpu.mp4", options)
    half = dataclasses.replace(options, fp16=True)
    gpu_result = gpu(clips["video1s"], clips["speech05s"], tmp_path / "gpu.mp4", half)
    assert gpu_result.frames == cpu_result.frames
    assert {"unet", "vae_decode", "blend", "paste", "encode"} <= set(gpu_result.timings)
    for cpu_frame, gpu_frame in zip(_frames(tmp_path / "cpu.mp4"), _frames(tmp_path / "gpu.mp4")):
        assert _psnr(cpu_frame, gpu_frame) >= 35.0
