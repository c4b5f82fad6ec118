"""Choosing the torch device a worker or a command runs its models on.

torch is imported only when a device is resolved, so a command can call
:func:`enable_mps_fallback` first: torch reads that setting when it loads.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING, Optional

from .errors import ErrorCode, LipSyncError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"


def enable_mps_fallback() -> None:
    """Lets ops without an Apple MPS kernel run on the CPU instead of failing (unless the user set it to 0).

    torch registers its MPS fallback once, when it is imported, so this must run
    before that; a command calls it first thing.
    """
    os.environ.setdefault(MPS_FALLBACK_ENV, "1")
    if "torch" in sys.modules:
        logger.warning("%s was set after torch was imported; torch will not see it", MPS_FALLBACK_ENV)


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise LipSyncError(ErrorCode.INVALID_INPUT, f"unknown device {device!r}; use auto, cuda, mps or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LipSyncError(ErrorCode.INVALID_INPUT, "device 'cuda' was asked for but no CUDA GPU is visible")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise LipSyncError(ErrorCode.INVALID_INPUT, "device 'mps' was asked for but Apple's MPS is not available")
    return chosen


def images_per_call(device: "torch.device") -> Optional[int]:
    """How many images the convolutional image networks (the VAE, face parsing) take per call on ``device``.

    On the CPU, one: the activations of one 256x256 image stay in the caches,
    a batch's do not, and one image at a time measured faster per image for
    the VAE's encoder and decoder and for BiSeNet, with the small and the
    real-size models (``bench/images_per_call.py``; bench/README.md has the
    figures). It also makes each image's result independent of the batch it
    came in. On CUDA and MPS, None: the whole batch in one call.
    """
    return 1 if device.type == "cpu" else None
