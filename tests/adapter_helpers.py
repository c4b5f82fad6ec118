"""Small LoRA adapters for tests: random (seeded, non-zero) LoRA tensors on a models folder's UNet, written as
a fit writes them (``adapter.json`` + a self-describing ``adapter.safetensors``), without fitting."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch

from musetalk_worker.engines.musetalk.models import UNET_CONFIG, UNET_FILES, load_unet
from musetalk_worker.train import adapter as adapters


def base_files(models_dir: Path, version: str = "v15") -> Dict[str, str]:
    """The base weights' SHA-256 by models-folder path, as ``fit`` records them."""
    folder, candidates = UNET_FILES[version]
    weights = [c for c in candidates if (Path(models_dir) / folder / c).exists()][:1]
    return {f"{folder}/{name}": adapters.sha256_file(Path(models_dir) / folder / name)
            for name in [UNET_CONFIG, *weights]}


def make_adapter(models_dir: Path, out: Path, *, seed: int = 0, rank: int = 4, alpha: float = 8.0,
                 scale: float = 0.3, version: str = "v15", base: Optional[Dict[str, str]] = None) -> Path:
    """Writes a LoRA for ``models_dir``'s UNet into the folder ``out``; returns its ``adapter.safetensors``.

    ``base``: the base hashes to record (default: the folder's own, so it loads there).
    """
    unet = load_unet(models_dir, version, torch.device("cpu"), torch.float32)
    adapters.add_lora(unet, rank=rank, alpha=alpha)
    generator = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=generator) * scale for k, v in adapters.lora_tensors(unet).items()}
    meta = {"base": {"version": version, "files": base if base is not None else base_files(models_dir, version)},
            "rank": rank, "alpha": alpha, "target_modules": list(adapters.TARGET_MODULES)}
    return adapters.save_adapter(out, tensors, meta)
