"""Peak memory of a short and a long job: it must not grow with the length of the media.

Runs the same job on a 5 s and a 60 s synthetic face video + speech
(:mod:`bench.media`) with the parity fixture's small random-weight models
(``../shared/parity/v15-yongen/models``), dlib landmarks, on the CPU; each job
in a fresh process. Prints, per length, the frames, the peak RSS of the whole
process and of the job alone (after the models were loaded), and the wall time;
exits 1 when a 60 s peak exceeds the 5 s one by more than the tolerance::

    python -m bench.memory
    python -m bench.memory --fps 25 --width 704 --height 1216 --tolerance-mib 64 --json memory.json

The engine costs about a CPU second or two per output frame here, so the
defaults (5 fps, 352x608) keep the 60 s job to 300 frames while the frame
count still grows twelvefold.

The jobs run with glibc's mmap threshold held at its usual start value. Left
to move (glibc raises it after freeing large blocks), the heap keeps some
freed batch buffers, so the peak says more about the allocator than about the
data a job holds: measured here, the 5 s job peaked at 1820-1853 MiB and the
60 s one 89 MiB above the 5 s one of the same run. With the threshold fixed,
large buffers go back to the system when freed and the peak follows live
memory (the 5 s job: 1691 MiB in three runs). ``--malloc-mmap-threshold 0``
measures with glibc's default behaviour.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

from . import (FIXTURE_MODELS, MIB, describe_machine, engine_version, machine, parse_args, proc_status_bytes,
               reset_peak_rss, run_child)
from .media import make_job_media

logger = logging.getLogger("bench.memory")


def run_one(models: Path, source: Path, audio: Path, batch_size: int, threads: Optional[int]) -> Dict[str, object]:
    """Loads the engine and runs one job; the child's side of a measurement."""
    import torch

    from musetalk_worker import EngineOptions
    from musetalk_worker.pipeline import LipSyncPipeline

    if threads:
        torch.set_num_threads(threads)
    pipe = LipSyncPipeline.from_models(models, device="cpu", landmarks="dlib")
    report: Dict[str, object] = {
        "threads": torch.get_num_threads(),
        "load_peak_rss_mib": proc_status_bytes("VmHWM") / MIB,
        "rss_after_load_mib": proc_status_bytes("VmRSS") / MIB,
        "job_peak_measured": reset_peak_rss(),
    }
    # The job's running peak and current RSS after each batch of each pass: shows where
    # the peak is reached and whether it creeps up as the job goes on.
    trace: List[List[object]] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage in ("prepare", "generate") and done:
            trace.append([stage, done, total, proc_status_bytes("VmHWM") / MIB, proc_status_bytes("VmRSS") / MIB])

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as scratch:
        started = time.perf_counter()
        result = pipe(source, audio, Path(scratch) / "out.mp4", EngineOptions(batch_size=batch_size),
                      progress=progress)
        report["job_s"] = time.perf_counter() - started
    report.update(
        trace=trace,
        job_peak_rss_mib=proc_status_bytes("VmHWM") / MIB,
        frames=result.frames,
        source_frames=result.source_frames,
        frames_without_face=result.frames_without_face,
        timings=result.timings,
    )
    return report


def measure(seconds: float, args: argparse.Namespace, media_dir: Path) -> Dict[str, object]:
    """Makes the media for ``seconds`` and runs the job on it in a fresh process."""
    source, audio = make_job_media(media_dir, width=args.width, height=args.height, seconds=seconds, fps=args.fps)
    result_path = media_dir / f"result-{seconds:g}s.json"
    job = {"models": str(args.models), "source": str(source), "audio": str(audio), "batch_size": args.batch_size,
           "threads": args.threads}
    logger.info("running the %g s job", seconds)
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    child = run_child([sys.executable, "-m", "bench.memory", "--run-one", json.dumps(job), "--result",
                       str(result_path)], env=env)
    report = json.loads(result_path.read_text()) if result_path.exists() else {}
    # The child restarts its peak count before the job, so wait4's figure may cover the job only:
    # the process's peak is the larger of it and the peak while loading.
    process_peak = max(child.peak_rss_bytes / MIB, report.get("load_peak_rss_mib", 0.0))
    report.update(seconds=seconds, exit_code=child.exit_code, process_wall_s=child.wall_s,
                  process_peak_rss_mib=process_peak)
    return report


