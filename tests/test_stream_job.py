"""Streamed jobs end to end: the worker publishes HLS to a real S3 (moto_server) while the video is made.

In process, on the parity fixture's random-weight models (dlib, CPU). A thread
watches the bucket during the job, so "segments appear before the job ends"
is observed, not inferred.
"""

from __future__ import annotations

import base64
import dataclasses
import subprocess
import threading
import time
from pathlib import Path

import pytest
import requests

from bench.stream import BucketWatcher  # the benchmark's watcher: the test observes the bucket the same way
from musetalk_worker.options import WorkerSettings
from musetalk_worker.worker import Worker
from servers import MOTO_KEY_ID, MOTO_SECRET


def _wav(media_dir: Path, seconds: float) -> str:
    data = subprocess.run(["ffmpeg", "-v", "error", "-i", str(media_dir / "eng.wav"), "-t", str(seconds),
                           "-f", "wav", "pipe:1"], capture_output=True, check=True).stdout
    return "data:audio/wav;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def inputs(media_dir) -> dict:
    # A still image at 10 fps: 3 s of speech make 30 frames, four segments (0.5, 1, 1, 0.5 s).
    face = "data:image/png;base64," + base64.b64encode((media_dir / "monalisa.png").read_bytes()).decode()
    return {"source": face, "audio": _wav(media_dir, 3.0), "fps": 10, "batch_size": 2}


@pytest.fixture(scope="module")
def worker(fixture_models, moto_s3, tmp_path_factory) -> Worker:
    moto_s3.bucket("results")
    loaded = Worker.start(WorkerSettings(
        models_dir=fixture_models, device="cpu", landmarks="dlib", weights_lock=None,
        temp_dir=tmp_path_factory.mktemp("scratch"), output_dir=None, allow_private_urls=True,
        bucket_endpoint_url=moto_s3.endpoint, bucket_access_key_id=MOTO_KEY_ID,
        bucket_secret_access_key=MOTO_SECRET, bucket_name="results", bucket_region="us-east-1",
    ))
    assert loaded.load_error is None
    return loaded


def _frames(url_or_path: str, *options: str) -> int:
    out = subprocess.run(["ffprobe", "-v", "error", *options, "-select_streams", "v:0", "-count_frames",
                          "-show_entries", "stream=nb_read_frames", "-of", "csv=p=0", url_or_path],
                         capture_output=True, text=True, check=True).stdout
    return int(out.split()[0])


def test_a_streamed_job_publishes_hls_while_it_runs(worker, inputs, moto_s3, tmp_path):
    reports: list[dict] = []
    job = dict(inputs, output={"stream": True, "expires_in": 600})
    with BucketWatcher(moto_s3.client(), "results", "musetalk/streamed/") as watcher:
        result = worker.run(job, "streamed", reports.append)
        finished = time.monotonic()
    assert "error" not in result, result

    # The complete mp4 is still delivered, and the stream decodes to the same frames.
    assert result["delivery"] == "s3" and result["frames"] == 30
    video = tmp_path / "full.mp4"
    video.write_bytes(requests.get(result["video_url"], timeout=30).content)
    assert _frames(str(video)) == 30
    assert result["stream_key"] == "musetalk/streamed/index.m3u8"
    assert _frames(result["stream_url"], "-live_start_index", "0") == 30

    playlist = requests.get(result["stream_url"], timeout=30).text
    assert "#EXT-X-PLAYLIST-TYPE:EVENT" in playlist and playlist.rstrip().endswith("#EXT-X-ENDLIST")
    assert result["stream_segments"] == playlist.count("#EXTINF") >= 3

    # Segments were in the bucket before the job ended, and progress said where to play them.
    segments = sorted(key for key in watcher.seen if key.endswith(".m4s"))
    assert len(segments) == result["stream_segments"]
    assert watcher.seen[segments[0]] < finished - 0.5, "the first segment was public well before the job ended"
    announced = [r for r in reports if r.get("stage") == "streaming"]
    assert [r["stream_url"] for r in announced] == [result["stream_url"]]
    assert reports.index(announced[0]) < reports.index({"stage": "upload"})
    assert 0 < result["timings"]["first_segment"] < result["timings"]["total"]
    assert list(worker.settings.temp_dir.iterdir()) == []


def test_stream_without_a_bucket_is_refused(worker, inputs):
    bucketless = Worker(dataclasses.replace(worker.settings, bucket_name=None, output_dir=None),
                        engines=worker.engines)
    result = bucketless.run(dict(inputs, output={"stream": True}), "no-bucket")
    assert (result["error_code"], result["stage"]) == ("invalid_input", "validate"), result
    assert "'output.stream' needs a bucket" in result["error"]
    assert list(worker.settings.temp_dir.iterdir()) == []


def test_a_failed_segment_upload_fails_the_job(worker, inputs, moto_s3):
    # The bucket does not exist: the first segment's upload fails, and the job stops with it.
    result = worker.run(dict(inputs, output={"bucket": "no-such-bucket", "stream": True}), "bad-bucket")
    assert (result["error_code"], result["stage"]) == ("upload_failed", "upload"), result
    assert "could not publish the stream" in result["error"] and "s3://no-such-bucket/" in result["error"]
    assert MOTO_SECRET not in result["error"]
    assert list(worker.settings.temp_dir.iterdir()) == []
    # The worker goes on.
    assert "error" not in worker.run(dict(inputs), "after-bad-bucket")


def test_a_cancelled_stream_leaves_nothing_behind(worker, inputs, moto_s3):
    cancel = threading.Event()

    def report(value: dict) -> None:
        if value.get("stage") == "streaming":
            cancel.set()  # as RunPod's stop signal would, once the first segment is public

    result = worker.run(dict(inputs, output={"stream": True}), "cancelled", report, cancel)
    assert result["error_code"] == "cancelled", result
    left = moto_s3.client().list_objects_v2(Bucket="results", Prefix="musetalk/cancelled").get("Contents", [])
    assert left == [], "a cancelled job's segments, playlist and video are removed"
    assert list(worker.settings.temp_dir.iterdir()) == []
