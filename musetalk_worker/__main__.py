"""Command line: ``python -m musetalk_worker --source FACE --audio AUDIO --out OUT.mp4 --models DIR``."""

from __future__ import annotations

# Before anything can import torch: it reads this when it loads.
from .device import enable_mps_fallback

enable_mps_fallback()

import argparse  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Dict, Optional  # noqa: E402

from tqdm import tqdm  # noqa: E402

from .errors import LipSyncError  # noqa: E402
from .options import MODELS, PARSING_MODES, RESTORE_REGIONS, EngineConfig  # noqa: E402
from .schema import engine_field_names, parse_job  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m musetalk_worker", description="Lip-sync a face video or image to speech.")
    p.add_argument("--source", required=True, type=Path, help="face video or still image")
    p.add_argument("--audio", required=True, type=Path, help="speech audio (any format ffmpeg reads)")
    p.add_argument("--out", required=True, type=Path, help="output mp4")
    p.add_argument("--models", required=True, type=Path,
                   help="models folder (standard layout); for --model latentsync also a LatentSync model folder")
    p.add_argument("--model", choices=MODELS, default="musetalk")
    p.add_argument("--version", default=None, help="musetalk: v15 (default) or v1; latentsync: 1.6 (default) or 1.5")
    p.add_argument("--landmarks", choices=("auto", "dwpose", "dlib"), default="auto")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--fp16", action="store_true", default=None,
                   help="half precision: float16 on a GPU, bfloat16 on a CPU with AMX or AVX512-BF16")
    p.add_argument("--crf", type=int, help="video quality, lower is better (18)")
    musetalk = p.add_argument_group("musetalk options")
    musetalk.add_argument("--adapter", type=Path,
                          help="LoRA adapter: a fit's folder (adapter.json + adapter.safetensors) or the "
                          "adapter.safetensors file alone")
    musetalk.add_argument("--batch-size", type=int, help="frames per UNet/VAE batch (8)")
    musetalk.add_argument("--bbox-shift", type=int, help="moves the top of the face box (0)")
    musetalk.add_argument("--extra-margin", type=int, help="pixels below the chin; default 10 for v15, 0 for v1")
    musetalk.add_argument("--parsing-mode", choices=PARSING_MODES, help="default: jaw for v15, raw for v1")
    musetalk.add_argument("--left-cheek-width", type=int, help="(90)")
    musetalk.add_argument("--right-cheek-width", type=int, help="(90)")
    musetalk.add_argument("--fps", type=float, help="frame rate for a still image source (25)")
    musetalk.add_argument("--restore", action="store_true", default=None,
                          help="GFPGAN v1.4 face restoration of the generated face (needs the gfpgan weights)")
    musetalk.add_argument("--restore-weight", type=float, help="how much of the restored face, 0 to 1 (0.7)")
    musetalk.add_argument("--restore-region", choices=RESTORE_REGIONS,
                          help="face (the blend mask, default) or mouth")
    latentsync = p.add_argument_group("latentsync options")
    latentsync.add_argument("--steps", type=int, help="DDIM steps (20)")
    latentsync.add_argument("--guidance", type=float, help="guidance scale, 1.0 = none (1.5)")
    latentsync.add_argument("--seed", type=int, help="seed of the noise and the VAE samples (1247)")
    latentsync.add_argument("--deepcache", action=argparse.BooleanOptionalAction, default=None,
                            help="DeepCache on the UNet (on)")
    return p


def _job(args: argparse.Namespace) -> dict:
    """The job input the arguments describe, so the CLI validates exactly as the worker does."""
    job = {"source": str(args.source), "audio": str(args.audio), "model": args.model}
    if args.adapter is not None:
        # Checked by the schema as a job's would be (model musetalk only); the file's hash stands in for the job's.
        from .train.adapter import adapter_file
        from .weights import file_sha256

        job["adapter"] = {"url": str(args.adapter), "sha256": file_sha256(adapter_file(args.adapter))}
    for name in engine_field_names():
        value = getattr(args, name, None)
        if value is not None:
            job[name] = value
    return job


class _ProgressBars:
    """One tqdm bar per stage, driven by the pipeline's progress callback."""

    def __init__(self) -> None:
        self._bars: Dict[str, tqdm] = {}
        self._current: Optional[str] = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self._current and self._current in self._bars:
            self._bars[self._current].close()
        self._current = stage
        bar = self._bars.get(stage)
        if bar is None:
            bar = self._bars[stage] = tqdm(total=total, desc=stage, unit="frame" if total > 1 else "step")
        bar.total = max(total, 1)
        bar.n = done
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def main(argv=None) -> int:
    """Runs one job; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    bars = _ProgressBars()
    try:
        job = parse_job(_job(args))
        options = job.engine_options()
        for path, what in ((args.source, "source"), (args.audio, "audio")):
            if not path.is_file():
                raise LipSyncError("invalid_input", f"the {what} file {path} does not exist")
        from .engine import load_engine

        engine = load_engine(job.model, EngineConfig(args.models, device=args.device, landmarks=args.landmarks,
                                                     versions=(options.version,), fp16=options.fp16))
        extra = {"adapter": args.adapter} if args.adapter is not None else {}
        result = engine(args.source, args.audio, args.out, options, progress=bars, **extra)
    except LipSyncError as error:
        bars.close()
        print(f"error ({error.code.value}): {error}", file=sys.stderr)
        return 2
    bars.close()
    stages = ", ".join(f"{stage} {seconds:.2f}s" for stage, seconds in result.timings.items())
    print(
        f"{result.path}: {result.frames} frames at {result.fps:.3f} fps ({result.duration_s:.2f} s), "
        f"{result.frames_without_face} without a face; {stages}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
