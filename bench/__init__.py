"""Benchmarks of the lip-sync engine and what they need.

- :mod:`bench.random_models`: a models folder with random weights of the real
  architectures (or shrunk ones, for tests).
- :mod:`bench.media`: synthetic face videos and speech of any size and length.
- :mod:`bench.speed`: per-stage and end-to-end speed, peak memory.
- :mod:`bench.memory`: peak RSS of a short and a long job (must not grow).

Each runs as ``python -m bench.<name> --help``. The helpers below are shared by
the last two: every measured job runs in a fresh child process, so that its
peak memory is its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MEDIA = SHARED / "media"
FIXTURE_MODELS = SHARED / "parity" / "v15-yongen" / "models"
MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class ChildRun:
    """How a child process ended: exit code, wall time, and its peak resident memory."""

    exit_code: int
    wall_s: float
    # The largest RSS of the child or of any process it waited for (ffmpeg), in bytes.
    peak_rss_bytes: int


def run_child(argv: Sequence[str], timeout_s: float | None = None, env: Mapping[str, str] | None = None) -> ChildRun:
    """Runs ``argv`` from the project root (in ``env``, default this environment) and measures it with ``wait4``.

    ``wait4`` gives this one child's resource usage, where ``RUSAGE_CHILDREN``
    would give the maximum over every child this process has waited for.
    """
    started = time.perf_counter()
    child = subprocess.Popen(list(argv), cwd=ROOT, env=None if env is None else dict(env))
    deadline = None if timeout_s is None else started + timeout_s
    while True:
        pid, status, usage = os.wait4(child.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            child.kill()
            pid, status, usage = os.wait4(child.pid, 0)
            break
        time.sleep(0.2)
    # Popen would otherwise try to reap the process a second time.
    child.returncode = os.waitstatus_to_exitcode(status)
    # Linux reports ru_maxrss in KiB.
    return ChildRun(child.returncode, time.perf_counter() - started, usage.ru_maxrss * 1024)


def parse_args(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> argparse.Namespace:
    """Adds the options every benchmark script ends with, parses ``argv`` and sets up logging.

    The options: ``--json`` (also write every figure as JSON there), and the
    hidden ``--run-one`` (one job, as JSON) and ``--result`` (where to write
    its report), by which a script runs a measured job in the fresh child
    process that :func:`run_child` starts.
    """
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    return args


def proc_status_bytes(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``), in bytes; 0 if absent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def reset_peak_rss() -> bool:
    """Restarts this process's peak-RSS count (``VmHWM``) from its current RSS; False where Linux does not allow it.

    Lets a child tell the peak of its job from the peak of loading its models.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def engine_version() -> str:
    """The commit the engine runs from, and whether its files differ from it (others may be editing them)."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown commit"
    changed = git("status", "--porcelain", "--", "musetalk_worker")
    return f"{commit}{' + uncommitted changes in musetalk_worker/' if changed else ''}"


def machine() -> Dict[str, object]:
    """The host: CPU model, core counts, memory, OS (the GPU is named by the process that uses it)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def describe_machine(info: Dict[str, object]) -> str:
    """One line naming the machine, for the printed reports."""
    return (
        f"{info['cpu']}, {info['logical_cores']} logical cores ({info['usable_cores']} usable), "
        f"{info['memory_gib']} GiB RAM, {info['os']}, Python {info['python']}; "
        f"load average at start {', '.join(str(x) for x in info['load_average'])}"
    )
