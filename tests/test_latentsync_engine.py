"""The LatentSync engine end to end on a fixture's small random-weight models: the CLI, the engine, the worker
(beside MuseTalk, in one process) and ``handler.py --rp_serve_api``; real ffmpeg, real media, dlib landmarks.

The first LatentSync fixture folder (``../shared/parity/latentsync/ls-*``) serves as the LatentSync model folder;
its yaml trains at 64x64, which keeps these runs short. Parity with upstream is tested in
test_latentsync_denoise.py; here it is the engine's behaviour: lengths, rates, looping, faceless frames, seeds,
errors.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from conftest import ROOT, ffprobe
from latentsync_fixtures import fixture_dirs
from musetalk_worker.__main__ import main as cli
from musetalk_worker.errors import ErrorCode, LipSyncError
from musetalk_worker.options import EngineConfig, LatentSyncOptions, WorkerSettings
from musetalk_worker.worker import Worker
from servers import MOTO_KEY_ID, MOTO_SECRET, free_port, wait_until_serving

STEPS = 2  # the engine's flow, not its quality, is under test


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-v", "error", "-y", *args], check=True)


def _frames(path: Path) -> np.ndarray:
    """Every decoded frame of ``path`` (N, H, W, 3) RGB."""
    video = next(s for s in ffprobe(path)["streams"] if s["codec_type"] == "video")
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         check=True, capture_output=True).stdout
    return np.frombuffer(raw, np.uint8).reshape(-1, int(video["height"]), int(video["width"]), 3)


def _size(path: Path) -> int:
    video = next(s for s in ffprobe(path)["streams"] if s["codec_type"] == "video")
    return int(video["width"]) * int(video["height"])


@pytest.fixture(scope="module")
def latentsync_models() -> Path:
    folders = fixture_dirs()
    if not folders:
        pytest.skip("no LatentSync parity fixture (../shared/parity/latentsync/ls-*) to take models from")
    return folders[0] / "models"


@pytest.fixture(scope="module")
def both_models(fixture_models, latentsync_models, tmp_path_factory) -> Path:
    """A worker's models folder holding MuseTalk's fixture models and LatentSync 1.6 (links, nothing copied)."""
    folder = tmp_path_factory.mktemp("models")
    for entry in fixture_models.iterdir():
        (folder / entry.name).symlink_to(entry)
    (folder / "latentsync-1.6").symlink_to(latentsync_models)
    return folder


@pytest.fixture(scope="module")
def clips(media_dir, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("latentsync-clips")
    c = {name: d / name for name in ("face30.mp4", "speech.wav", "long_speech.wav", "gap.mp4", "noface.mp4",
                                     "short_speech.wav")}
    # 30 fps in, 25 fps out: the engine resamples as upstream's re-encode does.
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "0.5", "-an", "-r", "30", "-pix_fmt", "yuv420p",
            str(c["face30.mp4"]))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "0.72", str(c["speech.wav"]))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "1.3", str(c["long_speech.wav"]))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "0.2", str(c["short_speech.wav"]))
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "0.72", "-an", "-vf",
            "drawbox=x=0:y=0:w=iw:h=ih:color=black:t=fill:enable='between(n,2,5)'", "-pix_fmt", "yuv420p",
            "-crf", "12", str(c["gap.mp4"]))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=96x96:rate=25:duration=0.4", "-pix_fmt", "yuv420p",
            str(c["noface.mp4"]))
    return c


@pytest.fixture(scope="module")
def engine(latentsync_models):
    from musetalk_worker.engine import load_engine

    return load_engine("latentsync", EngineConfig(latentsync_models, device="cpu", landmarks="dlib"))


def test_cli_makes_25_fps_as_long_as_the_audio(latentsync_models, clips, tmp_path, capsys):
    out = tmp_path / "out.mp4"
    code = cli(["--source", str(clips["face30.mp4"]), "--audio", str(clips["speech.wav"]), "--out", str(out),
                "--models", str(latentsync_models), "--model", "latentsync", "--landmarks", "dlib", "--device", "cpu",
                "--steps", str(STEPS)])
    assert code == 0, capsys.readouterr().err
    streams = {s["codec_type"]: s for s in ffprobe(out)["streams"]}
    assert streams["video"]["r_frame_rate"] == "25/1"
    # 0.72 s of speech is 18 frames (two chunks: 16 and 2); the 0.5 s source (12 frames at 25 fps) loops.
    assert int(streams["video"]["nb_read_frames"]) == 18
    assert abs(float(streams["audio"]["duration"]) - 0.72) < 0.05
    assert "18 frames at 25.000 fps" in capsys.readouterr().out


def test_the_cli_refuses_another_models_option(latentsync_models, clips, tmp_path, capsys):
    code = cli(["--source", str(clips["face30.mp4"]), "--audio", str(clips["speech.wav"]), "--out",
                str(tmp_path / "x.mp4"), "--models", str(latentsync_models), "--model", "latentsync",
                "--bbox-shift", "5"])
    assert code == 2
    assert "'bbox_shift' is not an option of model 'latentsync'" in capsys.readouterr().err


def test_same_seed_same_video_and_another_seed_another(engine, clips, tmp_path):
    def run(name: str, seed: int) -> np.ndarray:
        engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / name, LatentSyncOptions(steps=STEPS, seed=seed))
        return _frames(tmp_path / name)

    first, again, other = run("a.mp4", 7), run("b.mp4", 7), run("c.mp4", 8)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_still_image_source(engine, clips, media_dir, tmp_path):
    result = engine(media_dir / "yongen.jpeg", clips["speech.wav"], tmp_path / "still.mp4",
                    LatentSyncOptions(steps=STEPS, guidance=1.0))
    video = next(s for s in ffprobe(tmp_path / "still.mp4")["streams"] if s["codec_type"] == "video")
    assert result.frames == int(video["nb_read_frames"]) == 18 and result.source_frames == 1
    assert (result.fps_fraction, result.model, result.version) == ("25/1", "latentsync", "1.6")


def test_frames_without_a_face_pass_through(engine, clips, tmp_path):
    result = engine(clips["gap.mp4"], clips["speech.wav"], tmp_path / "gap_out.mp4",
                    LatentSyncOptions(steps=STEPS, deepcache=False))
    assert result.frames_without_face == 4 and result.frames == 18
    frames = _frames(tmp_path / "gap_out.mp4")
    source = _frames(clips["gap.mp4"])
    # The black frames come out black; the frames with a face were changed around the mouth.
    assert frames[2:6].max() <= 16
    changed = np.abs(frames[8].astype(int) - source[8].astype(int)).max()
    assert changed > 30


def test_output_loops_over_a_short_source_for_long_speech(engine, clips, tmp_path):
    result = engine(clips["face30.mp4"], clips["long_speech.wav"], tmp_path / "loop.mp4",
                    LatentSyncOptions(steps=1, guidance=1.0))
    at_25 = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clips["face30.mp4"]), "-vf", "fps=25", "-f",
                            "rawvideo", "-pix_fmt", "gray", "-"], check=True, capture_output=True).stdout
    # 1.3 s of speech at 25 fps, ping-pong over the source's frames at 25 fps (ffmpeg's fps filter counts them).
    assert result.source_frames == len(at_25) // _size(clips["face30.mp4"]) < 32
    assert result.frames == 32


def test_no_face_anywhere_is_no_face(engine, clips, tmp_path):
    with pytest.raises(LipSyncError) as caught:
        engine(clips["noface.mp4"], clips["speech.wav"], tmp_path / "none.mp4", LatentSyncOptions(steps=1))
    assert caught.value.code is ErrorCode.NO_FACE
    assert not (tmp_path / "none.mp4").exists()


def test_an_fp16_job_on_the_cpu_computes_in_bfloat16_close_to_float32(engine, clips, tmp_path):
    """As MuseTalk's: on a CPU with bfloat16 in hardware ``fp16`` runs every network in bfloat16, within the
    GPU's half-precision bound of the float32 job (>= 35 dB per frame)."""
    import torch

    from musetalk_worker.device import cpu_has_native_bfloat16

    if not cpu_has_native_bfloat16():
        pytest.skip("this CPU has no bfloat16 in hardware (AMX or AVX512-BF16): fp16 jobs are refused on it")
    options = LatentSyncOptions(steps=STEPS)
    engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / "f32.mp4", options)
    engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / "bf16.mp4", dataclasses.replace(options, fp16=True))
    models = engine.models(options.version, torch.bfloat16)
    assert {p.dtype for net in (models.unet, models.vae) for p in net.parameters()} == {torch.bfloat16}
    full, half = _frames(tmp_path / "f32.mp4"), _frames(tmp_path / "bf16.mp4")
    assert len(full) == len(half) > 0
    psnr = [10 * np.log10(255.0**2 / max(np.mean((a.astype(float) - b.astype(float)) ** 2), 1e-12))
            for a, b in zip(full, half)]
    assert min(psnr) >= 35.0, psnr
    assert not np.array_equal(full, half), "it computed in another precision"


