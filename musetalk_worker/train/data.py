"""Reading a prepared cache: frames by clip, the held-out split, and training batches.

A sample is one target frame t of a clip: the UNet's input is the latent of t
with its mouth blanked plus the whole latent of a reference frame from another
time of the same clip (so the mouth cannot be copied from the reference, as in
upstream's training), the audio prompt of t, and t's 256x256 crop as the
target. The last ``holdout`` share of every clip's frames is held out (a
contiguous tail: neighbouring frames are near copies, so a random split would
leak), and references are drawn within the same part.

Shards are opened lazily and read a row at a time, so the cache need not fit in memory.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from safetensors import safe_open

from ..errors import ErrorCode, LipSyncError
from .prepare import read_manifest

# References are drawn at least this many frames (0.4 s at 25 fps) from the target where the clip allows.
MIN_REFERENCE_GAP = 10


@dataclasses.dataclass
class Batch:
    """UNet inputs and the loss's target for a batch of frames (CPU tensors)."""

    latents: torch.Tensor  # [B, 8, 32, 32]: target with the mouth blanked, then the reference
    prompts: torch.Tensor  # [B, 50, 384], before positional encoding
    targets: torch.Tensor  # [B, 3, 256, 256] RGB in [-1, 1]


class FrameCache:
    """The frames of a prepared cache, split into training and held-out parts per clip."""

    def __init__(self, cache: Path, holdout: float = 0.2):
        """Raises: LipSyncError(invalid_input): no manifest, or too few frames to hold out ``holdout`` of them."""
        self.root = Path(cache)
        manifest = read_manifest(self.root)
        if manifest is None:
            raise LipSyncError(ErrorCode.INVALID_INPUT, f"{cache} has no manifest.json: run `train prepare` first")
        # (shard file, row) of every kept frame, per clip in time order.
        clips: List[List[Tuple[str, int]]] = []
        for entry in manifest["clips"].values():
            if entry["status"] != "ok":
                continue
            rows = [(s["file"], r) for s in entry["shards"] for r in range(s["frames"])]
            clips.append(rows)
        self.train: List[List[Tuple[str, int]]] = []
        self.held_out: List[List[Tuple[str, int]]] = []
        for rows in clips:
            cut = len(rows) - max(1, round(len(rows) * holdout)) if len(rows) > 1 else len(rows)
            if cut > 0:
                self.train.append(rows[:cut])
            if rows[cut:]:
                self.held_out.append(rows[cut:])
        if not self.train or not self.held_out:
            raise LipSyncError(ErrorCode.INVALID_INPUT,
                               f"{cache} has {sum(map(len, clips))} usable frames in {len(clips)} clips: too few to "
                               f"train on and hold out {holdout:.0%}")

    def sample(self, part: List[List[Tuple[str, int]]], count: int, generator: torch.Generator) -> Batch:
        """``count`` random targets of ``part`` (``train`` or ``held_out``), each with a random reference."""
        picks = []
        sizes = torch.tensor([len(rows) for rows in part], dtype=torch.float64)
        for clip in torch.multinomial(sizes, count, replacement=True, generator=generator).tolist():
            rows = part[clip]
            target = int(torch.randint(len(rows), (1,), generator=generator))
            picks.append((rows[target], rows[_reference(target, len(rows), generator)]))
        return self._batch(picks)

    def fixed(self, part: List[List[Tuple[str, int]]], limit: int, seed: int = 0) -> List[Batch]:
        """Up to ``limit`` targets spread evenly over ``part``, with seeded references: the same every call."""
        flat = [(c, i) for c, rows in enumerate(part) for i in range(len(rows))]
        step = max(1, len(flat) // limit)
        generator = torch.Generator().manual_seed(seed)
        picks = [(part[c][i], part[c][_reference(i, len(part[c]), generator)]) for c, i in flat[::step][:limit]]
        return [self._batch(picks[k:k + 8]) for k in range(0, len(picks), 8)]

    def _batch(self, picks) -> Batch:
        latents, prompts, targets = [], [], []
        for (target_file, target_row), (ref_file, ref_row) in picks:
            target = self._row(target_file, target_row, ("latent", "prompt", "crop"))
            reference = self._row(ref_file, ref_row, ("latent",))
            latents.append(torch.cat([target["latent"][:4], reference["latent"][4:]]))
            prompts.append(target["prompt"])
            targets.append(target["crop"])
        crops = torch.stack(targets).flip(-1).permute(0, 3, 1, 2).float()  # BGR HWC -> RGB CHW
        return Batch(torch.stack(latents), torch.stack(prompts).float(), crops / 127.5 - 1.0)

    def _row(self, file: str, row: int, keys) -> Dict[str, torch.Tensor]:
        handle = _open(str(self.root / file))
        return {k: handle.get_slice(k)[row:row + 1][0] for k in keys}


@lru_cache(maxsize=8)
def _open(path: str):
    # A few open shards at a time: training draws from all of them.
    return safe_open(path, framework="pt")


def _reference(target: int, count: int, generator: torch.Generator) -> int:
    """Another frame of the same part, at least MIN_REFERENCE_GAP away where there is room, else any other."""
    far = [i for i in range(count) if abs(i - target) >= MIN_REFERENCE_GAP]
    choices = far or [i for i in range(count) if i != target] or [target]
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]
