"""Threads with bounded queues, so decoding, device work and encoding overlap.

Each job stage that waits on something else (ffmpeg's pipe, disk reads, the
encoder) runs on a thread of its own; the queues between them hold a few items,
so memory stays bounded whatever the length of the job, and are first in,
first out, so order is kept.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Callable, Iterator, Optional


class Prefetcher:
    """Runs an iterator on a thread of its own, at most ``depth`` items ahead of its consumer.

    Use as a context manager and iterate it. An exception in the iterator is
    raised in the consumer; leaving the block early stops the thread and closes
    the iterator (which, for a decoder, stops ffmpeg).
    """

    def __init__(self, items: Iterator, depth: int = 2):
        self._items = items
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)

    def __enter__(self) -> "Prefetcher":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        while self._thread.is_alive():  # drain, so a producer blocked on a full queue sees the stop
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __iter__(self) -> Iterator:
        while True:
            kind, value = self._queue.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value

    def _run(self) -> None:
        try:
            for item in self._items:
                if not self._offer(("item", item)):
                    return
            self._offer(("end", None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._offer(("error", error))
        finally:
            close = getattr(self._items, "close", None)
            if close is not None:
                close()

    def _offer(self, message: tuple) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(message, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False


class BackgroundConsumer:
    """Calls ``consume(*item)`` for each item put, in order, on a thread of its own.

    Use as a context manager. At most ``depth`` items wait, so the producer
    blocks when the consumer falls behind. A failure in ``consume`` is raised in
    the producer at its next ``put`` (or when the block ends); later items are
    then dropped.
    """

    def __init__(self, consume: Callable, depth: int = 2):
        self._consume = consume
        self._queue: "queue.Queue" = queue.Queue(maxsize=depth)
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="consumer", daemon=True)

    def __enter__(self) -> "BackgroundConsumer":
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None:
            self._raise_failure()

    def put(self, *item) -> None:
        """Queues one item (the arguments of one ``consume`` call)."""
        self._raise_failure()
        self._queue.put(item)

    def _raise_failure(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is not None:
                continue  # keep draining so the producer never blocks on a full queue
            try:
                self._consume(*item)
            except BaseException as error:  # noqa: BLE001 - handed to the producer
                self._error = error
