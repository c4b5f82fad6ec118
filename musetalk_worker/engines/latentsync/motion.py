"""The UNet3D's motion modules (AnimateDiff's "Vanilla" temporal transformer): at every pixel, self-attention
across the frames of the clip, with a sinusoidal position encoding of the frame index."""

from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers.models.attention import FeedForward
from torch import nn

from .attention import TRANSFORMER_NORM_EPS, Attention
from .resnet import batch_to_frames, frames_to_batch
from .unet_config import MOTION_NORM_GROUPS, MotionModuleConfig


class PositionalEncoding(nn.Module):
    """The fixed sinusoidal table ``pe`` (1, max_len, dim): sin at even, cos at odd channels.

    ``pe`` is a persistent buffer because upstream's checkpoints hold it; it is loaded like a weight.
    """

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        frequency = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        pe = torch.zeros(1, max_len, dim)
        pe[0, :, 0::2] = torch.sin(position * frequency)
        pe[0, :, 1::2] = torch.cos(position * frequency)
        self.register_buffer("pe", pe)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pe[:, : x.shape[1]]


class TemporalAttention(Attention):
    """Self-attention over the frames at each pixel; the position encoding is added to its (normalised) input."""

    def __init__(self, dim: int, heads: int, head_dim: int, max_len: Optional[int]):
        super().__init__(dim, heads, head_dim)
        self.pos_encoder = PositionalEncoding(dim, max_len) if max_len is not None else None

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:  # type: ignore[override]
        """``x`` (b·f, pixels, dim) → the same shape."""
        bf, pixels, dim = x.shape
        b = bf // frames
        x = x.reshape(b, frames, pixels, dim).permute(0, 2, 1, 3).reshape(b * pixels, frames, dim)
        if self.pos_encoder is not None:
            x = self.pos_encoder(x)
        out = super().forward(x)
        return out.reshape(b, pixels, frames, -1).permute(0, 2, 1, 3).reshape(bf, pixels, -1)


class TemporalTransformerBlock(nn.Module):
    """[LN → temporal self-attention] per attention block, then LN → GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, config: MotionModuleConfig):
        super().__init__()
        heads = config.num_attention_heads
        max_len = config.temporal_position_encoding_max_len if config.temporal_position_encoding else None
        self.attention_blocks = nn.ModuleList(
            TemporalAttention(dim, heads, dim // heads, max_len) for _ in config.attention_block_types)
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in config.attention_block_types)
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, frames: int) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x), frames) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    """Per frame GroupNorm → linear in; temporal blocks over (b·f, h·w) tokens; linear out, plus the input."""

    def __init__(self, channels: int, config: MotionModuleConfig):
        super().__init__()
        heads = config.num_attention_heads
        inner = heads * (channels // heads // config.temporal_attention_dim_div)
        self.norm = nn.GroupNorm(MOTION_NORM_GROUPS, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, config) for _ in range(config.num_transformer_block))
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[2]
        x = frames_to_batch(x)
        n, c, h, w = x.shape
        tokens = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(n, h * w, c))
        for block in self.transformer_blocks:
            tokens = block(tokens, frames)
        # Contiguous for the same reason as in SpatialTransformer: no channels-last kernels downstream.
        out = self.proj_out(tokens).reshape(n, h, w, c).permute(0, 3, 1, 2).contiguous()
        return batch_to_frames(out + x, frames)


class MotionModule(nn.Module):
    """One motion module; the wrapper gives upstream's key prefix ``temporal_transformer.``."""

    def __init__(self, channels: int, config: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (b, c, f, h, w) → the same shape."""
        return self.temporal_transformer(x)
