"""Numerical fixes applied to models at load time."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _Float64StatsGroupNorm(nn.GroupNorm):
    """GroupNorm computed in float64, for float32 models on the CPU.

    PyTorch's CPU group norm sums float32 statistics over whole feature maps;
    on the VAE's 256x256 maps its output is off by ~1e-3 relative to an exact
    computation (measured against float64), ten times the parity bound with
    upstream. In float64 the error vanishes at a small cost in CPU time.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.double()
        bias = None if self.bias is None else self.bias.double()
        return F.group_norm(x.double(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def precise_cpu_group_norm(model: nn.Module) -> nn.Module:
    """Makes every GroupNorm of a float32 CPU model compute in float64; returns the model."""
    param = next(model.parameters(), None)
    if param is None or param.device.type != "cpu" or param.dtype != torch.float32:
        return model
    for module in model.modules():
        if type(module) is nn.GroupNorm:
            module.__class__ = _Float64StatsGroupNorm
    return model
