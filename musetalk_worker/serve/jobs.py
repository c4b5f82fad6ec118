"""One job at a time on the device, a bounded number waiting, and a guess of when a place frees up.

Everything that touches the models (loading, warm-up, every job) runs on one
thread, for the reason ``handler.py`` gives: jobs never overlap, and each sees
the same thread-local state (torch's current CUDA device and stream). A request
takes a place before its upload is read, so a full queue answers 429 at once
instead of after a large upload.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import math
import time
from typing import AsyncIterator, Callable, Deque, TypeVar

from .errors import QUEUE_FULL, UNAVAILABLE, ServeError

T = TypeVar("T")
# The Retry-After guess before any job has finished.
_FIRST_GUESS_S = 10.0


class DeviceQueue:
    """Places for ``1 + waiting`` requests: the one on the device and those waiting for it."""

    def __init__(self, waiting: int):
        self.places = 1 + waiting
        self.taken = 0
        self.closed = False
        self._device = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="device")
        self._recent_s: Deque[float] = collections.deque(maxlen=8)

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Holds a place for the block (the request's upload and job).

        Raises:
            ServeError: ``queue_full`` (429, with Retry-After) when every place
                is taken; ``unavailable`` (503) once the server is stopping.
        """
        if self.closed:
            raise ServeError(UNAVAILABLE, "the server is shutting down; it takes no new jobs.")
        if self.taken >= self.places:
            retry = self.retry_after_s()
            raise ServeError(QUEUE_FULL, f"the queue is full ({self.places - 1} waiting behind the running job); "
                             f"retry in about {retry} s.", headers={"Retry-After": str(retry)})
        # No lock: places are only counted on the event loop's thread.
        self.taken += 1
        try:
            yield
        finally:
            self.taken -= 1

    async def run(self, work: Callable[..., T], *args) -> T:
        """Runs ``work(*args)`` on the device thread, after every job queued before it."""
        return await asyncio.get_running_loop().run_in_executor(self._device, work, *args)

    async def run_job(self, work: Callable[..., T], *args) -> T:
        """:meth:`run` for a job, whose time on the device feeds the Retry-After guess."""
        def timed() -> T:
            started = time.monotonic()
            try:
                return work(*args)
            finally:
                self._recent_s.append(time.monotonic() - started)

        return await self.run(timed)

    def retry_after_s(self) -> int:
        """Seconds until a place is likely free: one recent job's mean time on the device."""
        mean = sum(self._recent_s) / len(self._recent_s) if self._recent_s else _FIRST_GUESS_S
        return max(1, math.ceil(mean))

    def stop_taking(self) -> None:
        """Refuses new requests (503); those holding a place still run."""
        self.closed = True

    def close(self) -> None:
        """Ends the device thread once the work it holds is done (at shutdown, after the last request)."""
        self.closed = True
        self._device.shutdown(wait=True)
