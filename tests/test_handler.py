"""The serverless worker end to end, on the parity fixture's random-weight models:

* in process (one loaded engine shared by the module): HTTP, data: and s3:// inputs
  against loopback servers, results to moto's S3 read back through the presigned URL,
  every error code from a real bad input followed by a good job, no leftovers, no
  leaked secrets, and RunPod's result contract (``run_job``);
* as RunPod runs it: ``python handler.py --test_input`` and ``--rp_serve_api``.

Jobs are kept to one or a few output frames of small media: every frame costs CPU
seconds on the 2-core test machines.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import requests
from runpod.serverless.modules.rp_job import run_job

from conftest import ROOT, SHARED, ffprobe
from musetalk_worker.options import WorkerSettings
from musetalk_worker.worker import Worker
from servers import FileServer, MOTO_KEY_ID, MOTO_SECRET, drop_connection, free_port, wait_until_serving

JOB_KEY_ID = "AKIAJOBKEY0000000001"
JOB_SECRET = "job-secret-access-key-never-to-be-seen-42"


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@dataclasses.dataclass
class Clips:
    """Small media cut from ../shared/media or drawn by ffmpeg."""

    face_png: Path
    speech: Path
    face_video: Path
    long_speech: Path
    no_face: Path
    long_video: Path
    wide_png: Path
    garbage: Path


@pytest.fixture(scope="module")
def clips(media_dir, tmp_path_factory) -> Clips:
    d = tmp_path_factory.mktemp("clips")
    c = Clips(media_dir / "monalisa.png", d / "speech.wav", d / "face.mp4", d / "long.wav", d / "noface.mp4",
              d / "long_video.mp4", d / "wide.png", d / "garbage.mp4")
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "0.2", str(c.speech))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "3", str(c.long_speech))
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "0.2", "-an", "-pix_fmt", "yuv420p", str(c.face_video))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x64:rate=25:duration=0.4", "-pix_fmt", "yuv420p", str(c.no_face))
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=5:duration=6", "-pix_fmt", "yuv420p", str(c.long_video))
    _ffmpeg("-f", "lavfi", "-i", "color=c=gray:size=4000x16", "-frames:v", "1", str(c.wide_png))
    c.garbage.write_bytes(os.urandom(20_000))
    return c


@pytest.fixture(scope="module")
def settings(fixture_models, tmp_path_factory) -> WorkerSettings:
    return WorkerSettings(
        models_dir=fixture_models, device="cpu", landmarks="dlib",
        temp_dir=tmp_path_factory.mktemp("scratch"),
        allow_private_urls=True,  # every test server is on loopback
        output_dir=None, max_audio_s=2.0, max_source_s=5.0,
        weights_lock=None,  # the fixture's small models are not the locked files (see the lock test below)
    )


@pytest.fixture(scope="module")
def worker(settings) -> Worker:
    loaded = Worker.start(settings)
    assert loaded.load_error is None and loaded.fitness_problems() == []
    return loaded


@pytest.fixture(scope="module")
def served(http_server, clips) -> FileServer:
    for path, name in [(clips.face_png, "/face.png"), (clips.speech, "/speech.wav"), (clips.long_speech, "/long.wav"),
                       (clips.no_face, "/noface.mp4"), (clips.long_video, "/long_video.mp4"),
                       (clips.wide_png, "/wide.png"), (clips.garbage, "/garbage.mp4")]:
        http_server.add(name, path.read_bytes())
    http_server.route("/drop.png", drop_connection)
    return http_server


@pytest.fixture(scope="module")
def good(served, clips) -> dict:
    """One output frame: an image over HTTP, 0.2 s of speech inline, at 5 fps."""
    speech = base64.b64encode(clips.speech.read_bytes()).decode()
    return {"source": served.url("/face.png"), "audio": f"data:audio/wav;base64,{speech}", "fps": 5}


def _check_good(worker: Worker, good: dict, tmp_path: Path, job_id: str = "good") -> dict:
    """Runs the good job, checks the inline mp4 with ffprobe and that no scratch is left."""
    result = worker.run(good, job_id)
    assert "error" not in result, result
    assert result["delivery"] == "inline" and result["frames"] == 1 and result["fps"] == 5.0
    video = tmp_path / f"{job_id}.mp4"
    video.write_bytes(base64.b64decode(result["video_base64"]))
    stream = next(s for s in ffprobe(video)["streams"] if s["codec_type"] == "video")
    assert (stream["codec_name"], int(stream["nb_read_frames"])) == ("h264", 1)
    _assert_no_leftovers(worker)
    return result


def _assert_no_leftovers(worker: Worker) -> None:
    assert list(worker.settings.temp_dir.iterdir()) == []


def _assert_failed(result: dict, code: str, text: str, stage: str) -> None:
    assert isinstance(result.get("error"), str), result
    assert (result["error_code"], result["stage"]) == (code, stage), result
    assert text in result["error"], result["error"]


# ----------------------------------------------------------------------------- every error code, then a good job

BAD_JOBS = {
    "404 url": (lambda s, g: dict(g, source=s.url("/missing.png")), "download_failed", "answered HTTP 404", "download"),
    "dropped connection": (lambda s, g: dict(g, source=s.url("/drop.png")),
                           "download_failed", "after 3 attempts: connection failed", "download"),
    "bytes that are not media": (lambda s, g: dict(g, source=s.url("/garbage.mp4")),
                                 "unsupported_media", "is not a media file ffmpeg can read", "probe"),
    "audio as source": (lambda s, g: dict(g, source=s.url("/speech.wav")),
                        "unsupported_media", "'source' is an audio file with no picture", "probe"),
    "image as audio": (lambda s, g: dict(g, audio=s.url("/face.png")), "unsupported_media", "'audio' has no sound",
                       "probe"),
    "video with no face": (lambda s, g: dict(g, source=s.url("/noface.mp4")), "no_face", "no face was found",
                           "prepare"),
    "audio over the limit": (lambda s, g: dict(g, audio=s.url("/long.wav")),
                             "too_long", "'audio' is 3.0 s long; the limit is 2 s", "probe"),
    "source video over the limit": (lambda s, g: dict(g, source=s.url("/long_video.mp4")),
                                    "too_long", "'source' video is 6.0 s long; the limit is 5 s", "probe"),
    "source over the resolution limit": (lambda s, g: dict(g, source=s.url("/wide.png")),
                                         "invalid_input", "'source' is 4000x16; the largest allowed is 3840x3840",
                                         "probe"),
    "wrong type": (lambda s, g: dict(g, batch_size="8"), "invalid_input",
                   "'batch_size' is '8'; it must be a whole number from 1 to 256", "validate"),
    "unknown key": (lambda s, g: dict(g, speed=2), "invalid_input",
                    "unknown key 'speed'; allowed keys: source, avatar_id, audio, model, version", "validate"),
    "input not an object": (lambda s, g: "make it talk", "invalid_input", "must be a JSON object", "validate"),
    "oversize inline data": (lambda s, g: dict(g, audio="data:audio/wav;base64," + "A" * 4_300_000),
                             "invalid_input", "inline data is limited to 3.1 MB", "validate"),
    "unreachable bucket": (lambda s, g: dict(g, output={"bucket": "results", "credentials": {
        "endpoint_url": f"http://127.0.0.1:{free_port()}", "access_key_id": JOB_KEY_ID,
        "secret_access_key": JOB_SECRET}}), "upload_failed", "could not upload the result to s3://results/", "upload"),
}


@pytest.mark.parametrize("case", list(BAD_JOBS))
def test_bad_job_then_good_job(case, worker, served, good, tmp_path):
    make, code, text, stage = BAD_JOBS[case]
    result = worker.run(make(served, good), f"bad-{case.replace(' ', '-')}")
    _assert_failed(result, code, text, stage)
    assert "refresh_worker" not in result
    assert JOB_SECRET not in json.dumps(result)
    _assert_no_leftovers(worker)
    _check_good(worker, good, tmp_path)


def test_a_job_probes_each_input_once(worker, good, tmp_path, probe_calls):
    # The worker's probe stage probes both inputs; the engine takes its MediaInfo pair.
    result = _check_good(worker, good, tmp_path, "probe-once")
    assert sorted(path.stem for path in probe_calls) == ["audio", "source"], probe_calls
    assert "probe" in result["timings"]


def test_private_address_refused_without_the_setting(worker, good, tmp_path):
    strict = Worker(dataclasses.replace(worker.settings, allow_private_urls=False), engines=worker.engines)
    result = strict.run(good, "private")
    _assert_failed(result, "invalid_input", "resolves to 127.0.0.1, a private, loopback", "download")
    _assert_no_leftovers(strict)
    _check_good(worker, good, tmp_path)


def test_unexpected_failure_is_internal_and_survived(worker, good, tmp_path):
    # A real fault of the machine, not of the input: the scratch root is a file.
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")
    broken = Worker(dataclasses.replace(worker.settings, temp_dir=blocked), engines=worker.engines)
    result = broken.run(good, "internal")
    _assert_failed(result, "internal", "unexpected error in stage 'validate': FileExistsError", "validate")
    assert "retry the job" in result["error"] and "refresh_worker" not in result
    _check_good(worker, good, tmp_path)


class _OutOfMemoryEngine:
    """Stands in for the engine on a GPU that runs out of memory: no GPU exists here."""

    def __call__(self, source, audio, output, options, *, avatar_id=None, progress=None, workdir=None, hls=None):
        import torch

        progress("generate", 0, 10)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_asks_for_a_fresh_worker(worker, good, tmp_path):
    oom = Worker(worker.settings, engines={"musetalk": _OutOfMemoryEngine()})
    result = oom.run(good, "oom")
    _assert_failed(result, "out_of_memory", "ran out of memory in stage 'generate'; it will restart", "generate")
    assert result["refresh_worker"] is True
    _assert_no_leftovers(oom)
    # Through RunPod's own job runner, refresh_worker becomes stopPod and the job FAILS.
    via_sdk = asyncio.run(run_job(oom.handle, {"id": "oom-sdk", "input": good}))
    assert via_sdk["stopPod"] is True and isinstance(via_sdk["error"], str)
    assert via_sdk["output"] == {"error_code": "out_of_memory", "stage": "generate"}
    _check_good(worker, good, tmp_path)


def test_missing_weights_fail_the_fitness_check_and_every_job(settings, good, tmp_path):
    broken = Worker.start(dataclasses.replace(settings, models_dir=tmp_path / "empty"))
    assert not broken.engines and "is missing from" in broken.load_error
    with pytest.raises(RuntimeError, match="not fit to run: .*is missing from"):
        broken.check_fitness()
    _assert_failed(broken.run(good, "no-models"), "models_missing", "is missing from", "load")


def _fixture_lock(models_dir: Path, path: Path) -> Path:
    """A lock of the fixture's own model files (their real sizes and the hashes parity.json records)."""
    hashes = json.loads((models_dir.parent / "parity.json").read_text())["files"]
    components = {
        name: {"description": name, "files": [
            {"path": rel, "size": (models_dir / rel).stat().st_size, "sha256": hashes[f"models/{rel}"],
             "source": {"type": "url", "url": f"https://example.invalid/{rel}"}} for rel in files]}
        for name, files in {
            "v15": ["musetalkV15/unet.pth", "musetalkV15/musetalk.json"],
            "vae": ["sd-vae/config.json", "sd-vae/diffusion_pytorch_model.safetensors"],
            "whisper": ["whisper/config.json", "whisper/model.safetensors", "whisper/preprocessor_config.json"],
            "face_parsing": ["face-parse-bisent/79999_iter.pth", "face-parse-bisent/resnet18-5c106cde.pth"],
        }.items()
    }
    path.write_text(json.dumps({"format": 1, "default_components": list(components), "components": components}))
    return path