def test_an_fp16_job_is_refused_on_a_cpu_without_bfloat16(engine, clips, tmp_path, monkeypatch):
    """No such CPU here: the capability check is replaced; the refusal is the engine's own."""
    from musetalk_worker import device

    monkeypatch.setattr(device, "cpu_has_native_bfloat16", lambda: False)
    with pytest.raises(LipSyncError, match="bfloat16, which needs a CPU with it in hardware") as caught:
        engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / "x.mp4", LatentSyncOptions(fp16=True))
    assert (caught.value.code, caught.value.stage) == (ErrorCode.INVALID_INPUT, "validate")


@pytest.fixture(scope="module")
def worker(both_models, clips, tmp_path_factory) -> Worker:
    settings = WorkerSettings(models_dir=both_models, device="cpu", landmarks="dlib", weights_lock=None,
                              temp_dir=tmp_path_factory.mktemp("scratch"), output_dir=tmp_path_factory.mktemp("out"),
                              local_input_dir=clips["speech.wav"].parent)
    loaded = Worker.start(settings)
    assert loaded.load_error is None
    return loaded


def _local_job(clips: dict, **options) -> dict:
    return {"source": "face30.mp4", "audio": "speech.wav", **options}


def test_musetalk_and_latentsync_jobs_in_one_worker(worker, clips):
    latentsync = worker.run(_local_job(clips, model="latentsync", steps=STEPS), "ls-1")
    musetalk = worker.run(_local_job(clips), "mt-1")
    assert "error" not in latentsync, latentsync
    assert "error" not in musetalk, musetalk
    assert (latentsync["model"], latentsync["version"], latentsync["fps_fraction"]) == ("latentsync", "1.6", "25/1")
    assert (musetalk["model"], musetalk["version"]) == ("musetalk", "v15")
    assert set(worker.engines) == {"musetalk", "latentsync"}
    assert list(worker.settings.temp_dir.iterdir()) == []


