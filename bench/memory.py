"""Host memory of the engine: the peak must not grow with the length of the media, and RSS must fall back after a job.

Two measurements, with the parity fixture's small random-weight models
(``../shared/parity/v15-yongen/models``), dlib landmarks, on the CPU, and a
synthetic face video + speech (:mod:`bench.media`)::

    python -m bench.memory
    python -m bench.memory --after-job --allocators production,mmap-fixed,jemalloc
    python -m bench.memory --fps 25 --width 704 --height 1216 --tolerance-mib 64 --json memory.json

By default, the same job on 5 s and 60 s of media, each in a fresh process.
It prints, per length, the frames, the peak RSS of the whole process and of the
job alone (after the models were loaded), and the wall time; exits 1 when a
60 s peak exceeds the 5 s one by more than the tolerance.

With ``--after-job``, the 60 s job inside one long-lived process, as the worker
runs it: the engine loaded and warmed up once, then the job. It prints RSS
before the job, the peak during it, RSS right after it returned, after each
``--idle`` wait, and after ``malloc_trim(0)``, once per allocator setting
(``--allocators``; each in a process of its own, since the settings are
environment variables read at start). ``production`` is the setting the
Dockerfile gives the worker image: no variable, so the worker's own
(:mod:`musetalk_worker.allocator`: freed memory kept during a job, handed back
after it, as the worker's job loop does here too); the run exits 1 when, with
it, RSS after the first wait exceeds RSS before the job by more than the
tolerance.

The engine costs about a CPU second or two per output frame here, so the
defaults (5 fps, 352x608) keep the 60 s job to 300 frames while the frame
count still grows twelvefold.

The length jobs run with glibc's mmap threshold held at its usual start value
(the worker image's setting until the worker set malloc itself; kept here so the peaks stay comparable). Left to move (glibc raises it after freeing large blocks), the heap keeps some
freed batch buffers, so the peak says more about the allocator than about the
data a job holds: measured here, the 5 s job peaked at 1820-1853 MiB and the
60 s one 89 MiB above the 5 s one of the same run. With the threshold fixed,
large buffers go back to the system when freed and the peak follows live
memory (the 5 s job: 1691 MiB in three runs). ``--malloc-mmap-threshold 0``
sets no variable: the worker's own malloc setting (at the time of these figures, glibc's defaults).

``--model latentsync`` measures LatentSync the same way (each length in a
fresh process), by default with the first LatentSync parity fixture's models
(``../shared/parity/latentsync/ls-*/models``) and 10 s against 60 s of media;
``--steps`` (20), ``--guidance`` (1.5) and ``--no-deepcache`` set its jobs.
Its frames stream through 16-frame chunks, so its verdict is the issue's: the
60 s peak within ``--tolerance-percent`` (10 %) of the 10 s one. Its output is
25 fps as long as the audio, whatever ``--fps`` the synthetic source has::

    python -m bench.memory --model latentsync --steps 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import re
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from musetalk_worker.allocator import glibc_malloc, return_freed_memory

from . import (FIXTURE_MODELS, MIB, ROOT, describe_machine, engine_version, machine, parse_args,
               proc_status_bytes, reset_peak_rss, run_child)
from .media import make_job_media
from .speed import MODELS, engine_options, latentsync_fixture_models, load_bench_engine

logger = logging.getLogger("bench.memory")

# The environment variables by which a process's allocator is chosen (LD_PRELOAD) and tuned; they
# are read once, at start.
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_",
                       "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")
# glibc's start value of its mmap threshold (128 KiB); set, it stays there instead of rising.
MMAP_THRESHOLD_START = 131072
# Debian's and Ubuntu's path of jemalloc (package libjemalloc2) on x86-64.
JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"
# The settings --after-job can compare, by name; "production" (the Dockerfile's) is added to them.
ALLOCATORS: Dict[str, Dict[str, str]] = {
    "mmap-fixed": {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_START)},
    "arenas-2": {"MALLOC_ARENA_MAX": "2"},
    "mmap-fixed-arenas-2": {"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_START), "MALLOC_ARENA_MAX": "2"},
    "jemalloc": {"LD_PRELOAD": JEMALLOC},
    # jemalloc returns freed pages after 10 s by default, and only when some thread allocates
    # again; a background thread and a 1 s decay return them while the worker waits for a job.
    "jemalloc-1s": {"LD_PRELOAD": JEMALLOC,
                    "MALLOC_CONF": "background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"},
}


def production_allocator(dockerfile: Path = ROOT / "Dockerfile") -> Dict[str, str]:
    """The allocator settings the worker image runs with: the :data:`ALLOCATOR_VARIABLES` its last stage sets by ENV."""
    settings: Dict[str, str] = {}
    for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
        keyword, _, rest = line.strip().partition(" ")
        if keyword.upper() == "FROM":
            settings = {}
        elif keyword.upper() == "ENV":
            for word in shlex.split(rest, comments=True):
                name, _, value = word.partition("=")
                if name in ALLOCATOR_VARIABLES:
                    settings[name] = value
    return settings


def allocator_env(settings: Dict[str, str]) -> Dict[str, str]:
    """This process's environment with the allocator variables replaced by ``settings``."""
    env = {name: value for name, value in os.environ.items() if name not in ALLOCATOR_VARIABLES}
    return {**env, **settings}