def render(reports: List[Dict[str, object]], header: Dict[str, str], verdict: str) -> str:
    """The printed report: settings, one row per length, the verdict."""
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


_QUARTERS = (25, 50, 75, 100)


def _trace_cells(trace: List[List[object]]) -> List[str]:
    """The trace at the end of the prepare pass and at each quarter of the generate pass."""
    prepared = [t for t in trace if t[0] == "prepare"]
    generated = [t for t in trace if t[0] == "generate"]
    points = [prepared[-1] if prepared else None]
    for quarter in _QUARTERS:
        points.append(next((t for t in generated if t[1] * 100 >= quarter * t[2]), None))
    return ["—" if t is None else f"{t[3]:.0f} ({t[4]:.0f})" for t in points]


def judge(short: Dict[str, object], long: Dict[str, object], tolerance_mib: float) -> tuple:
    """(passed, sentence): both peaks of the long job within ``tolerance_mib`` of the short job's."""
    if short["exit_code"] != 0 or long["exit_code"] != 0:
        return False, "FAIL: a job did not finish (see above)."
    growth = {key: long[key] - short[key] for key in ("process_peak_rss_mib", "job_peak_rss_mib")}
    passed = all(value <= tolerance_mib for value in growth.values())
    return passed, (
        f"{'PASS' if passed else 'FAIL'}: from {short['seconds']:g} s to {long['seconds']:g} s "
        f"({short['frames']} -> {long['frames']} frames) the process's peak RSS changed by "
        f"{growth['process_peak_rss_mib']:+.1f} MiB and the job's by {growth['job_peak_rss_mib']:+.1f} MiB "
        f"(tolerance +{tolerance_mib:g} MiB)."
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=FIXTURE_MODELS,
                        help="models folder (default: the parity fixture's, ../shared/parity/v15-yongen/models)")
    parser.add_argument("--short", type=float, default=5.0, help="seconds of the short job (default 5)")
    parser.add_argument("--long", type=float, default=60.0, help="seconds of the long job (default 60)")
    parser.add_argument("--fps", type=float, default=5.0, help="frame rate of the synthetic video (default 5)")
    parser.add_argument("--width", type=int, default=352, help="synthetic video width (default 352)")
    parser.add_argument("--height", type=int, default=608, help="synthetic video height (default 608)")
    parser.add_argument("--batch-size", type=int, default=8, help="engine batch size (default 8, the engine's)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--tolerance-mib", type=float, default=64.0,
                        help="allowed growth of the peak RSS from the short to the long job (default 64 MiB)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=131072,
                        help="glibc's MALLOC_MMAP_THRESHOLD_ for the jobs (default 131072, its usual start value, "
                             "held fixed); 0 leaves glibc's moving threshold, whose peaks vary from run to run")
    args = parse_args(parser, argv)

    if args.run_one:
        job = json.loads(args.run_one)
        report = run_one(Path(job["models"]), Path(job["source"]), Path(job["audio"]), job["batch_size"],
                         job["threads"])
        args.result.write_text(json.dumps(report))
        return 0
    short_frames = int(args.short * args.fps)
    if short_frames < args.batch_size:
        # A job shorter than one batch peaks lower for that reason alone, which would hide growth.
        parser.error(f"the short job has {short_frames} frames, fewer than one batch ({args.batch_size}); "
                     "raise --short or --fps, or lower --batch-size")
    args.models = args.models.resolve()
    host, engine = machine(), engine_version()
    with tempfile.TemporaryDirectory(prefix="bench-memory-media-") as scratch:
        reports = [measure(seconds, args, Path(scratch)) for seconds in (args.short, args.long)]
    passed, verdict = judge(reports[0], reports[1], args.tolerance_mib)
    threads = next((r["threads"] for r in reports if "threads" in r), "?")
    header = {
        "machine": describe_machine(host),
        "models": str(args.models),
        "media": f"synthetic face video {args.width}x{args.height} at {args.fps:g} fps + speech of the same length "
                 "(bench/media.py)",
        "engine": f"{engine}; CPU, {threads} torch threads, dlib landmarks, batch size {args.batch_size}, "
                  "no avatar cache",
        "allocator": (f"glibc malloc, MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold} (fixed)"
                      if args.malloc_mmap_threshold else "glibc malloc, default (moving) mmap threshold"),
    }
    print(render(reports, header, verdict))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "machine": host, "reports": reports, "passed": passed},
                                        indent=1) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
