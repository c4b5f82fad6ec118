"""The Stable Diffusion autoencoder (sd-vae-ft-mse) both engines encode and decode faces with."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .errors import ErrorCode, LipSyncError
from .precision import precise_cpu_group_norm

# Both engines scale latents by this factor (the autoencoder's own config says so, and upstream LatentSync sets it).
SCALING_FACTOR = 0.18215
# diffusers' weight file names, in its order of preference.
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def load_state(path: Path, device: torch.device, dtype: torch.dtype | None = None) -> dict:
    """The tensors of a weight file (safetensors, or a torch pickle of a state dict), on ``device``.

    safetensors files are read straight onto ``device``. Torch pickles bound
    for a GPU are memory-mapped (``mmap=True``), so a 3.4 GB file is not read
    into host memory in full before it is copied; for the CPU they are read
    whole, so the weights the model keeps are not file-backed pages that the
    kernel may drop and fault in again during a job. Floating-point tensors are converted to
    ``dtype`` when given (a plain ``.to``: the values ``module.to(dtype)`` gives).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device=str(device) if device.type != "mps" else "cpu")
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=device.type != "cpu")
        except RuntimeError:  # a legacy (non-zip) pickle cannot be mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    return {
        name: tensor.to(device=device, dtype=dtype if dtype is not None and tensor.is_floating_point() else None)
        for name, tensor in state.items()
    }


def load_autoencoder(folder: Path, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The diffusers ``AutoencoderKL`` saved in ``folder``, in eval mode, gradients off.

    Built on the meta device from its config and given the file's tensors
    (``assign=True``): no random initialisation, and no second copy of the
    weights, whether or not ``accelerate`` is installed (without it diffusers'
    ``from_pretrained`` builds the model in full, then overwrites it). The
    tensors are the file's, converted once to ``dtype`` and ``device``: the
    same values as ``from_pretrained(torch_dtype=dtype).to(device)``. A
    bfloat16 model on the CPU is laid out channels-last.

    Raises:
        LipSyncError(models_missing): ``folder`` holds no ``config.json`` or no weight file.
    """
    folder = Path(folder)
    weights = next((folder / name for name in WEIGHT_FILES if (folder / name).is_file()), None)
    if not (folder / "config.json").is_file() or weights is None:
        missing = "config.json" if not (folder / "config.json").is_file() else " or ".join(WEIGHT_FILES)
        raise LipSyncError(
            ErrorCode.MODELS_MISSING,
            f"the autoencoder folder {folder} has no {missing}. Fetch the weights with "
            f"`python -m builder.fetch_weights --dest <models folder>`.",
            stage="load",
        )
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    state = load_state(weights, device, dtype)
    # Checkpoints saved before diffusers renamed the attention projections (query -> to_q, ...).
    fix_keys = getattr(vae, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:
        state = fix_keys(dict(state)) or state
    vae.load_state_dict(state, strict=True, assign=True)
    # Every tensor is already the file's, on ``device`` in ``dtype``: no ``vae.to(dtype)``, which in diffusers
    # only logs a warning about float32 modules (at every start, even when there are none).
    vae = vae.eval().requires_grad_(False)
    if device.type == "cpu" and dtype == torch.bfloat16:
        # oneDNN's bfloat16 convolutions are fast in channels-last, slow in NCHW (bench/images_per_call.py
        # --dtype bfloat16; bench/README.md has the figures); the group norm's channels-last kernel is fine
        # at bfloat16's precision (precision.py keeps NCHW for float32 only).
        vae.to(memory_format=torch.channels_last)
    return precise_cpu_group_norm(vae)