def describe_allocator(settings: Dict[str, str]) -> str:
    """The settings as they would be written in a shell; none: the worker's own malloc setting."""
    return (" ".join(f"{name}={value}" for name, value in settings.items())
            or "no variables: the worker's own (freed memory kept during a job, handed back after it)")


def _load_engine(job: Dict[str, object]):
    """The job's engine on the CPU with dlib landmarks, as every measured job uses it."""
    import torch

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    return load_bench_engine(job.get("model", "musetalk"), Path(job["models"]))


def _options(job: Dict[str, object]):
    """The job's engine options: MuseTalk's batch size, or LatentSync's steps, guidance, DeepCache."""
    return engine_options(job.get("model", "musetalk"), batch_size=job["batch_size"], steps=job.get("steps", 20),
                          guidance=job.get("guidance", 1.5), deepcache=job.get("deepcache", True))


def _run_job(pipe, job: Dict[str, object]) -> Dict[str, object]:
    """Runs one job; its wall time, frames, stage timings, and the RSS trace through it."""
    # The job's running peak and current RSS after each batch of each pass: shows where
    # the peak is reached and whether it creeps up as the job goes on.
    trace: List[List[object]] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage in ("prepare", "generate") and done:
            trace.append([stage, done, total, proc_status_bytes("VmHWM") / MIB, proc_status_bytes("VmRSS") / MIB])

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        started, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        result = pipe(Path(job["source"]), Path(job["audio"]), Path(scratch) / "out.mp4", _options(job),
                      progress=progress)
        job_s, cpu_after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    # CPU seconds of every thread of this process (not of ffmpeg): the system share shows what an allocator
    # setting costs in mmap calls and page faults, which the wall time hides when others load the machine.
    return {"job_s": job_s, "cpu_user_s": cpu_after.ru_utime - cpu.ru_utime,
            "cpu_sys_s": cpu_after.ru_stime - cpu.ru_stime, "trace": trace, "frames": result.frames,
            "source_frames": result.source_frames, "frames_without_face": result.frames_without_face,
            "timings": result.timings}


def run_one(job: Dict[str, object]) -> Dict[str, object]:
    """Loads the engine and runs one job; the child's side of a length measurement."""
    import torch

    pipe = _load_engine(job)
    report: Dict[str, object] = {
        "threads": torch.get_num_threads(),
        "load_peak_rss_mib": proc_status_bytes("VmHWM") / MIB,
        "rss_after_load_mib": proc_status_bytes("VmRSS") / MIB,
        "job_peak_measured": reset_peak_rss(),
    }
    report.update(_run_job(pipe, job))
    report["job_peak_rss_mib"] = proc_status_bytes("VmHWM") / MIB
    return report


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _malloc_free_mib(libc: Optional[ctypes.CDLL]) -> Optional[float]:
    """Freed memory glibc's arenas keep (``mallinfo2().fordblks``), in MiB; None under another allocator."""
    if libc is None:
        return None
    libc.mallinfo2.restype = _Mallinfo2
    return libc.mallinfo2().fordblks / MIB


