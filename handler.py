"""RunPod serverless entry point of the MuseTalk lip-sync worker.

The models load once, here at import, before the worker takes jobs; then one job
runs at a time (the work is GPU-bound). Settings come from environment variables
(``musetalk_worker.options.WorkerSettings``)::

    python handler.py                                    # on RunPod
    python handler.py --test_input '{"input": {...}}'    # one local job, exit code 0 or 1
    python handler.py --rp_serve_api --rp_api_port 8000  # local HTTP API (/run, /runsync, /status)
"""

from __future__ import annotations

import logging
import os

# The SDK logs at DEBUG unless told otherwise, and at DEBUG it prints each local job's
# raw input (per-job credentials included) and every result (inline videos included).
os.environ.setdefault("RUNPOD_LOG_LEVEL", "INFO")

import runpod  # noqa: E402 - must see RUNPOD_LOG_LEVEL at import

from musetalk_worker.options import WorkerSettings  # noqa: E402
from musetalk_worker.worker import Worker  # noqa: E402

# Importing runpod configures the root logger its own way; one format for everything.
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)

WORKER = Worker.start(WorkerSettings.from_env())


@runpod.serverless.register_fitness_check
def worker_is_fit() -> None:
    """Stops the worker before it takes jobs when weights are missing or an expected GPU is absent."""
    WORKER.check_fitness()


def handler(job: dict) -> dict:
    """Runs one job; failures come back as a string ``error`` plus ``error_code`` and ``stage``."""
    return WORKER.handle(job)


if __name__ == "__main__":
    runpod.serverless.start({"handler": handler, "concurrency_modifier": lambda current: 1})
