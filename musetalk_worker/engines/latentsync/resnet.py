"""The UNet3D's convolutional pieces on video tensors ``(batch, channels, frames, height, width)``.

Convolutions are 2D ops "inflated" to video: every frame is convolved on its own. The resnets' group norms are
not: upstream builds them as plain ``nn.GroupNorm`` (``use_inflated_groupnorm`` false) on the 5D tensor, so their
statistics span all the frames of a clip, and so do ours.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """``(b, c, f, h, w)`` → ``(b·f, c, h, w)``, batch-major (frame ``j`` of sample ``i`` is row ``i·f + j``)."""
    b, c, f, h, w = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)


def batch_to_frames(x: torch.Tensor, frames: int) -> torch.Tensor:
    """The inverse of :func:`frames_to_batch`."""
    bf, c, h, w = x.shape
    return x.reshape(bf // frames, frames, c, h, w).permute(0, 2, 1, 3, 4)


class FrameConv(nn.Conv2d):
    """A 2D convolution applied to each frame of a video tensor (upstream's ``InflatedConv3d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(super().forward(frames_to_batch(x)), x.shape[2])


class Downsample(nn.Module):
    """Halves height and width with a stride-2 3×3 convolution per frame."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.conv = FrameConv(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling in space (frames kept) to ``size``, then a 3×3 convolution per frame."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = FrameConv(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        # The skip's size rather than a factor 2, so odd sizes come back as they went down (upstream forwards
        # the size only then; for even sizes both give the same indices).
        return self.conv(F.interpolate(x, size=(x.shape[2], *size), mode="nearest"))


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv3×3 → + time embedding → GroupNorm → SiLU → conv3×3, plus the input (1×1-projected
    when the width changes)."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = FrameConv(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = FrameConv(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = FrameConv(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h