def run_after_job(job: Dict[str, object]) -> Dict[str, object]:
    """Loads and warms up the engine once, as the worker does, runs one job and follows RSS after it.

    The child's side of an ``--after-job`` measurement; the allocator is the
    one its environment chose.
    """
    import torch

    pipe = _load_engine(job)
    pipe.warm_up()
    libc = glibc_malloc()
    report: Dict[str, object] = {
        "threads": torch.get_num_threads(),
        "glibc_malloc": libc is not None,
        "rss_before_mib": proc_status_bytes("VmRSS") / MIB,
        "malloc_free_before_mib": _malloc_free_mib(libc),
        "job_peak_measured": reset_peak_rss(),
    }
    report.update(_run_job(pipe, job))
    return_freed_memory()  # as the worker does after every job
    report.update(job_peak_rss_mib=proc_status_bytes("VmHWM") / MIB, rss_after_mib=proc_status_bytes("VmRSS") / MIB,
                  malloc_free_after_mib=_malloc_free_mib(libc), load_average_1min=os.getloadavg()[0])
    idle: List[List[float]] = []
    waited = 0.0
    for seconds in sorted(job["idle_s"]):
        time.sleep(seconds - waited)
        waited = seconds
        idle.append([seconds, proc_status_bytes("VmRSS") / MIB])
    report["rss_idle_mib"] = idle
    if libc is not None:
        libc.malloc_trim(0)
        report["rss_after_trim_mib"] = proc_status_bytes("VmRSS") / MIB
    return report


def _child(mode: str, job: Dict[str, object], env: Dict[str, str], result_path: Path) -> Dict[str, object]:
    """Runs ``job`` in a fresh process (``--run-one`` of ``mode``) under ``env``; its report, with how it ended."""
    child = run_child([sys.executable, "-m", "bench.memory", "--run-one", json.dumps({"mode": mode, **job}),
                       "--result", str(result_path)], env=env)
    report = json.loads(result_path.read_text()) if result_path.exists() else {}
    report.update(exit_code=child.exit_code, process_wall_s=child.wall_s, child_peak_rss_mib=child.peak_rss_bytes / MIB)
    return report


def _job(args: argparse.Namespace, seconds: float, media_dir: Path) -> Dict[str, object]:
    """The child's job for ``seconds`` of media (made now)."""
    source, audio = make_job_media(media_dir, width=args.width, height=args.height, seconds=seconds, fps=args.fps)
    return {"model": args.model, "models": str(args.models), "source": str(source), "audio": str(audio),
            "batch_size": args.batch_size, "threads": args.threads, "steps": args.steps, "guidance": args.guidance,
            "deepcache": args.deepcache}


def measure(seconds: float, args: argparse.Namespace, media_dir: Path) -> Dict[str, object]:
    """Makes the media for ``seconds`` and runs the job on it in a fresh process."""
    job = _job(args, seconds, media_dir)
    logger.info("running the %g s job", seconds)
    settings = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}
    report = _child("length", job, allocator_env(settings), media_dir / f"result-{seconds:g}s.json")
    # The child restarts its peak count before the job, so wait4's figure may cover the job only:
    # the process's peak is the larger of it and the peak while loading.
    report.update(seconds=seconds,
                  process_peak_rss_mib=max(report["child_peak_rss_mib"], report.get("load_peak_rss_mib", 0.0)))
    return report


def measure_after_job(name: str, settings: Dict[str, str], args: argparse.Namespace,
                      job: Dict[str, object], media_dir: Path) -> Dict[str, object]:
    """Runs the ``--after-job`` measurement of ``job`` in a fresh process under the allocator ``settings``."""
    logger.info("running the %g s job after loading, allocator %s", args.long, name)
    report = _child("after-job", {**job, "idle_s": args.idle}, allocator_env(settings),
                    media_dir / f"result-{name}.json")
    report.update(allocator=name, settings=settings)
    return report


