"""Command line: ``python -m musetalk_worker.evaluate VIDEO [--audio AUDIO] [--reference VIDEO] --models DIR``.

Prints one JSON line: ``{"video", "lse_d", "lse_c", "offset", "windows"}`` and, with a reference,
``"mouth": {"psnr", "l1", "frames"}``. Exit code 2 on a named error (bad media, no face, missing weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import LipSyncError
from .score import ScoreOptions
from .syncnet import SYNCNET_WEIGHTS
from .sync import VSHIFT


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m musetalk_worker.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("video", type=Path, help="the video to score (its face and, by default, its sound)")
    p.add_argument("--audio", type=Path, help="score against this audio instead of the video's own")
    p.add_argument("--reference", type=Path, help="also compare the mouth region with this video (same size)")
    p.add_argument("--models", type=Path, required=True, help=f"models folder holding {SYNCNET_WEIGHTS}")
    p.add_argument("--syncnet", type=Path, help=f"SyncNet weights (default: MODELS/{SYNCNET_WEIGHTS})")
    p.add_argument("--landmarks", choices=("auto", "dwpose", "dlib"), default="auto", help="face back-end")
    p.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    p.add_argument("--batch-size", type=int, default=ScoreOptions.batch_size, help="windows per SyncNet call")
    p.add_argument("--vshift", type=int, default=VSHIFT, help="offsets searched: -vshift..+vshift frames")
    return p


def main(argv=None) -> int:
    """Scores one video; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = ScoreOptions(batch_size=args.batch_size, vshift=args.vshift)
        for path in (args.video, args.audio, args.reference):
            if path is not None and not path.is_file():
                raise LipSyncError("invalid_input", f"the file {path} does not exist")
        from ..device import resolve_device
        from ..faces import load_face_analyzer
        from .score import Scorer
        from .syncnet import load_syncnet

        device = resolve_device(args.device)
        scorer = Scorer(load_syncnet(args.syncnet or args.models / SYNCNET_WEIGHTS, device),
                        load_face_analyzer(args.landmarks, args.models, device), options)
        result = {"video": str(args.video), **scorer.sync(args.video, args.audio).as_dict()}
        if args.reference is not None:
            result["mouth"] = scorer.mouth(args.video, args.reference).as_dict()
    except (LipSyncError, ValueError) as error:
        code = getattr(getattr(error, "code", None), "value", "invalid_input")
        print(f"error ({code}): {error}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
