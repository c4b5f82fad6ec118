"""RunPod serverless entry point of the MuseTalk lip-sync worker.

The models load once, here at import, before the worker takes jobs; then one job
runs at a time (the work is GPU-bound). Settings come from environment variables
(``musetalk_worker.options.WorkerSettings``)::

    python handler.py                                    # on RunPod
    python handler.py --test_input '{"input": {...}}'    # one local job, exit code 0 or 1
    python handler.py --rp_serve_api --rp_api_port 8000  # local HTTP API (/run, /runsync, /status)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading

# The SDK logs at DEBUG unless told otherwise, and at DEBUG it prints each local job's
# raw input (per-job credentials included) and every result (inline videos included).
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod  # noqa: E402 - must see RUNPOD_LOG_LEVEL at import

from musetalk_worker.options import WorkerSettings  # noqa: E402
from musetalk_worker.worker import Worker  # noqa: E402

# Importing runpod configures the root logger its own way; one format for everything.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)

WORKER = Worker.start(WorkerSettings.from_env())
# Jobs run here, off the SDK's event loop. One thread: jobs never overlap, and every job
# sees the same thread-local state (torch's current CUDA device and stream).
JOB_THREAD = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="job")


@runpod.serverless.register_fitness_check
def worker_is_fit() -> None:
    """Stops the worker before it takes jobs when weights are missing or an expected GPU is absent."""
    WORKER.check_fitness()


async def handler(job: dict) -> dict:
    """Runs one job; failures come back as a string ``error`` plus ``error_code`` and ``stage``.

    The job runs in ``JOB_THREAD`` while this coroutine waits, so the SDK's event
    loop stays free and RunPod's per-job stop (``task.cancel()``, which lands only
    at an ``await``) reaches the job. On a stop the job is told through ``cancel``
    (the engine checks it at every batch) and this waits until the job has
    cleaned up before re-raising, so the next job never starts beside it.
    """
    cancel = threading.Event()
    work = asyncio.get_running_loop().run_in_executor(JOB_THREAD, WORKER.handle, job, cancel)
    try:
        # shield: a stop must not cancel the future while its thread is still running the job.
        return await asyncio.shield(work)
    except asyncio.CancelledError:
        cancel.set()
        while not work.done():
            # A repeated stop (or the SDK's shutdown) changes nothing: the job still cleans up first.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait([work])
        raise


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: 1})
