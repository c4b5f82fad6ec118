"""Attention and the spatial transformer of the UNet3D: per-frame self-attention over pixels, then cross-attention
to the frame's audio tokens (upstream's ``Transformer3DModel`` / ``BasicTransformerBlock``)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from torch import nn

from .resnet import batch_to_frames, frames_to_batch

# The transformers' group norm eps, fixed in upstream's code (the resnets use the config's norm_eps).
TRANSFORMER_NORM_EPS = 1e-6


class Attention(nn.Module):
    """Multi-head scaled-dot-product attention of ``x`` over ``context`` (``x`` itself when none).

    q/k/v have no bias and the output projection has one, as upstream; ``to_out`` is a list so the key is
    upstream's ``to_out.0``.
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None):
        super().__init__()
        self.heads = heads
        inner = heads * head_dim
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.reshape(b, n, self.heads, c // self.heads).permute(0, 2, 1, 3)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` (batch, tokens, query_dim), ``context`` (batch, context tokens, context_dim) → like ``x``."""
        context = x if context is None else context
        query = self._split_heads(self.to_q(x))
        key = self._split_heads(self.to_k(context))
        value = self._split_heads(self.to_v(context))
        out = F.scaled_dot_product_attention(query, key, value)
        b, _, n, _ = out.shape
        return self.to_out[0](out.permute(0, 2, 1, 3).reshape(b, n, -1))


class TransformerBlock(nn.Module):
    """LN → self-attention, [LN → cross-attention to the audio], LN → GEGLU feed-forward; each residual."""

    def __init__(self, dim: int, heads: int, context_dim: Optional[int]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads)
        if context_dim is not None:
            self.norm2 = nn.LayerNorm(dim)
            self.attn2 = Attention(dim, heads, dim // heads, context_dim)
        else:
            self.attn2 = None
        self.ff = FeedForward(dim, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if self.attn2 is not None:
            x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per frame: GroupNorm → 1×1 conv → transformer block over the h·w pixel tokens → 1×1 conv, plus the input.

    ``context_dim`` None builds no cross-attention (upstream's ``add_audio_layer`` false).
    """

    def __init__(self, channels: int, heads: int, context_dim: Optional[int], groups: int):
        super().__init__()
        inner = heads * (channels // heads)
        self.norm = nn.GroupNorm(groups, channels, eps=TRANSFORMER_NORM_EPS)
        self.proj_in = nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, context_dim)])
        self.proj_out = nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``x`` (b, c, f, h, w); ``context`` (b·f, tokens, context_dim), frame-major within each sample."""
        frames = x.shape[2]
        x = frames_to_batch(x)
        n, _, h, w = x.shape
        tokens = self.proj_in(self.norm(x))
        inner = tokens.shape[1]
        tokens = tokens.permute(0, 2, 3, 1).reshape(n, h * w, inner)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        # Back to a contiguous NCHW map: the permuted view has channels-last strides, which would switch
        # the CPU convolutions and group norms after it to their channels-last kernels (other rounding).
        out = self.proj_out(tokens.reshape(n, h, w, inner).permute(0, 3, 1, 2).contiguous())
        return batch_to_frames(out + x, frames)
