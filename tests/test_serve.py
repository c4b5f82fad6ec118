"""The self-hosted HTTP API (``python -m musetalk_worker.serve``) against a real uvicorn on loopback.

One server for the module (the parity fixture's small random-weight models,
dlib, CPU, one job waiting at most, 1 MiB per upload); jobs are kept to a few
output frames. The token and bind checks start servers of their own that are
never left to load their models. The shutdown test runs last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

import pytest
import requests

from adapter_helpers import make_adapter
from conftest import ROOT, ffprobe
from servers import free_port

EXAMPLES = ROOT / "examples"
UPLOAD_LIMIT = 1024 * 1024


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@dataclasses.dataclass
class Media:
    face: Path  # the project's sample still image
    speech: Path  # 0.4 s of the sample speech: 2 frames at 5 fps
    short_speech: Path  # 0.2 s: 5 frames of a 25 fps video
    video: Path  # 0.2 s of a face video, 25 fps
    long_speech: Path  # the whole sample (2.29 s), for the job a client walks away from
    big: Path  # over the upload limit


@pytest.fixture(scope="module")
def media(media_dir, tmp_path_factory) -> Media:
    d = tmp_path_factory.mktemp("media")
    m = Media(EXAMPLES / "face.jpg", d / "speech.wav", d / "short.wav", d / "face.mp4", EXAMPLES / "speech.wav",
              d / "big.wav")
    _ffmpeg("-i", str(EXAMPLES / "speech.wav"), "-t", "0.4", str(m.speech))
    _ffmpeg("-i", str(EXAMPLES / "speech.wav"), "-t", "0.2", str(m.short_speech))
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "0.2", "-an", "-pix_fmt", "yuv420p", str(m.video))
    m.big.write_bytes(os.urandom(UPLOAD_LIMIT + 1))
    return m


@dataclasses.dataclass
class Server:
    base: str
    process: subprocess.Popen
    scratch: Path
    log: Path

    def post(self, files: dict, data: Optional[dict] = None, **kwargs) -> requests.Response:
        opened = {name: (Path(path).name, Path(path).read_bytes()) for name, path in files.items()}
        return requests.post(f"{self.base}/generate", files=opened, data=data or {}, timeout=300, **kwargs)

    def wait_for_empty_scratch(self, timeout_s: float = 30) -> None:
        """The request folders go after the response is sent: give that a moment."""
        deadline = time.monotonic() + timeout_s
        while list(self.scratch.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert list(self.scratch.iterdir()) == []


def _serve_env(tmp: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "BUCKET_", "RUNPOD_"))}
    env.update(MUSETALK_WEIGHTS_LOCK="none", MUSETALK_TEMP_DIR=str(tmp), PYTHONUNBUFFERED="1", **extra)
    return env


def _start(models: Path, tmp: Path, *args: str, **env: str) -> tuple[subprocess.Popen, Path]:
    log = tmp.parent / f"{tmp.name}.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "musetalk_worker.serve", "--models", str(models), "--landmarks", "dlib",
         "--device", "cpu", *args], cwd=ROOT, env=_serve_env(tmp, **env), stdout=log.open("w"),
        stderr=subprocess.STDOUT)
    return process, log


def _wait_until(url: str, process: subprocess.Popen, ok: int = 200, timeout_s: float = 300, **kwargs) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if requests.get(url, timeout=2, **kwargs).status_code == ok:
                return
        except requests.ConnectionError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, "the server did not get ready"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def server(fixture_models, tmp_path_factory) -> Iterator[Server]:
    scratch = tmp_path_factory.mktemp("scratch")
    port = free_port()
    process, log = _start(fixture_models, scratch, "--port", str(port), "--queue", "1",
                          MUSETALK_MAX_DOWNLOAD_BYTES=str(UPLOAD_LIMIT))
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until(f"{base}/health", process)
        yield Server(base, process, scratch, log)
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)


def _result(response: requests.Response) -> dict:
    return json.loads(response.headers["X-Lipsync-Result"])


def _frames(video: bytes, tmp_path: Path) -> int:
    path = tmp_path / "got.mp4"
    path.write_bytes(video)
    streams = ffprobe(path)["streams"]
    assert any(s["codec_type"] == "audio" for s in streams)
    return int(next(s for s in streams if s["codec_type"] == "video")["nb_read_frames"])


def test_index_describes_models_options_and_limits(server):
    assert requests.get(f"{server.base}/health", timeout=5).json() == {"status": "ok"}
    index = requests.get(f"{server.base}/", timeout=5).json()
    assert index["ready"] and index["models"]["musetalk"]["loaded"]
    assert index["models"]["musetalk"]["options"]["batch_size"] == {"type": ["integer"], "default": 8,
                                                                    "range": [1, 256]}
    assert "steps" in index["models"]["latentsync"]["options"]
    assert index["limits"]["file_bytes"] == UPLOAD_LIMIT and index["limits"]["waiting_jobs"] == 1


def test_still_image_round_trip(server, media, tmp_path):
    response = server.post({"source": media.face, "audio": media.speech}, {"fps": "5"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "video/mp4"
    result = _result(response)
    # 0.4 s of audio at 5 fps; the form's "5" became the number 5.
    assert result["frames"] == 2 and result["fps"] == 5.0 and result["model"] == "musetalk"
    assert "video_path" not in result and result["size_bytes"] == len(response.content)
    assert _frames(response.content, tmp_path) == 2
    server.wait_for_empty_scratch()


def test_video_round_trip(server, media, tmp_path):
    response = server.post({"source": media.video, "audio": media.short_speech}, {"batch_size": "4", "crf": "30"})
    assert response.status_code == 200, response.text
    assert _result(response)["frames"] == 5 and _result(response)["fps_fraction"] == "25/1"
    assert _frames(response.content, tmp_path) == 5
    server.wait_for_empty_scratch()


def _pictures(video: bytes, tmp_path: Path) -> bytes:
    """The decoded frames (raw BGR): pictures to compare, not container bytes."""
    path = tmp_path / "pictures.mp4"
    path.write_bytes(video)
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24",
                           "pipe:1"], capture_output=True, check=True).stdout


def test_an_uploaded_adapter_changes_the_video_and_a_bad_one_is_refused(server, media, fixture_models, tmp_path):
    lora = make_adapter(fixture_models, tmp_path / "lora")
    plain = server.post({"source": media.face, "audio": media.speech}, {"fps": "5"})
    adapted = [server.post({"source": media.face, "audio": media.speech, "adapter": lora}, {"fps": "5"})
               for _ in range(2)]
    assert [r.status_code for r in (plain, *adapted)] == [200, 200, 200], [r.text for r in (plain, *adapted)]
    assert _result(adapted[0])["frames"] == 2
    base, first, second = (_pictures(r.content, tmp_path) for r in (plain, *adapted))
    # The adapter's LoRA is on for its jobs (the second one from the worker's cache) and off for the others.
    assert first == second and first != base

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    # A schema refusal is 422; a file the engine cannot read is bad input found later, 400.
    refusals = [
        ({"adapter": lora}, {"model": "latentsync"}, 422, "'adapter' works with model 'musetalk' only"),
        ({"adapter": broken}, {"fps": "5"}, 400, "adapter is not a readable safetensors file"),
        ({}, {"fps": "5", "adapter": "adapter.safetensors"}, 422, "'adapter' must be a file part (-F adapter=@file)"),
    ]
    for files, data, status, message in refusals:
        response = server.post({"source": media.face, "audio": media.speech, **files}, data)
        body = response.json()
        assert response.status_code == status and body["error_code"] == "invalid_input", body
        assert message in body["error"], body
    server.wait_for_empty_scratch()


@pytest.mark.parametrize("files, data, status, code, message", [
    ({"source": ROOT / "README.md", "audio": "speech"}, {}, 415, "unsupported_media",
     "'source.md' is not a media file ffmpeg can read"),
    ({"source": "face", "audio": "speech"}, {"batch_size": "eight"}, 422, "invalid_input",
     "'batch_size' is 'eight'; it must be a whole number from 1 to 256."),
    ({"source": "face", "audio": "speech"}, {"colour": "red"}, 422, "invalid_input",
     "unknown key 'colour'; allowed keys: source, avatar_id, audio, model"),
    ({"source": "face", "audio": "speech"}, {"steps": "10"}, 422, "invalid_input",
     "'steps' is not an option of model 'musetalk' (only of 'latentsync')"),
    ({"source": "face"}, {}, 422, "invalid_input", "'audio' is missing: send it as a file part"),
    ({"source": "face", "audio": "speech"}, {"output": "{}"}, 422, "invalid_input",
     "'output' cannot be set here"),
    ({"source": "face", "audio": "big"}, {}, 413, "too_large",
     "'audio' is over the 1 MiB limit per file (MUSETALK_MAX_DOWNLOAD_BYTES)"),
], ids=["not-media", "wrong-type", "unknown-option", "other-models-option", "missing-file", "output", "too-large"])
def test_bad_input_is_refused_with_its_status_and_message(server, media, files, data, status, code, message):
    named = {name: getattr(media, path) if isinstance(path, str) else path for name, path in files.items()}
    response = server.post(named, data)
    body = response.json()
    assert response.status_code == status and body["error_code"] == code, body
    assert message in body["error"] and set(body) == {"error", "error_code", "stage"}
    server.wait_for_empty_scratch()


def test_not_multipart_and_unknown_route(server):
    response = requests.post(f"{server.base}/generate", json={"source": "x"}, timeout=10)
    assert response.status_code == 400 and "send multipart/form-data" in response.json()["error"]
    missing = requests.get(f"{server.base}/nothing-here", timeout=10)
    assert missing.status_code == 404 and missing.json()["error_code"] == "not_found"


def test_two_concurrent_requests_are_both_served(server, media, tmp_path):
    responses: list = [None, None]

    def post(i: int) -> None:
        responses[i] = server.post({"source": media.face, "audio": media.speech}, {"fps": "5", "batch_size": "2"})

    threads = [threading.Thread(target=post, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert [_frames(r.content, tmp_path) for r in responses] == [2, 2]
    server.wait_for_empty_scratch()


def _request_bytes(server: Server, files: dict, data: dict) -> bytes:
    """A whole POST /generate as bytes, to send over a raw socket at the test's own pace."""
    opened = {name: (Path(path).name, Path(path).read_bytes()) for name, path in files.items()}
    prepared = requests.Request("POST", f"{server.base}/generate", files=opened, data=data).prepare()
    host = server.base.removeprefix("http://")
    head = ["POST /generate HTTP/1.1", f"Host: {host}", f"Content-Type: {prepared.headers['Content-Type']}",
            f"Content-Length: {len(prepared.body)}", "", ""]
    return "\r\n".join(head).encode() + prepared.body


