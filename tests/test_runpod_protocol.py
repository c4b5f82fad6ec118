"""RunPod's serverless protocol end to end: the real ``python handler.py`` worker loop
(runpod 1.12.0's ``JobScaler``) against the fake job server of ``runpod_job_server``,
on the parity fixture's random-weight models, on CPU.

* The end-of-job race (runpod-python#250, docs/streaming.md §1.4): in 20 jobs in a
  row, no progress update of a job reaches RunPod after that job's result.
* RunPod's per-job stop: a running job ends within about one batch, leaves no
  scratch folder and no result, and the next job runs normally.
* ``ProgressSender`` on its own: updates arrive in order and ``close`` waits for them.

One worker process serves the module (loading and warming the models costs seconds).
Jobs are a still image and a fraction of a second of speech: every frame costs CPU time.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path
from typing import Iterator

import pytest

from conftest import ROOT, ffprobe
from musetalk_worker.runpod_progress import ProgressSender
from runpod.serverless.modules import rp_http
from runpod_job_server import WORKER_ID, JobServer, Post

# Model loading and warm-up happen before the first job is taken.
FIRST_JOB_TIMEOUT_S = 300
JOB_TIMEOUT_S = 60
# A still image at 25 fps: 0.12 s of speech is 3 frames.
SHORT_SPEECH_S = 0.12
SHORT_FRAMES = 3
# The job that is stopped: 8 batches of 4 frames, so every batch is a >= 10 % progress step.
LONG_SPEECH_S = 3.2
LONG_FPS = 10
LONG_BATCH = 4


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


@dataclasses.dataclass
class RunningWorker:
    """``python handler.py`` taking jobs from ``server``; ``scratch_at_take`` lists MUSETALK_TEMP_DIR
    at the moment each job was handed out."""

    server: JobServer
    process: subprocess.Popen
    temp_dir: Path
    output_dir: Path
    log: Path
    scratch_at_take: dict[str, list[str]]

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


SHORT_JOB = {"source": "face.png", "audio": "short.wav"}
LONG_JOB = {"source": "face.png", "audio": "long.wav", "fps": LONG_FPS, "batch_size": LONG_BATCH}


@pytest.fixture(scope="module")
def worker(media_dir, fixture_models, tmp_path_factory) -> Iterator[RunningWorker]:
    root = tmp_path_factory.mktemp("runpod")
    inputs, temp_dir, output_dir = root / "inputs", root / "scratch", root / "outputs"
    for folder in (inputs, temp_dir, output_dir):
        folder.mkdir()
    _ffmpeg("-i", str(media_dir / "monalisa.png"), str(inputs / "face.png"))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", str(SHORT_SPEECH_S), str(inputs / "short.wav"))
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", str(LONG_SPEECH_S), str(inputs / "long.wav"))

    scratch_at_take: dict[str, list[str]] = {}
    server = JobServer(on_take=lambda job_id: scratch_at_take.setdefault(job_id, sorted(os.listdir(temp_dir))))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "BUCKET_", "RUNPOD_"))}
    env.update(server.env(), RUNPOD_SKIP_AUTO_SYSTEM_CHECKS="true", RUNPOD_SKIP_GPU_CHECK="true",
               RUNPOD_PING_INTERVAL="1000",
               MUSETALK_MODELS_DIR=str(fixture_models), MUSETALK_WEIGHTS_LOCK="none", MUSETALK_LANDMARKS="dlib",
               MUSETALK_DEVICE="cpu", MUSETALK_ALLOW_PRIVATE_URLS="true", MUSETALK_LOCAL_INPUT_DIR=str(inputs),
               MUSETALK_TEMP_DIR=str(temp_dir), MUSETALK_OUTPUT_DIR=str(output_dir))
    log = root / "worker.log"
    with log.open("w") as out:
        # Its own process group: the SDK's heartbeat runs in a child process that must go too.
        process = subprocess.Popen([sys.executable, str(ROOT / "handler.py")], cwd=root, env=env,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    running = RunningWorker(server, process, temp_dir, output_dir, log, scratch_at_take)
    try:
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        server.close()


def _result(worker: RunningWorker, job_id: str, timeout_s: float) -> Post:
    try:
        return worker.server.wait_for(lambda p: p.job_id == job_id and p.is_result, timeout_s)
    except TimeoutError:
        alive = "running" if worker.process.poll() is None else f"exited {worker.process.returncode}"
        pytest.fail(f"no result for {job_id} (worker {alive}); worker log:\n{worker.log_tail()}")


def _stages(posts: list[Post]) -> list[str]:
    """The stages in the order of their first progress update."""
    stages: list[str] = []
    for post in posts:
        if post.is_progress and post.body["output"]["stage"] not in stages:
            stages.append(post.body["output"]["stage"])
    return stages


def test_no_progress_update_arrives_after_the_result(worker):
    job_ids = [f"race-{n:02d}" for n in range(20)]
    for job_id in job_ids:
        worker.server.queue(job_id, SHORT_JOB)
    results = {}
    for n, job_id in enumerate(job_ids):
        results[job_id] = _result(worker, job_id, FIRST_JOB_TIMEOUT_S if n == 0 else JOB_TIMEOUT_S)
    # A late progress thread would post within milliseconds; wait well past that.
    time.sleep(1.0)

    late = {job_id: [p.body["output"] for p in worker.server.posts_of(job_id) if p.is_progress and p.t > result.t]
            for job_id, result in results.items()}
    late = {job_id: outputs for job_id, outputs in late.items() if outputs}
    assert not late, f"{len(late)} of {len(job_ids)} jobs got progress after their result: {late}"

    for job_id, result in results.items():
        assert "error" not in result.body and not result.is_stream, result.body
        output = result.body["output"]
        assert (output["delivery"], output["frames"], output["fps"]) == ("local_file", SHORT_FRAMES, 25.0), output
        assert Path(output["video_path"]) == worker.output_dir / f"{job_id}.mp4"
        assert Path(output["video_path"]).stat().st_size == output["size_bytes"]
        assert _stages(worker.server.posts_of(job_id))[:3] == ["validate", "download", "probe"]
    stream = next(s for s in ffprobe(worker.output_dir / "race-19.mp4")["streams"] if s["codec_type"] == "video")
    assert int(stream["nb_read_frames"]) == SHORT_FRAMES
    # One job at a time: each job was handed out only after the previous one's result.
    takes = [take for take in worker.server.takes if take.job_id in results]
    assert [take.job_id for take in takes] == job_ids
    assert all(take.t > results[before].t for before, take in zip(job_ids, takes[1:]))
    assert list(worker.temp_dir.iterdir()) == []
    # The SDK's heartbeat (its own process) kept pinging the fake server.
    assert worker.server.pings and "runpod_version" in worker.server.pings[-1]


def test_a_stopped_job_ends_within_a_batch_and_the_next_job_runs(worker):
    worker.server.queue("long", LONG_JOB)
    worker.server.queue("after", SHORT_JOB)

    def generate(post: Post) -> bool:
        return post.job_id == "long" and post.is_progress and post.body["output"]["stage"] == "generate"

    started = worker.server.wait_for(generate, FIRST_JOB_TIMEOUT_S)
    # Stop after the first batch, so its duration is known.
    first_batch = worker.server.wait_for(lambda p: generate(p) and "percent" in p.body["output"], JOB_TIMEOUT_S)
    batch_s = first_batch.t - started.t
    requested = time.monotonic()
    worker.server.stop("long")

    after = _result(worker, "after", JOB_TIMEOUT_S)
    assert "error" not in after.body and after.body["output"]["frames"] == SHORT_FRAMES, after.body
    signalled = next(s for s in worker.server.stops if s.job_id == "long")
    taken = next(t for t in worker.server.takes if t.job_id == "after")
    # The SDK polls job-stop while the job runs (a blocked event loop would not): the signal
    # waits at most for the SDK's 1 s pause between polls (rp_scale.monitor_stop_signals).
    assert signalled.t - requested < 1.0 + 1.0, (signalled.t - requested, worker.log_tail())
    # From the signal to the next job: at most one more batch, the clean-up, and the SDK's
    # 1 s pause before it asks for a job again (rp_scale.get_jobs); 1.5 s of slack on 2 busy cores.
    assert taken.t - signalled.t < batch_s + 1.0 + 1.5, (batch_s, taken.t - signalled.t, worker.log_tail())

    long_posts = worker.server.posts_of("long")
    # RunPod's SDK posts no result for a stopped job (rp_scale.JobScaler.handle_job re-raises CancelledError).
    assert not [p for p in long_posts if p.is_result], long_posts
    percents = [p.body["output"]["percent"] for p in long_posts if generate(p) and "percent" in p.body["output"]]
    assert max(percents) < 100, percents
    # The worker finished with the stopped job before taking the next: no scratch left, no late post.
    assert worker.scratch_at_take["after"] == []
    assert all(p.t < taken.t for p in long_posts), [(p.t, p.body) for p in long_posts if p.t >= taken.t]
    assert list(worker.temp_dir.iterdir()) == []
    assert "Job stopped." in worker.log.read_text()


def test_progress_sender_posts_in_order_and_close_waits(monkeypatch):
    server = JobServer(post_delay_s=0.02)  # every post takes a while, as over a real network
    try:
        # The SDK reads RUNPOD_WEBHOOK_POST_OUTPUT once, at import: point its job-done URL at this server.
        done_url = server.env()["RUNPOD_WEBHOOK_POST_OUTPUT"].replace("$RUNPOD_POD_ID", WORKER_ID)
        monkeypatch.setattr(rp_http, "JOB_DONE_URL", done_url)
        with ProgressSender({"id": "drained"}) as sender:
            began = time.monotonic()
            for n in range(30):
                sender.send({"n": n})
            queued_s = time.monotonic() - began
        assert queued_s < 0.1  # send only queues; the 30 posts take >= 0.6 s
        assert [p.body for p in server.posts_of("drained")] == [
            {"status": "IN_PROGRESS", "output": {"n": n}} for n in range(30)]

        given_up = ProgressSender({"id": "given-up"})
        for n in range(30):
            given_up.send(n)
        assert given_up.close(timeout_s=0.1) is False
        at_close = len(server.posts_of("given-up"))
        given_up.send("after close")
        time.sleep(0.5)
        # Only the post under way at the timeout may still arrive; the rest were dropped.
        assert len(server.posts_of("given-up")) <= at_close + 1 < 30
    finally:
        server.close()


def test_progress_sender_drops_updates_on_a_local_run(capsys):
    # No RUNPOD_WEBHOOK_POST_OUTPUT here (as with --test_input): every post would fail and log an error.
    assert not rp_http.JOB_DONE_URL.startswith("http")
    with ProgressSender({"id": "local"}) as sender:
        sender.send({"stage": "validate"})
    assert sender.close() is True
    assert "Failed to return job results" not in capsys.readouterr().out
