"""Measures the worker's cold start: process start -> ready to take a job.

Starts ``python handler.py --rp_serve_api`` (the models load at import, before the
server opens its port, exactly as before ``runpod.serverless.start`` on RunPod),
times how long until the port answers, then times one job through ``/runsync``.
Prints one JSON line per run and a summary::

    python scripts/measure_cold_start.py --runs 3
    MUSETALK_WEIGHTS_LOCK=none python scripts/measure_cold_start.py --models-dir ../shared/parity/v15-yongen/models \\
        --device cpu --landmarks dlib --local-input-dir examples --job test_input.json
    python scripts/measure_cold_start.py --random-models --device cpu --landmarks dlib --job none \\
        --baseline /tmp/before --runs 3

Settings not given here come from the environment, as for the worker. The
weights lock (``MUSETALK_WEIGHTS_LOCK``) describes the real weights: with
other models (the parity fixture's) set it to ``none``, or the worker refuses
to start. ``--random-models`` uses real-size random-weight models
(:mod:`bench.random_models`, built once into
``~/.cache/musetalk-worker/bench-models``) and sets the lock to ``none``.
``--drop-caches`` empties the page cache before each start (Linux, root), so the
weights are read from disk as on a fresh worker. ``--baseline DIR`` also starts another copy of the project (e.g. ``git worktree
add /tmp/before <commit>``) with the same settings, alternating with this one,
so that the two compare under the same machine load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parents[1]
logger = logging.getLogger("measure_cold_start")
DROP_CACHES = "/proc/sys/vm/drop_caches"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="cold starts to measure (default 3)")
    parser.add_argument("--models-dir", type=Path, help="MUSETALK_MODELS_DIR for the worker")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), help="MUSETALK_DEVICE")
    parser.add_argument("--landmarks", choices=("auto", "dwpose", "dlib"), help="MUSETALK_LANDMARKS")
    parser.add_argument("--local-input-dir", type=Path, help="MUSETALK_LOCAL_INPUT_DIR (for a job with local files)")
    parser.add_argument("--job", type=Path, default=ROOT / "test_input.json",
                        help="job to time after start-up (default test_input.json; 'none' to skip)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds to wait for readiness")
    parser.add_argument("--random-models", action="store_true",
                        help="real-size random-weight models (bench/random_models.py; sets MUSETALK_WEIGHTS_LOCK=none)")
    parser.add_argument("--baseline", type=Path,
                        help="another copy of the project to start alternately, for comparison")
    parser.add_argument("--drop-caches", action="store_true",
                        help="empty the page cache before each start, so the weights come from disk as on a fresh "
                             "worker (Linux, root: writes /proc/sys/vm/drop_caches)")
    args = parser.parse_args()
    if args.drop_caches and not os.access(DROP_CACHES, os.W_OK):
        parser.error(f"--drop-caches needs to write {DROP_CACHES} (Linux, as root)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.random_models:
        if args.models_dir is not None:
            parser.error("--random-models and --models-dir exclude each other")
        sys.path.insert(0, str(ROOT))
        from bench.random_models import build_models, default_dest

        args.models_dir = build_models(default_dest())
        os.environ["MUSETALK_WEIGHTS_LOCK"] = "none"

    env = dict(os.environ)
    for name, value in (("MUSETALK_MODELS_DIR", args.models_dir), ("MUSETALK_DEVICE", args.device),
                        ("MUSETALK_LANDMARKS", args.landmarks), ("MUSETALK_LOCAL_INPUT_DIR", args.local_input_dir)):
        if value is not None:
            env[name] = str(Path(value).resolve()) if isinstance(value, Path) else value
    job = None if str(args.job) == "none" else json.loads(args.job.read_text())

    with tempfile.TemporaryDirectory(prefix="cold-start-") as scratch:
        # The timed jobs' videos are not kept (unless MUSETALK_OUTPUT_DIR says where).
        env.setdefault("MUSETALK_OUTPUT_DIR", scratch)
        trees = {"this": ROOT} if args.baseline is None else {"this": ROOT, "baseline": args.baseline.resolve()}
        results: dict = {name: [] for name in trees}
        for _ in range(args.runs):
            for name, tree in trees.items():
                if args.drop_caches:
                    _drop_caches()
                results[name].append({"tree": name, **_one_cold_start(env, job, args.timeout, tree)})
    device = _device(env)
    for name, runs in results.items():
        for result in runs:
            print(json.dumps(result))
        summary = _summary(name, trees[name], runs, job is not None, device)
        # Whether the weights came from disk or from the page cache changes ready_s most.
        summary["page_cache"] = "dropped before each start" if args.drop_caches else "as found"
        print(json.dumps(summary))
    return 0


def _summary(name: str, tree: Path, results: list, with_job: bool, device: str) -> dict:
    ready = [r["ready_s"] for r in results]
    summary = {"tree": name, "path": str(tree), "runs": len(results),
               "ready_s_median": round(statistics.median(ready), 2), "ready_s_min": min(ready),
               "ready_s_max": max(ready), "device": device}
    for key in ("models_load_s", "warm_up_s"):
        values = [r[key] for r in results if key in r]
        if values:
            summary[f"{key}_median"] = round(statistics.median(values), 2)
    if with_job:
        summary["first_job_s_median"] = round(statistics.median(r["first_job_s"] for r in results), 2)
        # What a caller waits for on a cold worker: start-up and its first job.
        summary["ready_and_first_job_s_median"] = round(
            statistics.median(r["ready_s"] + r["first_job_s"] for r in results), 2)
    return summary


def _one_cold_start(env: dict, job: dict | None, timeout: float, tree: Path = ROOT) -> dict:
    port = _free_port()
    started = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, str(tree / "handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
        cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    result: dict = {}
    try:
        while not _answers(port):
            if server.poll() is not None:
                raise SystemExit(f"the worker exited with {server.returncode} before it was ready")
            if time.perf_counter() - started > timeout:
                raise SystemExit(f"the worker was not ready after {timeout:.0f} s")
            time.sleep(0.1)
        result["ready_s"] = round(time.perf_counter() - started, 2)
        if job is not None:
            job_started = time.perf_counter()
            answer = requests.post(f"http://localhost:{port}/runsync", json=job, timeout=timeout).json()
            if answer.get("status") != "COMPLETED":
                raise SystemExit(f"the timed job failed: {answer.get('error')}")
            result["first_job_s"] = round(time.perf_counter() - job_started, 2)
    finally:
        server.terminate()
        output, _ = server.communicate(timeout=60)
    # The worker logs how the start-up splits into loading and warm-up.
    match = re.search(r"models loaded in ([\d.]+) s, warm-up ([\d.]+) s", output)
    if match:
        result["models_load_s"], result["warm_up_s"] = float(match.group(1)), float(match.group(2))
    logger.info("cold start: %s", result)
    return result


def _drop_caches() -> None:
    os.sync()
    Path(DROP_CACHES).write_text("1\n")  # 1: the page cache (clean pages only, hence the sync)


def _answers(port: int) -> bool:
    try:
        requests.get(f"http://localhost:{port}/docs", timeout=1)
        return True
    except requests.ConnectionError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _device(env: dict) -> str:
    probe = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() "
         "else f'CPU ({torch.get_num_threads()} threads)')"],
        env=env, capture_output=True, text=True,
    )
    return probe.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