def test_a_streamed_latentsync_job(worker, clips, moto_s3):
    moto_s3.bucket("ls-results")
    streaming = Worker(dataclasses.replace(
        worker.settings, allow_private_urls=True, bucket_endpoint_url=moto_s3.endpoint,
        bucket_access_key_id=MOTO_KEY_ID, bucket_secret_access_key=MOTO_SECRET, bucket_name="ls-results",
        bucket_region="us-east-1"), engines=worker.engines)
    result = streaming.run(_local_job(clips, model="latentsync", steps=1, output={"stream": True}), "ls-stream")
    assert "error" not in result, result
    assert result["delivery"] == "s3" and result["frames"] == 18
    frames = subprocess.run(["ffprobe", "-v", "error", "-live_start_index", "0", "-select_streams", "v:0",
                             "-count_frames", "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0",
                             result["stream_url"]], capture_output=True, text=True, check=True).stdout
    assert int(frames.split()[0]) == 18 and result["stream_segments"] >= 2


@pytest.mark.parametrize("options, code, text", [
    ({"model": "latentsync", "batch_size": 4}, "invalid_input", "'batch_size' is not an option of model 'latentsync'"),
    ({"model": "latentsync", "version": "v15"}, "invalid_input", "model 'latentsync' has the versions 1.6, 1.5"),
    ({"version": "1.6"}, "invalid_input", "model 'musetalk' has the versions v15, v1"),
    ({"steps": 5}, "invalid_input", "'steps' is not an option of model 'musetalk'"),
    ({"model": "wav2lip"}, "invalid_input", "'model' is 'wav2lip'; it must be one of musetalk, latentsync"),
    ({"model": "latentsync", "guidance": 9.0}, "invalid_input", "'guidance' is 9.0; it must be a number from 1.0"),
    ({"model": "latentsync", "version": "1.5"}, "models_missing",
     "LatentSync 1.5 is not installed"),
], ids=["musetalk option", "musetalk version", "latentsync version", "latentsync option", "unknown model",
        "guidance range", "version not in the image"])