def test_the_models_folder_is_checked_against_the_lock_at_start(settings, good, tmp_path):
    # The project's lock describes the real weights; the fixture's files have other sizes.
    refused = Worker.start(dataclasses.replace(settings, weights_lock=ROOT / "weights.lock.json"))
    assert not refused.engines and "musetalkV15/unet.pth" in refused.load_error
    _assert_failed(refused.run(good, "wrong-weights"), "models_missing", "musetalkV15/unet.pth", "load")
    lock = _fixture_lock(settings.models_dir, tmp_path / "fixture.lock.json")
    accepted = Worker.start(dataclasses.replace(settings, weights_lock=lock, verify_weight_hashes=True))
    assert accepted.load_error is None and "musetalk" in accepted.engines


def test_expected_gpu_absent_fails_the_fitness_check(worker):
    # This machine really has no GPU: any device setting but cpu expects one.
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    expecting = Worker(dataclasses.replace(worker.settings, device="auto"), engines=worker.engines)
    with pytest.raises(RuntimeError, match=r"a GPU was expected \(MUSETALK_DEVICE=auto\) but CUDA sees none"):
        expecting.check_fitness()


def test_runpod_marks_failures_failed_with_a_string_error(worker):
    result = asyncio.run(run_job(worker.handle, {"id": "sdk-bad", "input": {"source": "x"}}))
    assert isinstance(result["error"], str) and "'audio' is required" in result["error"]
    assert result["output"] == {"error_code": "invalid_input", "stage": "validate"}
    assert "stopPod" not in result


