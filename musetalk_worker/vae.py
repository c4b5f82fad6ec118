"""The Stable Diffusion autoencoder (sd-vae-ft-mse) both engines encode and decode faces with."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .errors import ErrorCode, LipSyncError
from .precision import precise_cpu_group_norm

# Both engines scale latents by this factor (the autoencoder's own config says so, and upstream LatentSync sets it).
SCALING_FACTOR = 0.18215


def load_autoencoder(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The diffusers ``AutoencoderKL`` saved in ``folder``, in eval mode, gradients off.

    Raises:
        LipSyncError(models_missing): ``folder`` holds no ``config.json``.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"the autoencoder folder {folder} has no config.json. Fetch the weights with "
            f"`python -m builder.fetch_weights --dest <models folder>`.",
            stage="load",
        )
    vae = AutoencoderKL.from_pretrained(folder, torch_dtype=dtype)
    return precise_cpu_group_norm(vae.to(device).eval().requires_grad_(False))
