"""RunPod progress updates for one job, posted in order by one thread the job waits for.

``runpod.serverless.progress_update`` starts a new daemon thread per call and
returns nothing to join. An update sent shortly before the handler returns can
therefore reach RunPod *after* the job's result, and RunPod then keeps the job
``IN_PROGRESS`` with the progress as its output (runpod-python#250; measured on
loopback in 2 of 6 runs, docs/streaming.md §1.4). ``ProgressSender`` posts each
update from one worker-owned thread, one after the other, and ``close`` waits
until they are all posted, so the handler returns its result only after its
last update has arrived.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from types import TracebackType
from typing import Any, Optional

from aiohttp import ClientSession
from runpod.http_client import AsyncClientSession
from runpod.serverless.modules import rp_http

logger = logging.getLogger(__name__)

_CLOSE = object()


class ProgressSender:
    """Posts one job's progress updates to RunPod's job-done URL, in order, from one thread.

    ``send`` only queues, so the job never waits on the network. ``close`` (or
    leaving the ``with`` block) waits for the queue to drain. Use::

        with ProgressSender(job) as sender:
            return run(job["input"], report=sender.send)
    """

    def __init__(self, job: dict, close_timeout_s: float = 5.0) -> None:
        """Starts the posting thread for ``job`` (the SDK's job dict: its ``id`` names the job in the URL).

        ``close_timeout_s`` bounds the wait when the ``with`` block ends. Without a
        job-done URL (local runs: ``--test_input``, ``--rp_serve_api``) updates are
        dropped, since each post would only fail and log an error.
        """
        self._job = job
        self._close_timeout_s = close_timeout_s
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._closed = False
        # Set when close gave up: updates still queued then are dropped rather than sent after the result.
        self._abandoned = threading.Event()
        # The SDK read RUNPOD_WEBHOOK_POST_OUTPUT at import; unset, it keeps the placeholder "JOB_DONE_URL".
        self._thread: Optional[threading.Thread] = None
        if rp_http.JOB_DONE_URL.startswith(("http://", "https://")):
            self._thread = threading.Thread(target=self._post_all, name=f"progress-{job.get('id')}", daemon=True)
            self._thread.start()

    def send(self, value: Any) -> None:
        """Queues one update and returns at once; never raises (a lost update must not fail the job).

        An update sent after ``close`` is dropped: it could reach RunPod after the result.
        """
        if self._closed:
            logger.warning("progress update after the job's sender closed, dropped: %r", value)
        elif self._thread is not None:
            self._queue.put(value)

    def close(self, timeout_s: Optional[float] = None) -> bool:
        """Waits until every queued update is posted, at most ``timeout_s`` (default: the constructor's).

        Returns True when all were posted. On timeout it logs a warning, drops the
        updates not yet started and returns False; one post already under way
        cannot be stopped and may still arrive late.
        """
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSE)
        if self._thread is None:
            return True
        wait_s = self._close_timeout_s if timeout_s is None else timeout_s
        self._thread.join(wait_s)
        if not self._thread.is_alive():
            return True
        self._abandoned.set()
        logger.warning("progress updates of job %s not all posted within %.1f s; the rest are dropped",
                       self._job.get("id"), wait_s)
        return False

    def __enter__(self) -> "ProgressSender":
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.close()

    def _post_all(self) -> None:
        # One event loop and one HTTP session for the whole job, instead of the SDK's loop and
        # session per update; each post completes before the next is taken from the queue.
        loop = asyncio.new_event_loop()
        try:
            session = loop.run_until_complete(_open_session())
            try:
                while (value := self._queue.get()) is not _CLOSE:
                    if not self._abandoned.is_set():
                        loop.run_until_complete(self._post(session, value))
            finally:
                loop.run_until_complete(session.close())
        except Exception:  # noqa: BLE001 - progress is best effort; the job's result must still go out
            logger.warning("the progress sender of job %s stopped", self._job.get("id"), exc_info=True)
        finally:
            loop.close()

    async def _post(self, session: ClientSession, value: Any) -> None:
        try:
            # The body and URL of the SDK's own progress_update (rp_progress._async_progress_update;
            # runpod is pinned at 1.12.0 in requirements/worker.txt). send_result logs HTTP failures
            # instead of raising them.
            await rp_http.send_result(session, {"status": "IN_PROGRESS", "output": value}, self._job)
        except Exception:  # noqa: BLE001 - e.g. a job without an id; the next update may still go out
            logger.warning("progress update of job %s failed", self._job.get("id"), exc_info=True)


async def _open_session() -> ClientSession:
    # aiohttp creates a session only inside a running event loop.
    return AsyncClientSession()