# ----------------------------------------------------------------------------- S3 in and out

def test_s3_in_and_out_with_the_bucket_variables(worker, moto_s3, clips, tmp_path):
    client = moto_s3.client()
    moto_s3.bucket("inputs")
    moto_s3.bucket("results")
    client.upload_file(str(clips.face_video), "inputs", "clips/face.mp4")
    client.upload_file(str(clips.speech), "inputs", "clips/speech.wav")
    env = WorkerSettings.from_env({
        "BUCKET_ENDPOINT_URL": moto_s3.endpoint, "BUCKET_ACCESS_KEY_ID": MOTO_KEY_ID,
        "BUCKET_SECRET_ACCESS_KEY": MOTO_SECRET, "BUCKET_NAME": "results", "BUCKET_REGION": "us-east-1",
        "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/x/job-take",
    })
    s3_worker = Worker(dataclasses.replace(worker.settings, **{
        f.name: getattr(env, f.name) for f in dataclasses.fields(env) if f.name.startswith("bucket_")}),
        engines=worker.engines)
    reports: list[dict] = []
    result = s3_worker.run({"source": "s3://inputs/clips/face.mp4", "audio": "s3://inputs/clips/speech.wav",
                            "batch_size": 1}, "s3-job", reports.append)
    assert "error" not in result, result
    assert (result["delivery"], result["bucket"], result["key"]) == ("s3", "results", "musetalk/s3-job.mp4")
    assert (result["frames"], result["fps"], result["width"], result["height"]) == (5, 25.0, 704, 1216)
    assert set(result["timings"]) >= {"validate", "download", "probe", "upload", "unet", "encode", "total"}
    video = tmp_path / "from-presigned.mp4"
    video.write_bytes(requests.get(result["video_url"], timeout=30).content)
    assert video.stat().st_size == result["size_bytes"]
    probe = ffprobe(video)
    kinds = {s["codec_type"]: s for s in probe["streams"]}
    assert kinds["video"]["codec_name"] == "h264" and int(kinds["video"]["nb_read_frames"]) == 5
    assert "audio" in kinds and abs(float(probe["format"]["duration"]) - 0.2) < 0.1
    # Progress: every stage announced in order, generation in steps of at least 10 %.
    stages = [r["stage"] for r in reports if "percent" not in r]
    # Nothing after "upload": a late progress post could overtake the result (runpod-python#250).
    assert stages == ["validate", "download", "probe", "decode", "prepare", "generate", "encode", "upload"]
    percents = [r["percent"] for r in reports if "percent" in r]
    assert percents == [20, 40, 60, 80, 100]
    _assert_no_leftovers(s3_worker)


