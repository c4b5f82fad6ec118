"""Upstream MuseTalk's ``scripts/inference.py`` and this engine, side by side, on the same job.

Both get the same source video, speech, models and face boxes: the boxes are
found once here (dlib landmarks, this engine's box arithmetic, which is
upstream's) and given to this engine as the job's ``boxes`` and to upstream as
the coordinate pickle that ``--use_saved_coord`` reads, so neither side runs
face detection (``--boxes FILE`` keeps them, for a machine without dlib;
``--boxes-only`` writes that file for the media). The runs alternate
(upstream, engine, upstream, ...), each in a fresh process, and the table gives
the median of each side, the ratio, and every pair::

    python -m bench.side_by_side --upstream ~/MuseTalk --upstream-python ~/musetalk-env/bin/python \\
        --runs 4 --device cpu --width 704 --height 1216 --seconds 4 --fps 25

Nothing of upstream is installed or changed: its ``musetalk/``, ``scripts/`` and
``configs/`` are copied into a scratch folder with a ``models/`` folder of links
to ``--models`` (and, when its import builds them, random DWPose and S3FD
weights, which the saved boxes make unused). Its stages are timed by
:mod:`bench.upstream_probe`, injected as ``sitecustomize`` through
``PYTHONPATH``, which wraps upstream's functions as they are imported.

The engine overlaps its networks on two threads, so its per-stage seconds
share the CPU and cannot be set beside upstream's one-after-the-other stages;
a second table sets upstream's network stages beside this engine's networks
timed alone (:mod:`bench.images_per_call`, in a fresh process, times the
images the job ran through each; ``--no-networks-alone`` leaves it out).

Before each timed run the machine must be idle: the share of the CPUs others
use is sampled (``/proc/stat``, over ``--idle-sample`` seconds; elsewhere the
1-minute load average) and must be at most ``--max-busy`` cores; it waits up
to ``--wait-idle`` seconds, then refuses (exit status 3). ``--allow-busy``
times anyway and marks the table as taken under load (for development).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from . import FIXTURE_MODELS, ROOT, describe_machine, engine_version, machine

logger = logging.getLogger("bench.side_by_side")

PROBE = Path(__file__).with_name("upstream_probe.py")
REFUSED_BUSY = 3
# (label, upstream probe stages (summed; a leading "-" subtracts), this engine's timing keys (summed)).
STAGE_ROWS = (
    ("decode source frames (upstream: ffmpeg to PNG + read)", ("ffmpeg_decode", "read"), ("decode",)),
    ("faces: detection + landmarks (saved boxes: none)", ("faces",), ("faces",)),
    ("audio: Whisper features + encoder", ("audio",), ("audio",)),
    ("latents: VAE encode", ("latents",), ("latents",)),
    ("UNet", ("unet",), ("unet",)),
    ("VAE decode", ("vae_decode",), ("vae_decode",)),
    ("masks: face parsing (BiSeNet)", ("masks",), ("masks",)),
    ("blend (upstream: get_image less parsing)", ("blend_total", "-masks"), ("blend", "paste")),
    ("read (store)", (), ("read",)),
    ("encode (upstream: PNG writes + 2 ffmpeg)", ("write_png", "ffmpeg_encode", "ffmpeg_mux"), ("encode",)),
    ("avatar cache (hash, save, load)", (), ("cache",)),
)
# The networks timed alone (see networks_alone): (label, upstream probe stage, bench.images_per_call network,
# images per frame, counted on the source frames the engine prepared (True) or on the output frames (False)).
ALONE_ROWS = (
    ("VAE encode", "latents", "VAE encode (per image)", 2, True),
    ("UNet", "unet", "UNet", 1, False),
    ("VAE decode", "vae_decode", "VAE decode", 1, False),
    ("face parsing (BiSeNet)", "masks", "face parsing (512x512)", 1, True),
)


# ---------------------------------------------------------------- the box file


def write_upstream_boxes(path: Path, boxes: Sequence[Tuple[int, int, int, int]]) -> Path:
    """Writes ``boxes`` (x1, y1, x2, y2 per source frame, before extra_margin) as upstream's coordinate pickle.

    Upstream's ``get_landmark_and_bbox`` pickles a list of one tuple of ints
    per frame; ``--use_saved_coord`` loads it back and compares each entry
    with ``coord_placeholder`` (``(0.0, 0.0, 0.0, 0.0)``, no face).
    """
    coords = [tuple(int(v) for v in box) for box in boxes]
    with open(path, "wb") as handle:
        pickle.dump(coords, handle)
    return Path(path)


def read_upstream_boxes(path: Path) -> List[Tuple[int, int, int, int]]:
    with open(path, "rb") as handle:
        return [tuple(int(v) for v in box) for box in pickle.load(handle)]


def find_boxes(video: Path, landmarks: str = "dlib", models: Optional[Path] = None) -> List[Tuple[int, int, int, int]]:
    """The face box of every frame of ``video`` (this engine's arithmetic, clipped to the frame, no margin).

    Raises:
        SystemExit: a frame without a face (upstream's saved-box path would shift later frames).
    """
    from musetalk_worker.decode import iter_video_frames, probe
    from musetalk_worker.engines.musetalk import boxes as box_math
    from musetalk_worker.faces import load_face_analyzer

    info = probe(Path(video))
    analyzer = load_face_analyzer(landmarks, models or FIXTURE_MODELS, "cpu")
    found = []
    for index, frame in enumerate(iter_video_frames(info)):
        detection = analyzer.detect([frame])[0]
        if detection is None:
            raise SystemExit(f"frame {index} of {video} has no face; use a source with a face in every frame")
        box = box_math.face_box(detection.landmarks, detection.detector_box)
        found.append(box_math.clip_box(box, info.width, info.height))
    return found


def saved_boxes(path: Path, video: Path, models: Optional[Path] = None) -> List[Tuple[int, int, int, int]]:
    """The boxes of ``video`` kept in ``path`` (JSON, one ``[x1, y1, x2, y2]`` per frame): read when the file
    exists, else found (:func:`find_boxes`, dlib) and written there.

    A machine without dlib (a lent GPU machine) times with boxes found elsewhere
    on the same synthetic media; both sides get them, so only their validity matters.

    Raises:
        SystemExit: the file's boxes do not fit ``video`` (count, frame size), or are not boxes.
    """
    if not path.is_file():
        boxes = find_boxes(video, models=models)
        path.write_text(json.dumps([list(box) for box in boxes]) + "\n")
        return boxes
    from musetalk_worker.decode import probe

    info = probe(video)
    try:
        boxes = [tuple(int(v) for v in box) for box in json.loads(path.read_text())]
    except (ValueError, TypeError) as exc:
        raise SystemExit(f"{path} does not hold a JSON list of [x1, y1, x2, y2] boxes ({exc}); delete it to "
                         "find the boxes again") from exc
    if len(boxes) != info.estimated_frames:
        raise SystemExit(f"{path} holds {len(boxes)} boxes but {video} has {info.estimated_frames} frames: "
                         "boxes for other media (delete it, or make it for these media with --boxes-only)")
    for index, box in enumerate(boxes):
        x1, y1, x2, y2 = box if len(box) == 4 else (0, 0, 0, 0)
        if not (0 <= x1 < x2 <= info.width and 0 <= y1 < y2 <= info.height):
            raise SystemExit(f"box {index} in {path}, {list(box)}, is not a box inside the "
                             f"{info.width}x{info.height} frame")
    return boxes


# ---------------------------------------------------------------- the idle check


def busy_cores(sample_s: float) -> float:
    """How many cores' worth of CPU time the machine used during the next ``sample_s`` seconds.

    From ``/proc/stat`` (every process's time, ours included: call it while
    nothing of the benchmark runs); the 1-minute load average where there is none.
    """
    def read() -> Optional[Tuple[int, int]]:
        try:
            fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        except (OSError, ValueError, IndexError):
            return None
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]), idle

    first = read()
    if first is None:
        return os.getloadavg()[0]
    time.sleep(sample_s)
    second = read()
    total, idle = second[0] - first[0], second[1] - first[1]
    if total <= 0:
        return 0.0
    return (1 - idle / total) * (os.cpu_count() or 1)


def wait_until_idle(max_busy: float, wait_s: float, sample_s: float) -> Tuple[bool, float]:
    """Samples until others use at most ``max_busy`` cores or ``wait_s`` has passed: (idle, last sample)."""
    deadline = time.monotonic() + wait_s
    while True:
        busy = busy_cores(sample_s)
        if busy <= max_busy or time.monotonic() >= deadline:
            return busy <= max_busy, busy
        logger.info("machine busy (%.2f cores in use, at most %.2f allowed): waiting", busy, max_busy)
        time.sleep(min(10.0, max(0.0, deadline - time.monotonic())))


# ---------------------------------------------------------------- upstream's side


def prepare_upstream(upstream: Path, models: Path, work: Path, video: Path, audio: Path,
                     boxes: Sequence[Tuple[int, int, int, int]]) -> Path:
    """A scratch copy of upstream's code in ``work/upstream``, with ``models/``, the media and the boxes.

    Upstream finds everything relative to its working directory (``./models``,
    ``./musetalk/utils/dwpose/...``), so it runs from this copy.
    """
    run_dir = work / "upstream"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    for part in ("musetalk", "scripts", "configs"):
        if (upstream / part).is_dir():
            shutil.copytree(upstream / part, run_dir / part, ignore=shutil.ignore_patterns("__pycache__"))
    if not (run_dir / "scripts" / "inference.py").is_file():
        raise SystemExit(f"{upstream} has no scripts/inference.py: is it a MuseTalk checkout?")
    model_dir = run_dir / "models"
    model_dir.mkdir()
    for entry in Path(models).iterdir():
        (model_dir / entry.name).symlink_to(entry.resolve())
    _add_detector_weights(run_dir)
    inputs = run_dir / "inputs"
    inputs.mkdir()
    # Upstream names its outputs and the box pickle after the files' stems.
    shutil.copy(video, inputs / "source.mp4")
    shutil.copy(audio, inputs / "speech.wav")
    write_upstream_boxes(run_dir / "source.pkl", boxes)
    (run_dir / "task.yaml").write_text(
        "task_0:\n"
        f"  video_path: {inputs / 'source.mp4'}\n"
        f"  audio_path: {inputs / 'speech.wav'}\n"
        "  result_name: out.mp4\n"
    )
    (work / "probe").mkdir(exist_ok=True)
    shutil.copy(PROBE, work / "probe" / "sitecustomize.py")
    return run_dir


def _add_detector_weights(run_dir: Path) -> None:
    """Random S3FD and DWPose weights where upstream's ``preprocessing`` builds them at import.

    The boxes are given, so neither network runs on a frame; only their build
    is part of upstream's load time, as with the real weights.
    """
    preprocessing = run_dir / "musetalk" / "utils" / "preprocessing.py"
    text = preprocessing.read_text() if preprocessing.is_file() else ""
    if "init_model" not in text and "FaceAlignment" not in text:
        return
    from musetalk_worker.faces import DWPOSE_WEIGHTS, S3FD_WEIGHTS

    from . import random_models

    aux = Path.home() / ".cache" / "musetalk-worker" / "upstream-detectors"
    aux.mkdir(parents=True, exist_ok=True)
    random_models._write_s3fd(aux, 0)
    random_models._write_dwpose(aux, 0)
    portable = _portable_checkpoint(aux / DWPOSE_WEIGHTS)
    dwpose = run_dir / "models" / "dwpose"
    if dwpose.is_symlink():
        # The models folder has its own dwpose/ (built --with-dwpose): a folder of the run's instead,
        # so that nothing is written into the user's models.
        dwpose.unlink()
    dwpose.mkdir(exist_ok=True)
    (dwpose / DWPOSE_WEIGHTS.name).symlink_to(portable)
    sfd = run_dir / "musetalk" / "utils" / "face_detection" / "detection" / "sfd"
    if sfd.is_dir():
        (sfd / "s3fd.pth").symlink_to(aux / S3FD_WEIGHTS)


def _portable_checkpoint(path: Path) -> Path:
    """A copy of a checkpoint beside it whose metadata holds lists where it held numpy arrays (made once).

    DWPose's keypoint metadata is pickled numpy; written under numpy 2 it names ``numpy._core``, which
    upstream's own pins (numpy 1.23) cannot unpickle. The weights are the same tensors.
    """
    import numpy as np
    import torch

    target = path.with_name(f"{path.stem}.portable{path.suffix}")
    if target.exists():
        return target

    def plain(value):
        if isinstance(value, np.ndarray):
            return value.tolist()
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(plain(v) for v in value)
        return value

    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    checkpoint["meta"] = plain(checkpoint.get("meta", {}))
    draft = target.with_name(target.name + ".part")
    torch.save(checkpoint, draft)
    draft.rename(target)
    return target


def upstream_argv(python: str, batch_size: int, half: bool = False) -> List[str]:
    """Upstream's ``scripts/inference.py`` command line for the scratch copy; ``half``: ``--use_float16``."""
    ffmpeg = shutil.which("ffmpeg")
    return [
        python, "-m", "scripts.inference", "--inference_config", "task.yaml", "--result_dir", "results",
        "--unet_model_path", "models/musetalkV15/unet.pth", "--unet_config", "models/musetalkV15/musetalk.json",
        "--whisper_dir", "models/whisper", "--vae_type", "sd-vae", "--version", "v15",
        "--batch_size", str(batch_size), "--use_saved_coord", "--saved_coord",
        "--ffmpeg_path", str(Path(ffmpeg).parent) if ffmpeg else ".",
    ] + (["--use_float16"] if half else [])


def upstream_env(probe_dir: Path, run_dir: Path, report_path: Path, device: str, threads: int) -> Dict[str, str]:
    """Upstream's environment: the probe and its code first on ``PYTHONPATH``, then the inherited path
    (where packages are installed with ``--target``, as on a lent GPU machine)."""
    env = _child_env(device, threads)
    inherited = [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []
    env["PYTHONPATH"] = os.pathsep.join([str(probe_dir), str(run_dir)] + inherited)
    env["SIDE_BY_SIDE_REPORT"] = str(report_path)
    # Upstream was written for torch 2.0, whose torch.load unpickled anything (its checkpoints hold numpy arrays).
    env["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
    return env


def run_upstream(python: str, run_dir: Path, probe_dir: Path, batch_size: int, device: str, threads: int,
                 timeout_s: float, half: bool = False) -> Dict[str, object]:
    """One upstream run in a fresh process: wall time, load time, per-stage seconds, output frames.

    ``half``: upstream's own half precision (``--use_float16``: its UNet, VAE and Whisper in float16).
    """
    shutil.rmtree(run_dir / "results", ignore_errors=True)
    report_path = run_dir / "probe-report.json"
    report_path.unlink(missing_ok=True)
    env = upstream_env(probe_dir, run_dir, report_path, device, threads)
    started = time.time()
    done = subprocess.run(upstream_argv(python, batch_size, half), cwd=run_dir, env=env, capture_output=True, text=True,
                          check=False, timeout=timeout_s)
    ended = time.time()
    output = run_dir / "results" / "v15" / "out.mp4"
    log = (done.stdout + done.stderr)[-4000:]
    if not report_path.is_file():
        raise RuntimeError(f"upstream wrote no probe report (exit {done.returncode}); its log ends:\n{log}")
    probe = json.loads(report_path.read_text())
    # Upstream prints its exceptions and exits 0: only the video says whether it worked.
    if done.returncode != 0 or not output.is_file():
        made = "made" if output.is_file() else "missing"
        raise RuntimeError(f"upstream failed (exit {done.returncode}, output {made}"
                           f"); its log ends:\n{log}")
    loaded = probe["marks"].get("loaded", ended)
    stages = probe["seconds"]
    return {
        "side": "upstream",
        "wall_s": ended - started,
        "load_s": loaded - started,
        "after_load_s": ended - loaded,
        "stages": stages,
        "items": probe["items"],
        "frames": count_frames(output),
        "source_frames": probe["items"].get("latents", 0),
    }


# ---------------------------------------------------------------- this engine's side


def run_ours(config: Dict[str, object], device: str, threads: int, timeout_s: float) -> Dict[str, object]:
    """One run of this engine in a fresh process (``--run-ours``), measured the same way."""
    with tempfile.TemporaryDirectory(prefix="side-by-side-ours-") as scratch:
        result = Path(scratch) / "result.json"
        argv = [sys.executable, "-m", "bench.side_by_side", "--run-ours", json.dumps(config), "--result", str(result)]
        started = time.time()
        done = subprocess.run(argv, cwd=ROOT, env=_child_env(device, threads), capture_output=True, text=True,
                              check=False, timeout=timeout_s)
        ended = time.time()
        if done.returncode != 0 or not result.is_file():
            raise RuntimeError(f"this engine failed (exit {done.returncode}); its log ends:\n"
                               f"{(done.stdout + done.stderr)[-4000:]}")
        report = json.loads(result.read_text())
    return {
        "side": "engine",
        "wall_s": ended - started,
        "load_s": report["loaded"] - started,
        "after_load_s": ended - report["loaded"],
        "stages": report["timings"],
        "frames": report["frames"],
        "source_frames": report["source_frames"],
        "cache_hit": report["cache_hit"],
    }


def _run_ours_child(config: Dict[str, object], result: Path) -> int:
    """The child of :func:`run_ours`: load the engine, run the job once, report."""
    import torch

    from musetalk_worker import MuseTalkOptions
    from musetalk_worker.engine import load_engine
    from musetalk_worker.options import EngineConfig

    torch.set_num_threads(int(config["threads"]))
    cache = config.get("cache_dir")
    pipe = load_engine("musetalk", EngineConfig(Path(config["models"]), device=config["device"],
                                                landmarks=config.get("landmarks", "dlib"),
                                                cache_dir=Path(cache) if cache else None))
    loaded = time.time()
    options = MuseTalkOptions(batch_size=int(config["batch_size"]), boxes=[tuple(b) for b in config["boxes"]],
                              fp16=bool(config.get("fp16")))
    with tempfile.TemporaryDirectory(prefix="side-by-side-out-") as scratch:
        out = pipe(Path(config["video"]), Path(config["audio"]), Path(scratch) / "out.mp4", options)
        frames = count_frames(out.path)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    result.write_text(json.dumps({"loaded": loaded, "timings": out.timings, "frames": frames,
                                  "source_frames": out.source_frames, "cache_hit": out.cache_hit}))
    return 0


def _child_env(device: str, threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["MUSETALK_WEIGHTS_LOCK"] = "none"
    if device == "cpu":
        # Upstream takes the GPU whenever there is one.
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def count_frames(video: Path) -> int:
    done = subprocess.run(
        ["ffprobe", "-v", "error", "-select_streams", "v:0", "-count_packets", "-show_entries",
         "stream=nb_read_packets", "-of", "csv=p=0", str(video)],
        capture_output=True, text=True, check=True,
    )
    return int(done.stdout.strip().split(",")[0])


def networks_alone(models: Path, device: str, threads: int, batch_size: int, timeout_s: float) -> Dict[str, float]:
    """Milliseconds per image of each of this engine's networks run alone, at the call size the engine uses.

    The engine overlaps its networks on two threads, so its per-stage seconds
    in a job share the CPU with each other and cannot be set beside
    upstream's, which run one after the other. These come from
    :mod:`bench.images_per_call` in a fresh process: the VAE and face parsing at
    :func:`musetalk_worker.device.images_per_call`'s size, the UNet at the batch size.
    """
    import torch

    from musetalk_worker.device import images_per_call

    per_call = images_per_call(torch.device(device)) or batch_size
    with tempfile.TemporaryDirectory(prefix="side-by-side-alone-") as scratch:
        out = Path(scratch) / "figures.json"
        argv = [sys.executable, "-m", "bench.images_per_call", "--models", str(models), "--device", device,
                "--sizes", str(per_call), str(batch_size), "--repeats", "2", "--json", str(out)]
        done = subprocess.run(argv, cwd=ROOT, env=_child_env(device, threads), capture_output=True, text=True,
                              check=False, timeout=timeout_s)
        if done.returncode != 0 or not out.is_file():
            raise RuntimeError(f"bench.images_per_call failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        figures = json.loads(out.read_text())["figures"]
    return {name: row[str(batch_size if name == "UNet" else per_call)] for name, row in figures.items()}


# ---------------------------------------------------------------- the table


def stage_seconds(run: Dict[str, object], keys: Sequence[str]) -> Optional[float]:
    """Sum of a run's stages ``keys`` (``-name`` subtracts); None when it has none of them."""
    stages = run["stages"]
    present = [k for k in keys if k.lstrip("-") in stages]
    if not present:
        return None
    return sum(-stages[k[1:]] if k.startswith("-") else stages[k] for k in present)


def _images_through(run: Dict[str, object], stage: str, on_source: bool) -> int:
    """Frames an engine run sent through a network: its output frames, or the source frames it prepared
    (none on an avatar cache hit, which runs no ``stage``)."""
    if not on_source:
        return run["frames"]
    return run["source_frames"] if stage in run["stages"] else 0


def _median(values: Sequence[Optional[float]]) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _cell(value: Optional[float], digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio(upstream: Optional[float], ours: Optional[float]) -> str:
    if upstream is None or ours is None or ours <= 0 or upstream <= 0:
        return "—"
    return f"{upstream / ours:.2f}x"


def render(header: Dict[str, object], upstream: Sequence[Dict], ours: Sequence[Dict],
           alone: Optional[Dict[str, float]] = None) -> str:
    """The markdown report: what ran where, the medians side by side with their ratio, the networks alone
    (``alone``: :func:`networks_alone`'s figures), then every pair."""
    lines = ["## Side by side: upstream MuseTalk vs this engine", ""]
    if header.get("under_load"):
        lines += ["**TAKEN UNDER LOAD** (`--allow-busy`): other work used the CPU before some runs (busy cores "
                  "below); the figures are not a fair comparison.", ""]
    for key in ("machine", "device", "upstream", "engine", "models", "media", "boxes", "runs"):
        lines.append(f"- {key}: {header[key]}")
    lines += [
        "",
        f"Median of {len(upstream)} upstream and {len(ours)} engine runs, seconds; ratio = upstream / this engine "
        "(above 1: this engine is faster). The engine's decoding, reading, pasting and encoding overlap its "
        "networks on threads of their own, so its stages can add up to more than its job.",
        "",
        "| figure | upstream | this engine | ratio |",
        "| --- | ---: | ---: | ---: |",
    ]
    for label, key in (("wall (process start to exit)", "wall_s"), ("load (start to first job)", "load_s"),
                       ("after loading", "after_load_s")):
        u, o = _median([r[key] for r in upstream]), _median([r[key] for r in ours])
        lines.append(f"| {label} | {_cell(u)} | {_cell(o)} | {_ratio(u, o)} |")
    for label, up_keys, our_keys in STAGE_ROWS:
        u = _median([stage_seconds(r, up_keys) for r in upstream]) if up_keys else None
        o = _median([stage_seconds(r, our_keys) for r in ours])
        if u is None and o is None:
            continue
        lines.append(f"| {label} | {_cell(u)} | {_cell(o)} | {_ratio(u, o)} |")
    for label, key in (("output frames", "frames"), ("source frames", "source_frames")):
        u, o = _median([r[key] for r in upstream]), _median([r[key] for r in ours])
        lines.append(f"| {label} | {_cell(u, 0)} | {_cell(o, 0)} | |")
    if alone:
        lines += ["", "Each network alone, seconds for the job's images: upstream's stage (its stages run one after "
                  "the other), this engine's per-image time from `bench.images_per_call` (fresh process, same "
                  "models and threads, the engine's images per call) times the images the job ran through it.", "",
                  "| network alone | upstream | this engine | ratio |", "| --- | ---: | ---: | ---: |"]
        for label, stage, network, per_frame, on_source in ALONE_ROWS:
            u = _median([stage_seconds(r, (stage,)) for r in upstream])
            images = _median([_images_through(r, stage, on_source) * per_frame for r in ours])
            o = alone[network] * images / 1000 if images else None
            lines.append(f"| {label} | {_cell(u)} | {_cell(o) if images else 'not run'} | {_ratio(u, o)} |")
    lines += [
        "",
        "| pair | upstream wall s | engine wall s | ratio | upstream after load s | engine after load s | ratio "
        "| busy cores before (upstream, engine) | load average after (upstream, engine) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for i, (u, o) in enumerate(zip(upstream, ours), 1):
        lines.append(
            f"| {i} | {u['wall_s']:.2f} | {o['wall_s']:.2f} | {_ratio(u['wall_s'], o['wall_s'])} "
            f"| {u['after_load_s']:.2f} | {o['after_load_s']:.2f} | {_ratio(u['after_load_s'], o['after_load_s'])} "
            f"| {u['busy_before']:.2f}, {o['busy_before']:.2f} "
            f"| {u['load_after'][0]:.2f}, {o['load_after'][0]:.2f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def _python_versions(python: str) -> str:
    code = ("import sys, importlib.metadata as m\n"
            "v = lambda n: next((m.version(n) for _ in [0] if n in {d.metadata['Name'].lower() for d in "
            "m.distributions()}), 'absent')\n"
            "print(f\"Python {sys.version.split()[0]}, torch {v('torch')}, diffusers {v('diffusers')}, "
            "transformers {v('transformers')}\")")
    done = subprocess.run([python, "-c", code], capture_output=True, text=True, check=False)
    return done.stdout.strip() or f"unknown ({done.stderr.strip()[-200:]})"


def _commit(path: Path) -> str:
    done = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False)
    return done.stdout.strip() if done.returncode == 0 else "not a git checkout"


def _media(args: argparse.Namespace, folder: Path) -> Tuple[Path, Path]:
    from .media import make_speech, make_video

    if args.source and args.audio:
        return args.source.resolve(), args.audio.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    video = folder / f"face-{args.width}x{args.height}-{args.seconds:g}s-{args.fps:g}fps.mp4"
    speech = folder / f"speech-{args.audio_seconds or args.seconds:g}s.wav"
    if not video.exists():
        make_video(video, width=args.width, height=args.height, seconds=args.seconds, fps=args.fps)
    if not speech.exists():
        make_speech(speech, seconds=args.audio_seconds or args.seconds)
    return args.source.resolve() if args.source else video, args.audio.resolve() if args.audio else speech


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", type=Path, help="a MuseTalk checkout (TMElyralab/MuseTalk)")
    parser.add_argument("--upstream-python", help="a Python with upstream's requirements (default this one)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads of each side")
    parser.add_argument("--models", type=Path, default=FIXTURE_MODELS,
                        help="models folder (standard layout; default the parity fixture's small models)")
    parser.add_argument("--source", type=Path, help="source video (default a synthetic face video)")
    parser.add_argument("--audio", type=Path, help="speech (default synthetic speech)")
    parser.add_argument("--width", type=int, default=704)
    parser.add_argument("--height", type=int, default=1216)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of the synthetic source")
    parser.add_argument("--audio-seconds", type=float, help="length of the synthetic speech (default --seconds)")
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--cached-avatar", action="store_true",
                        help="this engine runs with an avatar cache filled by an untimed run first")
    parser.add_argument("--max-busy", type=float, default=0.3, help="cores others may use before a run (0.3)")
    parser.add_argument("--wait-idle", type=float, default=300, help="seconds to wait for an idle machine (300)")
    parser.add_argument("--idle-sample", type=float, default=3.0, help="seconds the idle check samples (3)")
    parser.add_argument("--allow-busy", action="store_true",
                        help="time even when the machine is busy; the table says it was taken under load")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--fp16", action="store_true",
                        help="this engine's jobs ask for fp16 (bfloat16 on a CPU with it in hardware); upstream "
                             "gets --use_float16 on CUDA and stays in float32 on the CPU (its half precision is "
                             "float16, slow there), so on the CPU the table compares two precisions")
    parser.add_argument("--landmarks", choices=("dlib", "dwpose"), default="dlib",
                        help="the engine's face back-end: loaded (as upstream builds its DWPose), never run, the "
                             "boxes being given; dwpose where dlib is not installed (default dlib)")
    parser.add_argument("--boxes", type=Path,
                        help="face boxes as JSON, one [x1, y1, x2, y2] per source frame: read from this file when "
                             "it exists (a machine without dlib), else found with dlib and written there")
    parser.add_argument("--boxes-only", action="store_true",
                        help="only write --boxes for the media, for a machine without dlib; no timing")
    parser.add_argument("--no-networks-alone", action="store_true",
                        help="leave out the table of this engine's networks timed alone")
    parser.add_argument("--work", type=Path, help="scratch folder (default a temporary one)")
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--run-ours", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.run_ours:
        return _run_ours_child(json.loads(args.run_ours), args.result)
    media_folder = Path.home() / ".cache" / "musetalk-worker" / "side-by-side-media"
    if args.boxes_only:
        if args.boxes is None:
            parser.error("--boxes-only needs --boxes FILE")
        video, _ = _media(args, media_folder)
        logger.info("%d boxes for %s in %s", len(saved_boxes(args.boxes, video, args.models)), video.name, args.boxes)
        return 0
    if args.upstream is None:
        parser.error("--upstream is required (a MuseTalk checkout)")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    upstream = args.upstream.resolve()
    python = args.upstream_python or sys.executable
    upstream_half = args.fp16 and args.device == "cuda"
    precision = ("; both sides in half precision (the engine's fp16, upstream's --use_float16)" if upstream_half
                 else "; the engine's jobs with fp16 (upstream float32)")
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as scratch:
        work = (args.work or Path(scratch)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        video, audio = _media(args, media_folder)
        boxes = saved_boxes(args.boxes, video, args.models) if args.boxes else find_boxes(video, models=args.models)
        run_dir = prepare_upstream(upstream, args.models.resolve(), work, video, audio, boxes)
        config = {"models": str(args.models.resolve()), "device": args.device, "threads": args.threads,
                  "batch_size": args.batch_size, "boxes": [list(b) for b in boxes], "video": str(video),
                  "audio": str(audio), "cache_dir": str(work / "avatar-cache") if args.cached_avatar else None,
                  "fp16": args.fp16, "landmarks": args.landmarks}
        if args.cached_avatar:
            logger.info("filling the avatar cache (untimed)")
            run_ours(config, args.device, args.threads, args.timeout)
        info = machine()
        runs: Dict[str, List[Dict]] = {"upstream": [], "engine": []}
        under_load = False
        for i in range(args.runs):
            for side in ("upstream", "engine"):
                idle, busy = wait_until_idle(args.max_busy, args.wait_idle, args.idle_sample)
                if not idle:
                    if not args.allow_busy:
                        logger.error("refusing to time: others use %.2f cores (at most %.2f allowed, "
                                     "--max-busy); --allow-busy times anyway", busy, args.max_busy)
                        return REFUSED_BUSY
                    under_load = True
                logger.info("run %d/%d: %s (%.2f cores busy before)", i + 1, args.runs, side, busy)
                if side == "upstream":
                    run = run_upstream(python, run_dir, work / "probe", args.batch_size, args.device, args.threads,
                                       args.timeout, half=upstream_half)
                else:
                    run = run_ours(config, args.device, args.threads, args.timeout)
                run.update(busy_before=busy, load_after=list(os.getloadavg()))
                logger.info("%s: %.2f s wall, %.2f s after loading, %d frames", side, run["wall_s"],
                            run["after_load_s"], run["frames"])
                runs[side].append(run)
    rate = Fraction(args.fps).limit_denominator(1001)
    header = {
        "machine": describe_machine(info),
        "device": (f"{args.device}, {args.threads} threads each (OMP_NUM_THREADS; the engine also "
                   "torch.set_num_threads)"),
        "upstream": f"{upstream} ({_commit(upstream)}), {_python_versions(python)}",
        "engine": f"{engine_version()}, {_python_versions(sys.executable)}",
        "models": str(args.models),
        "media": (f"{video.name} ({args.width}x{args.height}, {rate} fps, {len(boxes)} frames) and {audio.name}"
                  if not args.source else f"{video} and {audio}"),
        "boxes": (f"{len(boxes)} boxes from dlib landmarks" + (f" (kept in {args.boxes})" if args.boxes else "")
                  + f"; upstream given --use_saved_coord, the engine 'boxes' (its {args.landmarks} back-end "
                  "loaded, unused); "
                  f"batch size {args.batch_size}" + ("; the engine from its avatar cache" if args.cached_avatar
                                                     else "")
                  + (precision if args.fp16 else "")),
        "runs": f"{args.runs} of each, alternating, upstream first, each a fresh process",
        "under_load": under_load,
    }
    alone = None
    if not (args.no_networks_alone or args.fp16):  # the networks alone are timed in float32
        logger.info("timing this engine's networks alone")
        alone = networks_alone(args.models.resolve(), args.device, args.threads, args.batch_size, args.timeout)
    text = render(header, runs["upstream"], runs["engine"], alone)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"header": header, "runs": runs, "networks_alone_ms": alone}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