def test_bad_latentsync_jobs(worker, clips, options, code, text):
    result = worker.run(_local_job(clips, **options), "bad")
    assert result.get("error_code") == code, result
    assert text in result["error"]
    if code == "models_missing":
        assert "WEIGHT_COMPONENTS=default,latentsync-1.5" in result["error"]


def test_handler_serves_both_models(both_models, clips, tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "BUCKET_", "RUNPOD_"))}
    env.update(MUSETALK_MODELS_DIR=str(both_models), MUSETALK_DEVICE="cpu", MUSETALK_LANDMARKS="dlib",
               MUSETALK_TEMP_DIR=str(tmp_path / "scratch"), MUSETALK_OUTPUT_DIR=str(tmp_path / "outputs"),
               MUSETALK_LOCAL_INPUT_DIR=str(clips["speech.wav"].parent), MUSETALK_WEIGHTS_LOCK="none",
               MUSETALK_PRELOAD_MODELS="musetalk,latentsync")
    server = subprocess.Popen([sys.executable, str(ROOT / "handler.py"), "--rp_serve_api", "--rp_api_port",
                               str(port)], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://localhost:{port}"
    try:
        wait_until_serving(base, server)
        speech = base64.b64encode(clips["speech.wav"].read_bytes()).decode()
        job = {"source": "face30.mp4", "audio": f"data:audio/wav;base64,{speech}"}
        # LatentSync makes 25 fps; MuseTalk keeps the source's 30.
        for extra, model, rate in (({"model": "latentsync", "steps": STEPS}, "latentsync", "25/1"),
                                   ({}, "musetalk", "30/1")):
            done = requests.post(f"{base}/runsync", json={"input": {**job, **extra}}, timeout=300).json()
            assert done["status"] == "COMPLETED", done
            assert (done["output"]["model"], done["output"]["fps_fraction"]) == (model, rate)
    finally:
        server.terminate()
        server.communicate(timeout=30)
    assert list((tmp_path / "scratch").iterdir()) == []


def test_the_local_http_api_serves_latentsync(both_models, clips, tmp_path):
    """``python -m musetalk_worker.serve`` takes LatentSync's options as form strings, typed by the job schema."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "BUCKET_", "RUNPOD_"))}
    env.update(MUSETALK_WEIGHTS_LOCK="none", MUSETALK_TEMP_DIR=str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    server = subprocess.Popen([sys.executable, "-m", "musetalk_worker.serve", "--models", str(both_models),
                               "--landmarks", "dlib", "--device", "cpu", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while not _answers(f"{base}/health"):
            assert server.poll() is None and time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.5)
        files = {name: (clips[key].name, clips[key].read_bytes())
                 for name, key in (("source", "face30.mp4"), ("audio", "speech.wav"))}
        done = requests.post(f"{base}/generate", files=files, timeout=300,
                             data={"model": "latentsync", "steps": "1", "guidance": "1.0", "seed": "3"})
        assert done.status_code == 200, done.text
        result = json.loads(done.headers["X-Lipsync-Result"])
        assert (result["model"], result["frames"], result["fps_fraction"]) == ("latentsync", 18, "25/1")
        refused = requests.post(f"{base}/generate", files=files, timeout=60,
                                data={"model": "latentsync", "bbox_shift": "3"})
        assert refused.status_code == 422
        assert "'bbox_shift' is not an option of model 'latentsync'" in refused.json()["error"]
    finally:
        server.terminate()
        server.communicate(timeout=60)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def _written_frames(engine, clips, tmp_path, monkeypatch, name: str, **options) -> np.ndarray:
    """The raw frames the job hands the encoder (the mp4 itself is lossy)."""
    from musetalk_worker.engines.latentsync import pipeline as pipeline_module

    frames = []
    real = pipeline_module.VideoEncoder.write
    monkeypatch.setattr(pipeline_module.VideoEncoder, "write",
                        lambda self, frame: frames.append(frame.copy()) or real(self, frame))
    engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / f"{name}.mp4",
           LatentSyncOptions(steps=1, guidance=1.0, **options))
    monkeypatch.undo()
    return np.stack(frames)


def test_face_restoration_on_latentsync_faces(engine, clips, tmp_path, monkeypatch):
    # GFPGAN's real architecture at 64 px with random weights (test_restoration's), in place of the 512 px release.
    from test_restoration import _tiny_restorer

    with pytest.raises(LipSyncError) as missing:
        engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / "x.mp4", LatentSyncOptions(restore=True))
    assert missing.value.code is ErrorCode.MODELS_MISSING and "WEIGHT_COMPONENTS=default,gfpgan" in str(missing.value)
    engine.restorer = _tiny_restorer()
    try:
        plain = _written_frames(engine, clips, tmp_path, monkeypatch, "plain")
        zero = _written_frames(engine, clips, tmp_path, monkeypatch, "zero", restore=True, restore_weight=0.0)
        restored = _written_frames(engine, clips, tmp_path, monkeypatch, "restored", restore=True)
        again = _written_frames(engine, clips, tmp_path, monkeypatch, "again", restore=True)
        mouth = _written_frames(engine, clips, tmp_path, monkeypatch, "mouth", restore=True, restore_region="mouth")
    finally:
        engine.restorer = None
    np.testing.assert_array_equal(zero, plain)
    np.testing.assert_array_equal(again, restored)
    changed = np.any(restored != plain, axis=3)
    assert changed.any(axis=(1, 2)).all(), "every frame (all have a face) is restored"
    rows, cols = np.nonzero(changed.any(axis=0))
    # The face lies in the middle of the frame; nothing near its edges changes.
    assert rows.min() > 0.1 * plain.shape[1] and cols.min() > 0.1 * plain.shape[2]
    assert np.any(mouth != plain) and not np.any((mouth != plain).any(axis=3) & ~changed)


# ----------------------------------------------------------------------------- avatars (the avatar cache)

def test_the_avatar_cache_keeps_the_aligned_source_and_its_id_replays_it(engine, latentsync_models, clips,
                                                                         tmp_path):
    from musetalk_worker.avatar_cache import ENGINE_FILE
    from musetalk_worker.engine import load_engine

    cached = load_engine("latentsync", EngineConfig(latentsync_models, device="cpu", landmarks="dlib",
                                                    cache_dir=tmp_path / "avatars"))
    options = LatentSyncOptions(steps=1, guidance=1.0)
    # 0.2 s of speech needs 5 of the source's frames; the entry keeps them all (the 18-frame jobs use them all).
    first = cached(clips["face30.mp4"], clips["short_speech.wav"], tmp_path / "first.mp4", options)
    again = cached(clips["face30.mp4"], clips["speech.wav"], tmp_path / "again.mp4", options)
    by_id = cached(None, clips["speech.wav"], tmp_path / "by_id.mp4", options, avatar_id=first.avatar_id)
    plain = engine(clips["face30.mp4"], clips["speech.wav"], tmp_path / "plain.mp4", options)

    assert (first.cache_hit, again.cache_hit, by_id.cache_hit, plain.cache_hit) == (False, True, True, None)
    assert len(first.avatar_id) == 40 and again.avatar_id == by_id.avatar_id == first.avatar_id
    assert first.source_frames == again.source_frames == by_id.source_frames == plain.source_frames > 5
    assert "faces" in first.timings and "faces" not in again.timings and "faces" not in by_id.timings
    entry = tmp_path / "avatars" / first.avatar_id
    assert (entry / ENGINE_FILE).read_text() == "latentsync"
    # Frames and alignment from the entry make the same video as a source prepared in the job.
    assert np.array_equal(_frames(tmp_path / "by_id.mp4"), _frames(tmp_path / "plain.mp4"))
    assert np.array_equal(_frames(tmp_path / "again.mp4"), _frames(tmp_path / "plain.mp4"))
    assert (by_id.width, by_id.height, by_id.frames) == (plain.width, plain.height, 18)


def test_a_corrupted_entry_is_prepared_again_and_an_avatar_of_another_size_is_refused(latentsync_models, clips,
                                                                                       tmp_path):
    from musetalk_worker.engine import load_engine
    from musetalk_worker.engines.latentsync.source import FRAMES_FILE, INDEX_FILE

    cached = load_engine("latentsync", EngineConfig(latentsync_models, device="cpu", landmarks="dlib",
                                                    cache_dir=tmp_path / "avatars"))
    options = LatentSyncOptions(steps=1, guidance=1.0)
    made = cached(clips["face30.mp4"], clips["short_speech.wav"], tmp_path / "a.mp4", options)
    entry = tmp_path / "avatars" / made.avatar_id
    with (entry / FRAMES_FILE).open("r+b") as frames:
        frames.seek(100)
        frames.write(b"\xff\x00\xff")
    again = cached(clips["face30.mp4"], clips["short_speech.wav"], tmp_path / "b.mp4", options)
    assert (again.cache_hit, again.avatar_id) == (False, made.avatar_id)

    index = json.loads((entry / INDEX_FILE).read_text())
    index["meta"] = {"resolution": 256, "version": "1.5"}  # as LatentSync 1.5 would have prepared it
    (entry / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(LipSyncError) as other_size:
        cached(None, clips["short_speech.wav"], tmp_path / "c.mp4", options, avatar_id=made.avatar_id)
    assert other_size.value.code is ErrorCode.INVALID_INPUT
    assert "was prepared with LatentSync 1.5 (256-pixel faces); 'version' 1.6 works at 64" in str(other_size.value)
    assert entry.is_dir()


def test_avatar_ids_through_the_worker_and_across_the_two_models(both_models, clips, tmp_path):
    settings = WorkerSettings(models_dir=both_models, device="cpu", landmarks="dlib", weights_lock=None,
                              temp_dir=tmp_path / "scratch", output_dir=tmp_path / "out",
                              local_input_dir=clips["speech.wav"].parent, avatar_cache_dir=tmp_path / "avatars")
    worker = Worker.start(settings)
    assert worker.load_error is None
    latentsync = worker.run(_local_job(clips, model="latentsync", steps=1), "ls-made")
    musetalk = worker.run(_local_job(clips), "mt-made")
    assert "error" not in latentsync and "error" not in musetalk, (latentsync, musetalk)
    replayed = worker.run({"avatar_id": latentsync["avatar_id"], "audio": "speech.wav", "model": "latentsync",
                           "steps": 1}, "ls-again")
    assert "error" not in replayed, replayed
    assert replayed["avatar_cache_hit"] is True and replayed["frames"] == 18

    crossed = [worker.run({"avatar_id": latentsync["avatar_id"], "audio": "speech.wav"}, "mt-crossed"),
               worker.run({"avatar_id": musetalk["avatar_id"], "audio": "speech.wav", "model": "latentsync"},
                          "ls-crossed")]
    assert [c.get("error_code") for c in crossed] == ["invalid_input", "invalid_input"], crossed
    assert "was prepared by model 'latentsync', not 'musetalk'" in crossed[0]["error"]
    assert "was prepared by model 'musetalk', not 'latentsync'" in crossed[1]["error"]
    # A refused id leaves the other model's entry as it was.
    assert {p.name for p in (tmp_path / "avatars").iterdir() if not p.name.startswith(".")} == {
        latentsync["avatar_id"], musetalk["avatar_id"]}
    assert list((tmp_path / "scratch").iterdir()) == []