def test_job_credentials_are_used_and_never_leak(worker, moto_s3, clips, good, caplog, tmp_path):
    moto_s3.bucket("job-in")
    moto_s3.bucket("job-out")
    moto_s3.client().upload_file(str(clips.face_png), "job-in", "face.png")
    credentials = {"endpoint_url": moto_s3.endpoint, "access_key_id": JOB_KEY_ID, "secret_access_key": JOB_SECRET,
                   "region": "us-east-1"}
    job = dict(good, source="s3://job-in/face.png", output={"bucket": "job-out", "key": "mine.mp4",
                                                             "credentials": credentials})
    caplog.set_level(logging.DEBUG)
    result = worker.run(job, "creds")
    assert "error" not in result, result
    assert requests.get(result["video_url"], timeout=30).content[4:8] == b"ftyp"
    failed = worker.run(dict(job, source="s3://job-in/missing.png"), "creds-bad")
    _assert_failed(failed, "download_failed", "s3://job-in/missing.png does not exist", "download")
    for text in (json.dumps(result), json.dumps(failed), caplog.text):
        assert JOB_SECRET not in text
    # The key ID is not secret, but only the presigned URL (which must carry it) shows it.
    query = parse_qs(urlparse(result.pop("video_url")).query)
    assert query["X-Amz-Credential"][0].startswith(JOB_KEY_ID + "/")
    assert JOB_KEY_ID not in json.dumps(result) + json.dumps(failed)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and JOB_KEY_ID in r.getMessage()]
    _assert_no_leftovers(worker)


