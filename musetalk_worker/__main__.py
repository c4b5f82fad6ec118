"""Command line: ``python -m musetalk_worker --source FACE --audio AUDIO --out OUT.mp4 --models DIR``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Dict, Optional

from tqdm import tqdm

from .errors import LipSyncError
from .options import PARSING_MODES, VERSIONS, EngineOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m musetalk_worker", description="Lip-sync a face video or image to speech.")
    p.add_argument("--source", required=True, type=Path, help="face video or still image")
    p.add_argument("--audio", required=True, type=Path, help="speech audio (any format ffmpeg reads)")
    p.add_argument("--out", required=True, type=Path, help="output mp4")
    p.add_argument("--models", required=True, type=Path, help="models folder (standard layout)")
    p.add_argument("--version", choices=VERSIONS, default="v15")
    p.add_argument("--landmarks", choices=("auto", "dwpose", "dlib"), default="auto")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--fp16", action="store_true", help="compute in float16 (GPU only)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--bbox-shift", type=int, default=0)
    p.add_argument("--extra-margin", type=int, default=None, help="default: 10 for v15, 0 for v1")
    p.add_argument("--parsing-mode", choices=PARSING_MODES, default=None, help="default: jaw for v15, raw for v1")
    p.add_argument("--left-cheek-width", type=int, default=90)
    p.add_argument("--right-cheek-width", type=int, default=90)
    p.add_argument("--fps", type=float, default=25.0, help="frame rate for a still image source")
    p.add_argument("--crf", type=int, default=18)
    return p


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
        options = EngineOptions(
            version=args.version,
            bbox_shift=args.bbox_shift,
            extra_margin=args.extra_margin,
            parsing_mode=args.parsing_mode,
            left_cheek_width=args.left_cheek_width,
            right_cheek_width=args.right_cheek_width,
            batch_size=args.batch_size,
            fps=args.fps,
            fp16=args.fp16,
            crf=args.crf,
        )
        for path, what in ((args.source, "source"), (args.audio, "audio")):
            if not path.is_file():
                raise LipSyncError("invalid_input", f"the {what} file {path} does not exist")
        from .pipeline import LipSyncPipeline

        pipeline = LipSyncPipeline.from_models(
            args.models, device=args.device, fp16=args.fp16, landmarks=args.landmarks, versions=(args.version,)
        )
        result = pipeline(args.source, args.audio, args.out, options, progress=bars)
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
