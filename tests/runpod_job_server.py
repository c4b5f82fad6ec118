"""A fake RunPod job server on loopback that speaks the serverless protocol as runpod 1.12.0 uses it.

The real worker loop (``python handler.py`` with ``RUNPOD_WEBHOOK_GET_JOB`` set)
talks to it exactly as to RunPod (read from ``runpod/serverless/modules``):

* ``GET  …/job-take/<worker>?gpu=cpu&job_in_progress=0|1`` (``rp_job.get_job``):
  one queued job as JSON ``{"id", "input"}``, or 204 when there is none. The
  request is held up to ``take_wait_s`` for a job to be queued, as RunPod
  long-polls; answering 204 at once would make the SDK ask again in a busy loop.
* ``GET  …/job-stop/<worker>?gpu=cpu`` (``rp_job.get_stop_signals``; the SDK
  derives this URL from the job-take one): ``{"jobsToStop": [...]}`` once
  :meth:`JobServer.stop` is called, else 204 after ``stop_wait_s``.
* ``POST …/job-done/<worker>/<job>?gpu=cpu&isStream=true|false``
  (``rp_http.send_result``): results, and progress updates (``{"status":
  "IN_PROGRESS", "output": …}``), both JSON bodies sent form-urlencoded.
* ``POST …/job-stream/<worker>/<job>?gpu=cpu&isStream=false``
  (``rp_http.stream_result``): a generator handler's items.
* ``GET  …/ping/<worker>?job_id=…&runpod_version=…`` (``rp_ping``): heartbeats.

Every POST is kept as a :class:`Post` with the ``time.monotonic()`` at which its
body was read, so a test can order what arrived.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import json
import threading
import time
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlparse

WORKER_ID = "worker-under-test"


@dataclasses.dataclass(frozen=True)
class Post:
    """One POST the worker made: to ``job-done`` (``kind="done"``) or ``job-stream`` (``"stream"``)."""

    t: float
    kind: str
    job_id: str
    is_stream: bool
    body: Any

    @property
    def status(self) -> Optional[str]:
        return self.body.get("status") if isinstance(self.body, dict) else None

    @property
    def is_progress(self) -> bool:
        """A progress update (``progress_update``), not the job's result."""
        return self.kind == "done" and self.status == "IN_PROGRESS"

    @property
    def is_result(self) -> bool:
        return self.kind == "done" and self.status != "IN_PROGRESS"


@dataclasses.dataclass(frozen=True)
class Sent:
    """A job handed out, or a stop signal answered, and when."""

    t: float
    job_id: str