# ----------------------------------------------------------------------------- as RunPod runs it

def _handler_env(settings: WorkerSettings, tmp_path: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "BUCKET_", "RUNPOD_"))}
    env.update(MUSETALK_MODELS_DIR=str(settings.models_dir), MUSETALK_DEVICE="cpu", MUSETALK_LANDMARKS="dlib",
               MUSETALK_TEMP_DIR=str(tmp_path / "scratch"), MUSETALK_OUTPUT_DIR=str(tmp_path / "outputs"),
               MUSETALK_LOCAL_INPUT_DIR=str(SHARED), MUSETALK_WEIGHTS_LOCK="none", **extra)
    return env


def test_test_input_json_runs_a_real_job(settings, tmp_path):
    job = (ROOT / "test_input.json").read_text()
    # The shipped job names the sample in examples/, as scripts/run_example.sh allows it.
    env = dict(_handler_env(settings, tmp_path), MUSETALK_LOCAL_INPUT_DIR=str(ROOT / "examples"))
    # Run from another folder: nothing may depend on the working directory.
    proc = subprocess.run([sys.executable, str(ROOT / "handler.py"), "--test_input", job], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    video = tmp_path / "outputs" / "local_test.mp4"
    probe = ffprobe(video)
    stream = next(s for s in probe["streams"] if s["codec_type"] == "video")
    # examples/speech.wav is 2.2855 s; the still image runs at the job's 5 fps.
    assert stream["codec_name"] == "h264" and int(stream["nb_read_frames"]) == 11
    assert any(s["codec_type"] == "audio" for s in probe["streams"])
    assert list((tmp_path / "scratch").iterdir()) == []


def test_local_api_server(settings, clips, tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, str(ROOT / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port)], cwd=tmp_path,
        env=_handler_env(settings, tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://localhost:{port}"
    try:
        wait_until_serving(base, server)
        media = Path(os.path.relpath(clips.face_png, SHARED))
        speech = base64.b64encode(clips.speech.read_bytes()).decode()
        good = {"input": {"source": str(media), "audio": f"data:audio/wav;base64,{speech}", "fps": 5}}
        done = requests.post(f"{base}/runsync", json=good, timeout=300).json()
        assert done["status"] == "COMPLETED", done
        assert done["output"]["delivery"] == "local_file" and done["output"]["frames"] == 1
        assert ffprobe(Path(done["output"]["video_path"]))["streams"][0]["codec_name"] == "h264"
        bad = {"input": dict(good["input"], colour="red",
                             output={"bucket": "b-1", "credentials": {"access_key_id": JOB_KEY_ID,
                                                                      "secret_access_key": JOB_SECRET}})}
        failed = requests.post(f"{base}/runsync", json=bad, timeout=60).json()
        assert failed["status"] == "FAILED" and isinstance(failed["error"], str)
        assert "unknown key 'colour'" in failed["error"]
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=30)
    assert JOB_SECRET not in output and JOB_KEY_ID not in output
    assert list((tmp_path / "scratch").iterdir()) == []