def render(reports: List[Dict[str, object]], header: Dict[str, str], verdict: str) -> str:
    """The printed report of the length mode: settings, one row per length, the verdict."""
    lines = [
        "## Peak memory against media length",
        "",
        f"- machine: {header['machine']}",
        f"- models: {header['models']}",
        f"- media: {header['media']}",
        f"- engine: {header['engine']}",
        f"- allocator: {header['allocator']}",
        "",
        "| media s | output frames | source frames | peak RSS MiB (process) | peak RSS MiB (job) "
        "| RSS after load MiB | job s | process wall s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in reports:
        if r["exit_code"] != 0:
            lines.append(f"| {r['seconds']:g} | failed (exit {r['exit_code']}) | | | | | | |")
            continue
        lines.append(
            f"| {r['seconds']:g} | {r['frames']} | {r['source_frames']} | {r['process_peak_rss_mib']:.0f} "
            f"| {r['job_peak_rss_mib']:.0f} | {r['rss_after_load_mib']:.0f} | {r['job_s']:.1f} "
            f"| {r['process_wall_s']:.1f} |"
        )
    lines += [
        "",
        "Running peak RSS of the job, MiB (current RSS in brackets), after the first pass (prepare every source "
        "frame) and through the second (generate):",
        "",
        "| media s | prepare done | " + " | ".join(f"generate {q}%" for q in _QUARTERS) + " |",
        "| ---: |" + " ---: |" * (1 + len(_QUARTERS)),
    ]
    for r in reports:
        if r["exit_code"] == 0:
            lines.append(f"| {r['seconds']:g} | " + " | ".join(_trace_cells(r["trace"])) + " |")
    return "\n".join(lines + ["", verdict])


def render_after_job(reports: List[Dict[str, object]], header: Dict[str, str], idle_s: Sequence[float],
                     verdict: str) -> str:
    """The printed report of ``--after-job``: settings, one row per allocator setting, the verdict."""
    waits = sorted(idle_s)
    lines = [
        "## Host memory after a job, in one long-lived process",
        "",
        f"- machine: {header['machine']}",
        f"- models: {header['models']}",
        f"- media: {header['media']}",
        f"- engine: {header['engine']}",
        "",
        "RSS before: after loading and warming up the engine; peak: during the job; held: the RSS after "
        f"{waits[0]:g} s idle minus the RSS before; glibc free: freed memory glibc's arenas keep right after the job "
        "(mallinfo2 fordblks; — under another allocator); CPU user / sys s: the job's CPU time in this process, all "
        "threads (ffmpeg not included); load average: the 1-minute load when the job ended.",
        "",
        "| allocator | settings | RSS before MiB | peak MiB | right after MiB | "
        + " | ".join(f"after {s:g} s idle MiB" for s in waits)
        + " | after malloc_trim(0) MiB | held MiB | glibc free MiB | frames | job s | CPU user / sys s "
        "| load average |",
        "| --- | --- |" + " ---: |" * (_FIXED_COLUMNS + len(waits)),
    ]
    for r in reports:
        if r["exit_code"] != 0:
            lines.append(f"| {r['allocator']} | {describe_allocator(r['settings'])} | failed (exit {r['exit_code']})"
                         + " |" * (_FIXED_COLUMNS + len(waits)))
            continue
        lines.append(
            f"| {r['allocator']} | {describe_allocator(r['settings'])} | {r['rss_before_mib']:.0f} "
            f"| {r['job_peak_rss_mib']:.0f} | {r['rss_after_mib']:.0f} | "
            + " | ".join(f"{rss:.0f}" for _, rss in r["rss_idle_mib"])
            + f" | {_mib(r.get('rss_after_trim_mib'))} | {_held(r):+.0f} | {_mib(r['malloc_free_after_mib'])} "
            f"| {r['frames']} | {r['job_s']:.1f} | {r['cpu_user_s']:.0f} / {r['cpu_sys_s']:.0f} "
            f"| {r['load_average_1min']:.2f} |"
        )
    return "\n".join(lines + ["", verdict])


# Columns of the --after-job table after the first two, besides one per idle wait.
_FIXED_COLUMNS = 10


def _csv(text: str) -> List[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _mib(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.0f}"


def _held(report: Dict[str, object]) -> float:
    """RSS after the first idle wait above RSS before the job, MiB."""
    return report["rss_idle_mib"][0][1] - report["rss_before_mib"]


_QUARTERS = (25, 50, 75, 100)


def _trace_cells(trace: List[List[object]]) -> List[str]:
    """The trace at the end of the prepare pass and at each quarter of the generate pass."""
    prepared = [t for t in trace if t[0] == "prepare"]
    generated = [t for t in trace if t[0] == "generate"]
    points = [prepared[-1] if prepared else None]
    for quarter in _QUARTERS:
        points.append(next((t for t in generated if t[1] * 100 >= quarter * t[2]), None))
    return ["—" if t is None else f"{t[3]:.0f} ({t[4]:.0f})" for t in points]


def judge(short: Dict[str, object], long: Dict[str, object], tolerance_mib: float,
          tolerance_percent: Optional[float] = None) -> tuple:
    """(passed, sentence): both peaks of the long job within ``tolerance_mib`` of the short job's, or, when
    ``tolerance_percent`` is given, the process's peak within that share of the short job's (the ratio is printed)."""
    if short["exit_code"] != 0 or long["exit_code"] != 0:
        return False, "FAIL: a job did not finish (see above)."
    growth = {key: long[key] - short[key] for key in ("process_peak_rss_mib", "job_peak_rss_mib")}
    changes = (f"from {short['seconds']:g} s to {long['seconds']:g} s ({short['frames']} -> {long['frames']} frames) "
               f"the process's peak RSS changed by {growth['process_peak_rss_mib']:+.1f} MiB and the job's by "
               f"{growth['job_peak_rss_mib']:+.1f} MiB")
    if tolerance_percent is not None:
        ratio = long["process_peak_rss_mib"] / short["process_peak_rss_mib"]
        passed = abs(ratio - 1) * 100 <= tolerance_percent
        return passed, (f"{'PASS' if passed else 'FAIL'}: {changes}; peak RSS ratio {long['seconds']:g} s / "
                        f"{short['seconds']:g} s = {ratio:.3f} ({(ratio - 1) * 100:+.1f} %, tolerance "
                        f"{tolerance_percent:g} %).")
    passed = all(value <= tolerance_mib for value in growth.values())
    return passed, f"{'PASS' if passed else 'FAIL'}: {changes} (tolerance +{tolerance_mib:g} MiB)."


def judge_after_job(reports: List[Dict[str, object]], tolerance_mib: float) -> tuple:
    """(passed, sentence): every job finished, and with the production setting RSS fell back to within
    ``tolerance_mib`` of its level before the job."""
    if any(r["exit_code"] != 0 for r in reports):
        return False, "FAIL: a job did not finish (see above)."
    production = next((r for r in reports if r["allocator"] == "production"), None)
    if production is None:
        return True, "No verdict: the production setting was not among --allocators."
    held, wait = _held(production), production["rss_idle_mib"][0][0]
    passed = held <= tolerance_mib
    return passed, (
        f"{'PASS' if passed else 'FAIL'}: with the production setting ({describe_allocator(production['settings'])}) "
        f"RSS {wait:g} s after the {production['frames']}-frame job is {held:+.1f} MiB from its level before the job "
        f"(tolerance +{tolerance_mib:g} MiB)."
    )


def _allocators(names: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """The named settings of ``--allocators``, in the order given; ValueError names an unknown or missing one."""
    known = {**ALLOCATORS, "production": production_allocator()}
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise ValueError(f"unknown allocator setting(s) {', '.join(unknown) or '(none)'}: use {', '.join(known)}")
    for name in names:
        preload = known[name].get("LD_PRELOAD")
        if preload and not Path(preload).is_file():
            raise ValueError(f"{name} preloads {preload}, which is not installed (apt-get install libjemalloc2)")
    return {name: known[name] for name in names}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="musetalk", choices=MODELS, help="the engine to measure (default musetalk)")
    parser.add_argument("--models", type=Path,
                        help="models folder (default: the parity fixture's, ../shared/parity/v15-yongen/models; for "
                             "latentsync the first LatentSync fixture's, ../shared/parity/latentsync/ls-*/models)")
    parser.add_argument("--short", type=float,
                        help="seconds of the short job (default 5; 10 for latentsync, the issue's)")
    parser.add_argument("--long", type=float, default=60.0,
                        help="seconds of the long job, and of the --after-job one (default 60)")
    parser.add_argument("--fps", type=float, default=5.0, help="frame rate of the synthetic video (default 5)")
    parser.add_argument("--width", type=int, default=352, help="synthetic video width (default 352)")
    parser.add_argument("--height", type=int, default=608, help="synthetic video height (default 608)")
    parser.add_argument("--batch-size", type=int, default=8, help="engine batch size (default 8, the engine's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tolerance-mib", type=float, default=64.0,
                        help="allowed growth of the peak RSS from the short to the long job; with --after-job, of "
                             "RSS after the first idle wait over RSS before the job (default 64 MiB)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=MMAP_THRESHOLD_START,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the length jobs (default 131072, its usual start "
                             "value, held fixed); 0 sets none: the worker's own malloc setting (freed memory kept during "
                             "the job), whose peaks follow the allocator's free lists")
    parser.add_argument("--after-job", action="store_true",
                        help="measure RSS before, during and after the --long job in one process that loaded the "
                             "engine first, once per --allocators setting")
    parser.add_argument("--allocators", type=_csv, default=["production", "mmap-fixed"],
                        help=f"comma-separated allocator settings for --after-job, from {', '.join(ALLOCATORS)}, "
                             "production (the Dockerfile's) (default production,mmap-fixed)")
    parser.add_argument("--idle", type=lambda text: [float(x) for x in _csv(text)], default=[1.0, 10.0],
                        help="comma-separated seconds after the --after-job job at which to read RSS again "
                             "(default 1,10)")
    parser.add_argument("--tolerance-percent", type=float,
                        help="judge the length jobs by the ratio of their process peaks instead: the long one within "
                             "this share of the short one (default 10 for latentsync; MuseTalk: --tolerance-mib)")
    parser.add_argument("--steps", type=int, default=20, help="latentsync: DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, default=1.5, help="latentsync: guidance scale (default 1.5)")
    parser.add_argument("--no-deepcache", dest="deepcache", action="store_false",
                        help="latentsync: run every step's whole UNet (default: DeepCache)")
    args = parse_args(parser, argv)

    if args.run_one:
        job = json.loads(args.run_one)
        report = run_after_job(job) if job["mode"] == "after-job" else run_one(job)
        args.result.write_text(json.dumps(report))
        return 0
    if not args.idle or min(args.idle) < 0:
        parser.error("--idle needs one or more waits of 0 s or more")
    if args.after_job:
        try:
            allocators = _allocators(args.allocators)
        except ValueError as err:
            parser.error(str(err))
    latentsync = args.model == "latentsync"
    if args.short is None:
        args.short = 10.0 if latentsync else 5.0
    if args.tolerance_percent is None and latentsync:
        args.tolerance_percent = 10.0
    if args.models is None:
        args.models = latentsync_fixture_models() if latentsync else FIXTURE_MODELS
    # LatentSync's output is 25 fps, in chunks of 16 frames, whatever the source's rate.
    short_frames, batch = (int(args.short * 25), 16) if latentsync else (int(args.short * args.fps), args.batch_size)
    if not args.after_job and short_frames < batch:
        # A job shorter than one batch peaks lower for that reason alone, which would hide growth.
        parser.error(f"the short job has {short_frames} frames, fewer than one batch ({batch}); "
                     "raise --short or --fps, or lower --batch-size")
    args.models = args.models.resolve()
    host, engine = machine(), engine_version()
    with tempfile.TemporaryDirectory(prefix="bench-memory-media-") as scratch:
        if args.after_job:
            job = _job(args, args.long, Path(scratch))
            reports = [measure_after_job(name, settings, args, job, Path(scratch))
                       for name, settings in allocators.items()]
            passed, verdict = judge_after_job(reports, args.tolerance_mib)
        else:
            reports = [measure(seconds, args, Path(scratch)) for seconds in (args.short, args.long)]
            passed, verdict = judge(reports[0], reports[1], args.tolerance_mib, args.tolerance_percent)
    threads = next((r["threads"] for r in reports if "threads" in r), "?")
    header = {
        "machine": describe_machine(host),
        "models": str(args.models),
        "media": f"synthetic face video {args.width}x{args.height} at {args.fps:g} fps + speech of the same length "
                 + (f"({args.long:g} s, bench/media.py)" if args.after_job else "(bench/media.py)"),
        "engine": (f"{engine}; LatentSync, CPU, {threads} torch threads, dlib landmarks, {args.steps} steps, "
                   f"guidance {args.guidance:g}, DeepCache {'on' if args.deepcache else 'off'}, 16-frame chunks"
                   if latentsync else f"{engine}; CPU, {threads} torch threads, dlib landmarks, batch size "
                   f"{args.batch_size}, no avatar cache"),
    }
    if args.after_job:
        print(render_after_job(reports, header, args.idle, verdict))
    else:
        header["allocator"] = (f"glibc malloc, MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (fixed)"
                               if args.malloc_mmap_threshold else "no variables: the worker's own malloc setting")
        print(render(reports, header, verdict))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "machine": host, "reports": reports, "passed": passed},
                                        indent=1) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