class JobServer:
    """A threaded HTTP server on 127.0.0.1 that queues jobs, signals stops and records what comes back.

    ``on_take`` (optional) runs in the server when a job is handed out, just
    before the answer is sent: a test can look at the worker's state at that
    moment. ``post_delay_s`` holds each job-done answer that long (a slow RunPod).
    """

    def __init__(self, take_wait_s: float = 1.0, stop_wait_s: float = 2.0, post_delay_s: float = 0.0,
                 on_take: Optional[Callable[[str], None]] = None) -> None:
        self.take_wait_s = take_wait_s
        self.stop_wait_s = stop_wait_s
        self.post_delay_s = post_delay_s
        self._on_take = on_take
        self._changed = threading.Condition()
        self._jobs: collections.deque[dict] = collections.deque()
        self._to_stop: list[str] = []
        self._closed = False
        self.posts: list[Post] = []
        self.takes: list[Sent] = []
        self.stops: list[Sent] = []
        self.pings: list[dict[str, list[str]]] = []
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._httpd.server_address[1]}/v2/endpoint-under-test"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()

    def env(self) -> dict[str, str]:
        """The environment that points a worker at this server (the variables RunPod sets on a pod).

        ``$ID`` and ``$RUNPOD_POD_ID`` are left for the SDK to fill in, as on RunPod.
        With ``RUNPOD_AI_API_KEY`` and ``RUNPOD_POD_ID`` set the SDK also starts its heartbeat.
        """
        return {
            "RUNPOD_WEBHOOK_GET_JOB": f"{self.base}/job-take/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_OUTPUT": f"{self.base}/job-done/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_POST_STREAM": f"{self.base}/job-stream/$RUNPOD_POD_ID/$ID?gpu=cpu",
            "RUNPOD_WEBHOOK_PING": f"{self.base}/ping/$RUNPOD_POD_ID?gpu=cpu",
            "RUNPOD_POD_ID": WORKER_ID,
            "RUNPOD_AI_API_KEY": "fake-key-for-the-loopback-job-server",
        }

    def queue(self, job_id: str, job_input: Any) -> None:
        """Queues a job; jobs are handed out one per job-take, in order."""
        with self._changed:
            self._jobs.append({"id": job_id, "input": job_input})
            self._changed.notify_all()

    def stop(self, job_id: str) -> None:
        """Signals RunPod's per-job stop for ``job_id`` on the next (or the waiting) job-stop poll."""
        with self._changed:
            self._to_stop.append(job_id)
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[Post], bool], timeout_s: float) -> Post:
        """The first recorded POST matching ``predicate``, waiting up to ``timeout_s`` for it."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((p for p in self.posts if predicate(p)), None)
                if found is not None:
                    return found
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no matching POST within {timeout_s} s; got {len(self.posts)} POSTs")
                self._changed.wait(left)

    def posts_of(self, job_id: str) -> list[Post]:
        with self._changed:
            return [p for p in self.posts if p.job_id == job_id]

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._httpd.shutdown()
        self._httpd.server_close()

    # ------------------------------------------------------------------ protocol

    def _take(self) -> Optional[dict]:
        with self._changed:
            self._changed.wait_for(lambda: self._jobs or self._closed, self.take_wait_s)
            if not self._jobs:
                return None
            job = self._jobs.popleft()
            self.takes.append(Sent(time.monotonic(), job["id"]))
        if self._on_take is not None:
            self._on_take(job["id"])
        return job

    def _stop_signals(self) -> list[str]:
        with self._changed:
            self._changed.wait_for(lambda: self._to_stop or self._closed, self.stop_wait_s)
            signals, self._to_stop = self._to_stop, []
            self.stops += [Sent(time.monotonic(), job_id) for job_id in signals]
            return signals

    def _record(self, kind: str, job_id: str, query: dict[str, list[str]], body: bytes) -> None:
        post = Post(time.monotonic(), kind, job_id, query.get("isStream") == ["true"], json.loads(body))
        with self._changed:
            self.posts.append(post)
            self._changed.notify_all()

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # the SDK's aiohttp session keeps connections alive

            def do_GET(self) -> None:  # noqa: N802 - http.server's naming
                url = urlparse(self.path)
                parts = url.path.split("/")
                if "job-take" in parts:
                    job = server._take()
                    status, payload = (200, job) if job else (204, None)
                elif "job-stop" in parts:
                    signals = server._stop_signals()
                    status, payload = (200, {"jobsToStop": signals}) if signals else (204, None)
                elif "ping" in parts:
                    with server._changed:
                        server.pings.append(parse_qs(url.query))
                    status, payload = 200, None
                else:
                    status, payload = 404, None
                self._answer(status, payload)

            def do_POST(self) -> None:  # noqa: N802
                url = urlparse(self.path)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                parts = url.path.split("/")
                kinds = {"job-done": "done", "job-stream": "stream"}
                kind = next((kinds[p] for p in parts if p in kinds), None)
                if kind is None:
                    self._answer(404, None)
                    return
                server._record(kind, parts[-1], parse_qs(url.query), body)
                if kind == "done":
                    time.sleep(server.post_delay_s)
                self._answer(200, None)

            def _answer(self, status: int, payload: Any) -> None:
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                if payload is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        return Handler
