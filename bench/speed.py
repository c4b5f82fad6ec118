"""Speed of a lip-sync engine (MuseTalk, or LatentSync with ``--model latentsync``) per stage and end to end,
for several dtypes and batch sizes.

Runs one job per configuration (dtype x batch size), each in a fresh process so
that its peak memory is its own, and prints markdown tables: per stage the
seconds and frames per second; end to end the frames per second, the real-time
factor, model loading, peak host RSS and peak GPU memory. The models are, by
default, random weights of the real architectures (:mod:`bench.random_models`,
built once into ``~/.cache/musetalk-worker/bench-models``); the media a
synthetic face video and speech (:mod:`bench.media`)::

    python -m bench.speed --device cpu --dtypes fp32 --batch-sizes 1,4 --width 256 --height 256 --seconds 2 --fps 5
    python -m bench.speed --device cuda --dtypes fp32,fp16 --batch-sizes 4,8,16 --width 704 --height 1216 \\
        --seconds 10 --fps 25 --landmarks dwpose --json speed.json

On the CPU, the fp16 and bf16 rows both compute in bfloat16 (a job's ``fp16``
there) where the CPU has it in hardware; where the engine refuses a
configuration (such a CPU without it) the row reads "n/a: " and the engine's
reason. ``--compile`` compares torch.compile modes (each batch
size compiles during warm-up, whose time the table shows). With
``--repeat-with-cache`` each configuration runs its job twice with one avatar
cache folder: the first run prepares and caches the source, the second reuses it.

``--model latentsync`` measures LatentSync instead: by default with the first
LatentSync parity fixture's models (``../shared/parity/latentsync/ls-*/models``,
small random weights of the real architecture), ``--steps`` DDIM steps (20),
``--guidance`` (1.5), DeepCache unless ``--no-deepcache``. It works in
16-frame chunks, so ``--batch-sizes`` does not apply; its output is 25 fps, as
long as the audio, whatever ``--fps`` the synthetic source has::

    python -m bench.speed --model latentsync --device cpu --dtypes fp32 --seconds 2 --steps 2

At the real sizes, add the version's folder to the random models (``python -m
bench.random_models --latentsync 1.5``) and name it with ``--version``::

    python -m bench.speed --model latentsync --version 1.5 --models ~/.cache/musetalk-worker/bench-models \
        --device cpu --dtypes fp32,fp16 --seconds 0.64 --steps 2

``--restore`` runs every MuseTalk configuration twice, without and with face
restoration (GFPGAN v1.4, random weights of the real 512 px network, added to
the models folder as the image's build converts it; bf16 configurations
restore in bfloat16, the others in float32): the ``restore`` row is the added
device time, and the end-to-end rows show what it costs the job::

    python -m bench.speed --device cpu --dtypes fp32 --batch-sizes 4 --seconds 2 --fps 5 --restore
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from musetalk_worker.options import COMPILE_MODES

from . import MIB, SHARED, ChildRun, describe_machine, engine_version, machine, parse_args, proc_status_bytes, run_child

logger = logging.getLogger("bench.speed")

# (timing key, label, which frames it processes: source frames or output frames).
STAGES = (
    ("decode", "decode (probe, audio, video frames)", "source"),
    ("faces", "faces: detection + landmarks", "source"),
    ("masks", "masks: face parsing (BiSeNet)", "source"),
    ("latents", "latents: VAE encode", "source"),
    ("audio", "audio: Whisper encoder", "output"),
    ("unet", "UNet", "output"),
    ("vae_decode", "VAE decode", "output"),
    ("read", "read (source frames, latents, masks from the store)", "output"),
    ("blend", "blend: resize + composite (on the device)", "output"),
    ("restore", "restore: GFPGAN v1.4 + warps in and out (on the device)", "output"),
    ("paste", "paste blended regions into frames (host)", "output"),
    ("encode", "encode (ffmpeg; the codec is in the header)", "output"),
    ("cache", "avatar cache (hash, save, load)", "source"),
)
# LatentSync's stages (its timing keys); it reports frames per 16-frame chunk, all output frames.
LATENTSYNC_STAGES = (
    ("decode", "decode (probe, audio)", "source"),
    ("audio", "audio: Whisper features", "output"),
    ("faces", "faces: detection + landmarks (source frames, as read)", "source"),
    ("align", "align: warp faces to the model's size", "output"),
    ("generate", "generate: DDIM steps (UNet) + VAE", "output"),
    ("paste", "paste: faces warped back into their frames", "output"),
    ("restore", "restore: GFPGAN v1.4 + warps in and out (on the device)", "output"),
    ("read", "read (aligned source frames from the spill)", "output"),
    ("encode", "encode (ffmpeg; the codec is in the header)", "output"),
    ("cache", "avatar cache (hash, save, load)", "source"),
)
MODELS = ("musetalk", "latentsync")
# The frames LatentSync generates at once (engines/latentsync/pipeline.py CHUNK).
LATENTSYNC_CHUNK = 16
# Half-precision dtypes of the table -> Acceleration.half_dtype.
HALF_DTYPES = {"fp16": "float16", "bf16": "bfloat16"}


def latentsync_fixture_models() -> Path:
    """The models of the first LatentSync parity fixture (``../shared/parity/latentsync/ls-*/models``), as the
    LatentSync tests find it; the path of where it would be when there is none (the engine then names it missing)."""
    root = SHARED / "parity" / "latentsync"
    found = sorted(p / "models" for p in root.glob("ls-*") if (p / "models").is_dir()) if root.is_dir() else []
    return found[0] if found else root / "ls-*" / "models"


def engine_options(model: str, *, batch_size: int = 8, fp16: bool = False, steps: int = 20, guidance: float = 1.5,
                   deepcache: bool = True, restore: bool = False, version: str = ""):
    """The job options of ``model`` for a measured job: MuseTalk's batch size and face restoration, or
    LatentSync's steps, guidance, DeepCache (its seed the default, so runs compare); ``version`` the model's
    (empty: its default)."""
    from musetalk_worker import MuseTalkOptions
    from musetalk_worker.options import LatentSyncOptions

    chosen = {"version": version} if version else {}
    if model == "latentsync":
        return LatentSyncOptions(steps=steps, guidance=guidance, deepcache=deepcache, fp16=fp16, **chosen)
    return MuseTalkOptions(batch_size=batch_size, fp16=fp16, restore=restore, **chosen)


def load_bench_engine(model: str, models: Path, *, device: str = "cpu", landmarks: str = "dlib", fp16: bool = False,
                      cache_dir: Optional[Path] = None, acceleration=None, version: str = ""):
    """The engine of ``model`` with ``models`` and ``version`` (empty: the model's default) loaded now, so that
    load time and RSS after load include it; through ``load_engine``, as the worker loads it."""
    from musetalk_worker.engine import load_engine
    from musetalk_worker.options import Acceleration, EngineConfig

    versions = (version or engine_options(model).version,)
    return load_engine(model, EngineConfig(models, device=device, landmarks=landmarks, fp16=fp16, versions=versions,
                                           acceleration=acceleration or Acceleration(), cache_dir=cache_dir))


def warm_up(model: str, pipe, options) -> None:
    """Runs the engine's networks once (MuseTalk's at ``options``' batch size)."""
    if model == "latentsync":
        pipe.warm_up()
    else:
        pipe.warm_up(options)


@dataclasses.dataclass(frozen=True)
class Config:
    """One measured configuration, as handed to the child process."""

    models: str
    source: str
    audio: str
    device: str
    dtype: str
    batch_size: int
    landmarks: str
    threads: Optional[int]
    repeat_with_cache: bool
    compile: str = "off"
    channels_last: bool = False
    model: str = "musetalk"
    steps: int = 20
    guidance: float = 1.5
    deepcache: bool = True
    restore: bool = False
    version: str = ""

    @property
    def label(self) -> str:
        extras = ("" if self.compile == "off" else f" compile={self.compile}") + (" NHWC" if self.channels_last else "")
        extras += " restore" if self.restore else ""
        if self.model == "latentsync":
            return (f"{self.dtype} {self.steps} steps g{self.guidance:g}{'' if self.deepcache else ' no DeepCache'}"
                    f"{extras}")
        return f"{self.dtype} b{self.batch_size}{extras}"


def run_one(config: Config) -> Dict[str, object]:
    """Loads the engine and runs the job (twice with an avatar cache); the child's side of a measurement."""
    import torch

    from musetalk_worker import ErrorCode, LipSyncError
    from musetalk_worker.options import Acceleration

    if config.threads:
        torch.set_num_threads(config.threads)
    fp16 = config.dtype in HALF_DTYPES
    # GFPGAN never computes in float16: bf16 rows restore in bfloat16, the others in float32.
    acceleration = Acceleration(half_dtype=HALF_DTYPES.get(config.dtype, "float16"), compile=config.compile,
                                channels_last=config.channels_last,
                                restore_dtype="bfloat16" if config.dtype == "bf16" else "float32")
    report: Dict[str, object] = {"threads": torch.get_num_threads(), "torch": torch.__version__}
    with tempfile.TemporaryDirectory(prefix="bench-speed-") as scratch:
        cache_dir = Path(scratch) / "avatar-cache" if config.repeat_with_cache else None
        try:
            started = time.perf_counter()
            pipe = load_bench_engine(config.model, Path(config.models), device=config.device, fp16=fp16,
                                     landmarks=config.landmarks, cache_dir=cache_dir, acceleration=acceleration,
                                     version=config.version)
            report["load_s"] = time.perf_counter() - started
            options = engine_options(config.model, batch_size=config.batch_size, fp16=fp16, steps=config.steps,
                                     guidance=config.guidance, deepcache=config.deepcache, restore=config.restore,
                                     version=config.version)
            started = time.perf_counter()
            warm_up(config.model, pipe, options)
            report["warm_up_s"] = time.perf_counter() - started
        except LipSyncError as error:
            # The engine's own refusal (half precision it cannot run here) is a result, not a failure.
            if fp16 and error.code is ErrorCode.INVALID_INPUT and error.stage == "validate":
                return {**report, "refused": str(error)}
            raise
        cuda = pipe.device.type == "cuda"
        report["device"] = pipe.device.type
        report["video_codec"] = pipe.video_codec
        report["gpu"] = torch.cuda.get_device_name(pipe.device) if cuda else None
        report["rss_after_load_mib"] = proc_status_bytes("VmRSS") / MIB
        runs = []
        for attempt in range(2 if config.repeat_with_cache else 1):
            if cuda:
                torch.cuda.reset_peak_memory_stats(pipe.device)
            started = time.perf_counter()
            result = pipe(Path(config.source), Path(config.audio), Path(scratch) / f"out{attempt}.mp4", options,
                          progress=_progress_logger())
            if cuda:
                torch.cuda.synchronize(pipe.device)
            runs.append({
                "wall_s": time.perf_counter() - started,
                "frames": result.frames,
                "source_frames": result.source_frames,
                "duration_s": result.duration_s,
                "size": f"{result.width}x{result.height}",
                "fps": result.fps,
                "timings": result.timings,
                "cache_hit": result.cache_hit,
                "peak_gpu_mib": torch.cuda.max_memory_allocated(pipe.device) / MIB if cuda else None,
                # Other work on the machine slows every stage; this shows when it did.
                "load_average_1min": os.getloadavg()[0],
            })
        report["runs"] = runs
    report["peak_rss_self_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB
    return report


def _progress_logger():
    """A progress callback that logs about every tenth of a stage (CPU runs are long)."""
    last: Dict[str, int] = {}

    def report(stage: str, done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done - last.get(stage, -step) >= step:
            last[stage] = done
            logger.info("%s %d/%d", stage, done, total)

    return report


def measure(config: Config, timeout_s: Optional[float]) -> Dict[str, object]:
    """Runs ``config`` in a fresh process; its report plus peak RSS and exit code."""
    with tempfile.TemporaryDirectory(prefix="bench-speed-result-") as scratch:
        result_path = Path(scratch) / "result.json"
        argv = [sys.executable, "-m", "bench.speed", "--run-one", json.dumps(dataclasses.asdict(config)),
                "--result", str(result_path)]
        logger.info("running %s", config.label)
        child: ChildRun = run_child(argv, timeout_s)
        report = json.loads(result_path.read_text()) if result_path.exists() else {}
    report.update(label=config.label, dtype=config.dtype, batch_size=config.batch_size,
                  exit_code=child.exit_code, process_wall_s=child.wall_s, peak_rss_mib=child.peak_rss_bytes / MIB)
    return report


def render(reports: Sequence[Dict[str, object]], header: Dict[str, object]) -> str:
    """The markdown report: what was measured, then the per-stage and end-to-end tables."""
    columns = []  # (heading, report, run)
    for report in reports:
        runs = report.get("runs") or [None]
        for run in runs:
            suffix = ""
            if run is not None and run.get("cache_hit") is not None:
                suffix = " (cache hit)" if run["cache_hit"] else " (cache miss)"
            columns.append((f"{report['label']}{suffix}", report, run))
    latentsync = header.get("model") == "latentsync"
    stages = LATENTSYNC_STAGES if latentsync else STAGES
    lines = [
        f"## {'LatentSync' if latentsync else 'MuseTalk'} engine speed",
        "",
        f"- machine: {header['machine']}",
        f"- device: {header['device']}",
        f"- models: {header['models']}",
        f"- version: {header.get('version') or 'the default'}",
        f"- media: {header['media']}",
        f"- face back-end: {header['landmarks']}",
        f"- video encoder: {header.get('video_codec', '—')}",
        f"- engine: {header['engine']}",
        "",
        "### Per stage: seconds (frames per second)",
        "",
        ("Source stages count source frames (decoded at 25 fps), the others output frames. Each 16-frame chunk "
         "goes through the stages in turn; the last row is the job's wall time minus their sum. On a GPU the "
         "generate and restore rows are GPU time (CUDA events), the others wall time." if latentsync else
         "Prepare stages count source frames, generate stages output frames. Decoding, store reads, pasting "
         "and encoding run on threads of their own, overlapping the UNet and VAE, so the stages can add up to "
         "more than the job: the last row is the job's wall time minus their sum. On a GPU the UNet, VAE and "
         "blend rows are GPU time (CUDA events), the others wall time."),
        "",
        "| stage | " + " | ".join(c[0] for c in columns) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for key, label, counted in stages + (("other", "job minus the stages' sum", "output"),):
        if key == "cache" and not any(run and "cache" in run["timings"] for _, _, run in columns):
            continue
        cells = [_stage_cell(report, run, key, counted) for _, report, run in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### End to end",
        "",
        "fps: output frames / job seconds; real-time factor: job seconds / audio seconds (below 1 is faster than "
        "real time); peak RSS: the whole process (models included), largest of it and its ffmpeg children; "
        "load average after: the machine's 1-minute load when the job ended (above the torch threads: others "
        "were using the CPU too).",
        "",
        "| config | frames | job s | fps | real-time factor | load s | warm-up s | RSS after load MiB "
        "| peak RSS MiB | peak GPU MiB | load average after |",
        "| --- |" + " ---: |" * 10,
    ]
    for heading, report, run in columns:
        lines.append(f"| {heading} | " + " | ".join(_end_to_end_cells(report, run)) + " |")
    return "\n".join(lines)


def _failure(report: Dict[str, object]) -> Optional[str]:
    if "refused" in report:
        return f"n/a: {report['refused']}"
    if report["exit_code"] != 0 or not report.get("runs"):
        return f"failed (exit {report['exit_code']})"
    return None


def _stage_cell(report: Dict[str, object], run: Optional[Dict[str, object]], key: str, counted: str) -> str:
    failure = _failure(report)
    if failure:
        return failure
    timings = run["timings"]
    if key == "other":
        seconds = run["wall_s"] - sum(timings.values())
    elif key in timings:
        seconds = timings[key]
    else:
        return "" if key == "cache" else "—"
    if key in ("cache", "other"):
        return f"{seconds:.2f} s"
    frames = run["source_frames"] if counted == "source" else run["frames"]
    rate = f"{frames / seconds:.2f}" if seconds > 0 else "∞"
    return f"{seconds:.2f} s ({rate} fps)"


def _end_to_end_cells(report: Dict[str, object], run: Optional[Dict[str, object]]) -> List[str]:
    failure = _failure(report)
    if failure:
        return [failure] + [""] * 9
    gpu = run["peak_gpu_mib"]
    return [
        str(run["frames"]),
        f"{run['wall_s']:.2f}",
        f"{run['frames'] / run['wall_s']:.2f}",
        f"{run['wall_s'] / run['duration_s']:.2f}",
        f"{report['load_s']:.2f}",
        f"{report['warm_up_s']:.2f}",
        f"{report['rss_after_load_mib']:.0f}",
        f"{report['peak_rss_mib']:.0f}",
        "—" if gpu is None else f"{gpu:.0f}",
        f"{run['load_average_1min']:.2f}",
    ]


def _csv(kind: type, text: str) -> List:
    return [kind(part) for part in text.split(",") if part.strip()]


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="musetalk", choices=MODELS,
                        help="the engine to measure (default musetalk)")
    parser.add_argument("--models", type=Path,
                        help="models folder to use as is (default: random real-architecture models, built once; "
                             "for latentsync the first LatentSync parity fixture's, ../shared/parity/latentsync/"
                             "ls-*/models)")
    parser.add_argument("--tiny", action="store_true", help="random models of shrunk sizes (for tests)")
    parser.add_argument("--source", type=Path, help="face video or image (default: synthetic, see --width...)")
    parser.add_argument("--audio", type=Path, help="speech (default: synthetic, as long as --seconds)")
    parser.add_argument("--width", type=int, default=256, help="synthetic video width (default 256)")
    parser.add_argument("--height", type=int, default=256, help="synthetic video height (default 256)")
    parser.add_argument("--seconds", type=float, default=2.0, help="synthetic media length (default 2)")
    parser.add_argument("--fps", type=float, default=25.0, help="synthetic video frame rate (default 25)")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    parser.add_argument("--dtypes", type=lambda s: _csv(str, s), default=["fp32", "fp16"],
                        help="comma-separated, from fp32,fp16,bf16 (default fp32,fp16)")
    parser.add_argument("--compile", type=lambda s: _csv(str, s), default=["off"],
                        help="comma-separated torch.compile modes to compare, from "
                             "off,default,reduce-overhead,max-autotune (default off)")
    parser.add_argument("--channels-last", action="store_true", help="UNet and VAE decoder in channels-last (CUDA)")
    parser.add_argument("--batch-sizes", type=lambda s: _csv(int, s), default=[4, 8, 16],
                        help="comma-separated (default 4,8,16)")
    parser.add_argument("--landmarks", default="dlib", choices=("dlib", "dwpose"),
                        help="face back-end (dwpose adds random S3FD + DWPose to random models)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeat-with-cache", action="store_true",
                        help="run each job twice with one avatar cache folder (miss, then hit)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per configuration")
    parser.add_argument("--version", default="",
                        help="the model's version (default: its default, musetalk v15, latentsync 1.6)")
    parser.add_argument("--steps", type=int, default=20, help="latentsync: DDIM steps (default 20)")
    parser.add_argument("--guidance", type=float, default=1.5, help="latentsync: guidance scale (default 1.5)")
    parser.add_argument("--no-deepcache", dest="deepcache", action="store_false",
                        help="latentsync: run every step's whole UNet (default: DeepCache)")
    parser.add_argument("--restore", action="store_true",
                        help="musetalk: run each configuration without and with face restoration (GFPGAN v1.4, "
                             "random weights)")
    args = parse_args(parser, argv)

    if args.run_one:
        report = run_one(Config(**json.loads(args.run_one)))
        args.result.write_text(json.dumps(report))
        return 0
    if (args.source is None) != (args.audio is None):
        parser.error("give both --source and --audio, or neither (synthetic media)")
    if args.model == "latentsync":
        if args.restore:
            parser.error("--restore measures MuseTalk's face restoration; run it without --model latentsync")
        # One configuration per dtype (and compile mode): LatentSync's chunk is fixed.
        args.batch_sizes = [LATENTSYNC_CHUNK]
    unknown = sorted(set(args.dtypes) - {"fp32", *HALF_DTYPES})
    if unknown:
        parser.error(f"unknown dtype(s) {', '.join(unknown)}: use fp32, fp16, bf16")
    unknown = sorted(set(args.compile) - set(COMPILE_MODES))
    if unknown:
        parser.error(f"unknown compile mode(s) {', '.join(unknown)}: use {', '.join(COMPILE_MODES)}")
    host, engine = machine(), engine_version()
    with tempfile.TemporaryDirectory(prefix="bench-speed-media-") as scratch:
        models, models_text = _models(args)
        if args.restore:
            models = with_random_gfpgan(models, Path(scratch) / "models-with-gfpgan")
            models_text += "; plus GFPGAN v1.4 with random weights (seed 0), converted as the build does"
        if args.source is None:
            from .media import make_job_media

            source, audio = make_job_media(Path(scratch), width=args.width, height=args.height,
                                           seconds=args.seconds, fps=args.fps)
            media_text = f"synthetic face video {args.width}x{args.height}, {args.fps:g} fps, {args.seconds:g} s; " \
                         f"speech {args.seconds:g} s (bench/media.py)"
        else:
            source, audio = args.source.resolve(), args.audio.resolve()
            media_text = f"{source} + {audio}"
        reports = []
        restores = (False, True) if args.restore else (False,)
        for dtype, batch_size, mode, restore in itertools.product(args.dtypes, args.batch_sizes, args.compile,
                                                                  restores):
            config = Config(str(models), str(source), str(audio), args.device, dtype, batch_size,
                            args.landmarks, args.threads, args.repeat_with_cache, mode, args.channels_last,
                            args.model, args.steps, args.guidance, args.deepcache, restore, args.version)
            reports.append(measure(config, args.timeout))
    device = next((r for r in reports if r.get("device")), {})
    device_text = device.get("gpu") or device.get("device") or args.device
    if device.get("threads"):
        device_text += f" (torch {device['torch']}, {device['threads']} CPU threads)"
    header = {"model": args.model, "machine": describe_machine(host), "device": device_text, "models": models_text, "media": media_text,
              "landmarks": args.landmarks, "video_codec": device.get("video_codec"), "engine": engine,
              "version": args.version or engine_options(args.model).version}
    print(render(reports, header))
    if args.json:
        args.json.write_text(json.dumps({"header": header, "machine": host, "reports": reports}, indent=1) + "\n")
    failed = [r["label"] for r in reports if r["exit_code"] != 0]
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


def with_random_gfpgan(models: Path, dest: Path) -> Path:
    """A folder with every entry of ``models`` (linked) plus GFPGAN v1.4 with seeded random weights, written as
    the release's ``{"params_ema": ...}`` and converted to safetensors by the build's converter."""
    import torch
    from spandrel.architectures.GFPGAN import GFPGAN

    from builder.pth_to_safetensors import convert
    from musetalk_worker.restoration.network import WEIGHTS

    dest.mkdir(parents=True)
    target = dest / WEIGHTS
    for item in models.iterdir():
        if item.name != target.parent.name:  # a folder's own GFPGAN is not what the bench measures
            (dest / item.name).symlink_to(item)
    target.parent.mkdir()
    torch.manual_seed(0)
    release = target.with_suffix(".pth")
    torch.save({"params_ema": GFPGAN().state_dict()}, release)
    convert(release, target, {})
    release.unlink()
    return dest


def _models(args: argparse.Namespace) -> tuple:
    if args.models is None and args.model == "latentsync":
        models = latentsync_fixture_models().resolve()
        return models, f"LatentSync parity fixture (small random weights of the real architecture), {models}"
    if args.models is not None:
        return args.models.resolve(), str(args.models.resolve())
    from .random_models import build_models, default_dest

    dest = build_models(default_dest(args.tiny), tiny=args.tiny, with_dwpose=args.landmarks == "dwpose")
    kind = "shrunk (--tiny)" if args.tiny else "real architectures (UNet 849.9 M parameters)"
    return dest, f"random weights, {kind}, {dest}"


if __name__ == "__main__":
    sys.exit(main())
