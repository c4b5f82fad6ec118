"""Time per stage of a job, on the host and on the device."""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Dict, Iterable, Iterator, List, Tuple

import torch


class StageTimer:
    """Adds up time per stage; stages interleave in the streaming passes and overlap across threads.

    Host stages count wall time. Device stages (:meth:`device`) on a GPU count
    the GPU's own time between two CUDA events, read once at the end, so timing
    never makes the host wait for the GPU.
    """

    def __init__(self, device: torch.device) -> None:
        self.seconds: Dict[str, float] = {}
        self._lock = threading.Lock()  # stages of several threads add up here
        self._cuda = device.type == "cuda"
        self._events: List[Tuple[str, "torch.cuda.Event", "torch.cuda.Event"]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        """Times a stage of host work (wall time)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._add(stage, time.perf_counter() - start)

    @contextlib.contextmanager
    def device(self, stage: str) -> Iterator[None]:
        """Times work queued on the device (GPU time on CUDA, wall time elsewhere)."""
        if not self._cuda:
            with self(stage):
                yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._events.append((stage, start, end))
        self._collect(wait=False)

    def totals(self) -> Dict[str, float]:
        """Seconds per stage, rounded to the millisecond (waits for queued device work)."""
        self._collect(wait=True)
        return {stage: round(seconds, 3) for stage, seconds in self.seconds.items()}

    def timed_iter(self, stage: str, items: Iterable) -> Iterator:
        """Iterates ``items``, counting the time spent getting each one."""
        iterator = iter(items)
        while True:
            with self(stage):
                item = next(iterator, _END)
            if item is _END:
                return
            yield item

    def _collect(self, wait: bool) -> None:
        # Folding in finished pairs as the job goes keeps the list short on long jobs.
        while self._events and (wait or self._events[0][2].query()):
            stage, start, end = self._events.pop(0)
            end.synchronize()
            self._add(stage, start.elapsed_time(end) / 1000)

    def _add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds


_END = object()
