"""Avatars by id: a job's result names its prepared source, and a later job may send that id instead.

In process, on the parity fixture's random-weight models (dlib, CPU), with a real
avatar cache folder and a loopback HTTP server that counts the source's downloads.
"""

from __future__ import annotations

import base64
import copy
import dataclasses
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest

from musetalk_worker.options import WorkerSettings
from musetalk_worker.worker import Worker


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def _frames(path: Path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"],
                          capture_output=True, check=True).stdout


@pytest.fixture(scope="module")
def media(media_dir, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("avatar-media")
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-t", "0.24", "-an", "-c:v", "libx264", str(d / "face.mp4"))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "0.2", str(d / "speech.wav"))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-ss", "1", "-t", "0.2", str(d / "other.wav"))
    return {p.stem: p for p in d.iterdir()}


@pytest.fixture(scope="module")
def worker(fixture_models, tmp_path_factory) -> Worker:
    loaded = Worker.start(WorkerSettings(
        models_dir=fixture_models, device="cpu", landmarks="dlib", weights_lock=None,
        temp_dir=tmp_path_factory.mktemp("scratch"), output_dir=tmp_path_factory.mktemp("out"),
        allow_private_urls=True, avatar_cache_dir=tmp_path_factory.mktemp("avatars"),
    ))
    assert loaded.load_error is None
    return loaded


@pytest.fixture(scope="module")
def urls(http_server, media) -> dict:
    return {name: http_server.add(f"/{name}", path.read_bytes()) for name, path in media.items()}


def _inline(path: Path) -> str:
    return "data:audio/wav;base64," + base64.b64encode(path.read_bytes()).decode()


def _ok(result: dict) -> dict:
    assert "error" not in result, result
    return result


def _refused(result: dict, *fragments: str) -> None:
    assert result.get("error_code") == "invalid_input", result
    for fragment in fragments:
        assert fragment in result["error"], result["error"]


def test_avatar_id_round_trip(worker, urls, media, http_server):
    first = _ok(worker.run({"source": urls["face"], "audio": _inline(media["speech"])}, "first"))
    avatar_id = first["avatar_id"]
    assert re.fullmatch(r"[0-9a-f]{40}", avatar_id) and first["avatar_cache_hit"] is False
    downloads = http_server.hits["/face"]

    second = _ok(worker.run({"avatar_id": avatar_id, "audio": _inline(media["speech"])}, "second"))
    assert http_server.hits["/face"] == downloads, "a job by avatar id downloads no source"
    assert (second["avatar_id"], second["avatar_cache_hit"]) == (avatar_id, True)
    assert (second["frames"], second["fps_fraction"], second["width"], second["height"]) == \
        (first["frames"], first["fps_fraction"], first["width"], first["height"])
    assert not {"faces", "latents", "masks"} & set(second["timings"]), "nothing is prepared again"
    assert _frames(Path(second["video_path"])) == _frames(Path(first["video_path"])), \
        "the same avatar and speech give the same video, by id or by source"

    other = _ok(worker.run({"avatar_id": avatar_id, "audio": _inline(media["other"])}, "other-speech"))
    assert _frames(Path(other["video_path"])) != _frames(Path(first["video_path"]))
    assert list(worker.settings.temp_dir.iterdir()) == []


def test_an_avatar_of_a_still_image_takes_the_jobs_fps(worker, media_dir):
    image = "data:image/png;base64," + base64.b64encode((media_dir / "monalisa.png").read_bytes()).decode()
    speech = "data:audio/wav;base64," + base64.b64encode(_cut_speech(media_dir, 0.4)).decode()
    first = _ok(worker.run({"source": image, "audio": speech, "fps": 5}, "image"))
    again = _ok(worker.run({"avatar_id": first["avatar_id"], "audio": speech, "fps": 10}, "image-again"))
    assert (first["frames"], again["frames"]) == (2, 4)
    assert again["fps"] == 10.0 and again["avatar_cache_hit"] is True


def _cut_speech(media_dir: Path, seconds: float) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(media_dir / "eng.wav"), "-t", str(seconds),
                           "-f", "wav", "pipe:1"], capture_output=True, check=True).stdout


@pytest.mark.parametrize("job, fragments", [
    ({"source": "FACE", "avatar_id": "0" * 40}, ["'source' and 'avatar_id' were both given"]),
    ({}, ["'source' is required", "'avatar_id'"]),
    ({"avatar_id": "0" * 40, "bbox_shift": 5, "parsing_mode": "raw"},
     ["'bbox_shift', 'parsing_mode' cannot change with 'avatar_id'", "send the 'source'"]),
    ({"avatar_id": "../../etc/passwd"}, ["'avatar_id' is", "the avatar_id of an earlier job's result"]),
    ({"avatar_id": "0" * 40}, ["is not in the avatar cache", "evicted", "Send the 'source' again"]),
])
def test_bad_avatar_jobs_name_the_fields(worker, urls, media, job, fragments):
    job = {k: urls["face"] if v == "FACE" else v for k, v in job.items()}
    result = worker.run({**job, "audio": _inline(media["speech"])}, "bad-avatar")
    _refused(result, *fragments)
    assert list(worker.settings.temp_dir.iterdir()) == []


def test_avatar_id_needs_a_cache(worker, media):
    uncached = Worker(dataclasses.replace(worker.settings, avatar_cache_dir=None), engines={"musetalk": _engine_without_cache(worker)})
    result = uncached.run({"avatar_id": "0" * 40, "audio": _inline(media["speech"])}, "no-cache")
    _refused(result, "'avatar_id' needs an avatar cache", "MUSETALK_AVATAR_CACHE_DIR")


def _engine_without_cache(worker: Worker):
    """The same loaded models, without the avatar cache (no second load)."""
    uncached = copy.copy(worker.engines["musetalk"])
    uncached.cache = None
    return uncached


def test_a_job_without_a_cache_returns_no_avatar_id(worker, urls, media):
    uncached = Worker(dataclasses.replace(worker.settings, avatar_cache_dir=None), engines={"musetalk": _engine_without_cache(worker)})
    result = _ok(uncached.run({"source": urls["face"], "audio": _inline(media["speech"])}, "no-id"))
    assert "avatar_id" not in result and result["avatar_cache_hit"] is None
    assert np.isfinite(result["timings"]["total"])