def _connect(server: Server) -> socket.socket:
    host, port = server.base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def test_queue_full_is_429_with_retry_after(server, media):
    # Two uploads that stall half-way hold both places (the running job's and the one waiting).
    request = _request_bytes(server, {"source": media.face, "audio": media.speech}, {"fps": "5"})
    stalled = []
    for _ in range(2):
        sock = _connect(server)
        sock.sendall(request[: len(request) // 2])
        stalled.append(sock)
    try:
        deadline = time.monotonic() + 30
        while len(list(server.scratch.iterdir())) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        response = server.post({"source": media.face, "audio": media.speech}, {"fps": "5"})
        assert response.status_code == 429 and response.json()["error_code"] == "queue_full"
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        for sock in stalled:
            sock.close()
    # The abandoned uploads free their places and leave nothing behind.
    server.wait_for_empty_scratch()
    assert requests.get(f"{server.base}/health", timeout=5).status_code == 200


def test_client_disconnect_cancels_its_job(server, media):
    # batch_size 1: the job checks for cancellation after every frame.
    request = _request_bytes(server, {"source": media.face, "audio": media.long_speech},
                             {"fps": "5", "batch_size": "1"})
    sock = _connect(server)
    sock.sendall(request)
    try:
        # The worker's own scratch folder (job-*) inside the request's folder: the job is on the device.
        deadline = time.monotonic() + 60
        while not list(server.scratch.glob("serve-*/job-*")):
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.05)
        time.sleep(1)
    finally:
        sock.close()
    started = time.monotonic()
    server.wait_for_empty_scratch(timeout_s=60)
    cancelled_in_s = time.monotonic() - started
    log = server.log.read_text()
    assert "disconnected: cancelling it" in log and "job failed (cancelled" in log
    # 11 frames take far longer than the few frames a cancelled job still runs.
    assert cancelled_in_s < 15, cancelled_in_s
    response = server.post({"source": media.face, "audio": media.speech}, {"fps": "5"})
    assert response.status_code == 200


def test_non_loopback_bind_without_token_is_refused(fixture_models, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "musetalk_worker.serve", "--models", str(fixture_models),
                           "--host", "0.0.0.0"], cwd=ROOT, env=_serve_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a token" in proc.stderr and "--token" in proc.stderr


def test_with_a_token_a_request_without_it_is_401(fixture_models, tmp_path):
    port = free_port()
    # The token from the environment; the check comes before anything else, so the models need not load.
    process, _ = _start(fixture_models, tmp_path, "--port", str(port), MUSETALK_API_TOKEN="s3cret-token")
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until(f"{base}/health", process, ok=401, timeout_s=120)
        refused = requests.get(f"{base}/", timeout=5)
        assert refused.status_code == 401 and refused.json()["error_code"] == "unauthorized"
        assert refused.headers["WWW-Authenticate"] == "Bearer"
        wrong = requests.post(f"{base}/generate", headers={"Authorization": "Bearer nope"}, timeout=5)
        assert wrong.status_code == 401
        health = requests.get(f"{base}/health", headers={"Authorization": "Bearer s3cret-token"}, timeout=5)
        assert health.status_code in (200, 503) and health.json()["status"] in ("ok", "loading")
    finally:
        # Killed, not stopped: a graceful stop would wait for the models it is still loading.
        process.kill()
        process.wait(timeout=60)


def test_shutdown_stops_the_server(server):
    response = requests.post(f"{server.base}/shutdown", timeout=10)
    assert response.status_code == 202 and response.json() == {"status": "stopping"}
    assert server.process.wait(timeout=60) == 0
    assert list(server.scratch.iterdir()) == []
