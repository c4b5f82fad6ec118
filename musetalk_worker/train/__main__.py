"""Command line: ``python -m musetalk_worker.train prepare ...`` and ``python -m musetalk_worker.train fit ...``.

``prepare`` prints one JSON line summing up the cache; ``fit`` prints one JSON line per evaluation and,
last, ``{"steps", "loss_start", "loss_end", "adapter", "eval"}``. Exit code 2 on a named error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ..errors import LipSyncError
from .fit import FitOptions
from .prepare import PrepareOptions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m musetalk_worker.train", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="clips of a folder -> a training cache (resumable)")
    prep.add_argument("--videos", type=Path, required=True, help="folder of clips with speech (searched recursively)")
    prep.add_argument("--out", type=Path, required=True, help="cache folder (shards + manifest.json)")
    prep.add_argument("--models", type=Path, required=True, help="models folder (standard layout)")
    prep.add_argument("--landmarks", choices=("auto", "dwpose", "dlib"), default="auto", help="face back-end")
    prep.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    prep.add_argument("--batch-size", type=int, default=PrepareOptions.batch_size, help="frames per model batch")
    prep.add_argument("--shard-frames", type=int, default=PrepareOptions.shard_frames, help="frames per shard")
    fit = sub.add_parser("fit", help="fit a LoRA (or --full: the whole UNet) on a cache")
    fit.add_argument("--data", type=Path, required=True, help="cache folder made by `prepare`")
    fit.add_argument("--models", type=Path, required=True, help="models folder (standard layout)")
    fit.add_argument("--out", type=Path, required=True, help="adapter folder (adapter.safetensors + adapter.json)")
    fit.add_argument("--steps", type=int, required=True, help="optimizer steps")
    fit.add_argument("--rank", type=int, default=FitOptions.rank, help="LoRA rank (%(default)s)")
    fit.add_argument("--alpha", type=float, help="LoRA alpha (default: the rank)")
    fit.add_argument("--lr", type=float, help="learning rate (1e-4 LoRA, 1e-5 --full)")
    fit.add_argument("--batch", type=int, default=FitOptions.batch, help="frames per step and process (%(default)s)")
    fit.add_argument("--device", default="auto", help="auto, cuda, mps or cpu")
    fit.add_argument("--full", action="store_true", help="train the whole UNet (multi-GPU under torchrun)")
    fit.add_argument("--eval-every", type=int, help="steps between evaluations (a fifth of the steps)")
    fit.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (at every evaluation)")
    fit.add_argument("--seed", type=int, default=FitOptions.seed)
    return p


def main(argv=None) -> int:
    """Runs one command; returns the process exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "prepare":
            manifest = _prepare(args)
            clips = manifest["clips"].values()
            print(json.dumps({
                "cache": str(args.out),
                "clips": sum(c["status"] == "ok" for c in clips),
                "frames": sum(c.get("kept", 0) for c in clips),
                "faceless_frames": sum(len(c.get("faceless_frames", [])) for c in clips),
                "left_out": {c["source"]: c["reason"] for c in clips if c["status"] != "ok"},
            }))
        else:
            from .fit import fit

            options = FitOptions(steps=args.steps, rank=args.rank, alpha=args.alpha, lr=args.lr, batch=args.batch,
                                 full=args.full, eval_every=args.eval_every, checkpoint_every=args.checkpoint_every,
                                 seed=args.seed)
            fit(args.data, args.models, args.out, options, device=args.device)
    except (LipSyncError, ValueError) as error:
        code = getattr(getattr(error, "code", None), "value", "invalid_input")
        print(f"error ({code}): {error}", file=sys.stderr)
        return 2
    return 0


def _prepare(args) -> dict:
    import torch

    from ..device import resolve_device
    from ..engines.musetalk.models import load_audio_encoder, load_vae
    from ..faces import load_face_analyzer
    from .prepare import DatasetPreparer

    options = PrepareOptions(batch_size=args.batch_size, shard_frames=args.shard_frames)
    device = resolve_device(args.device)
    preparer = DatasetPreparer(load_face_analyzer(args.landmarks, args.models, device),
                               load_vae(args.models, device, torch.float32), load_audio_encoder(args.models, device),
                               options)
    return preparer.run(args.videos, args.out, progress=True)


if __name__ == "__main__":
    sys.exit(main())
