"""Choosing the torch device a worker or a command runs its models on."""

from __future__ import annotations

import torch

from .errors import ErrorCode, LipSyncError


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available."""
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
