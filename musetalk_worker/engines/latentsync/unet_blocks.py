"""The UNet3D's down, mid and up blocks.

A down or up block is a stack of layers, each a resnet, then (in the ``CrossAttn*`` types) a spatial transformer,
then (where the config puts one) a motion module; then a down- or upsampler. Up blocks concatenate a skip tensor
to their input before each resnet, taking the skips from the end of the list the down blocks filled.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn

from .attention import SpatialTransformer
from .motion import MotionModule
from .resnet import Downsample, ResnetBlock, Upsample
from .unet_config import UNetConfig


def _resnet(config: UNetConfig, in_channels: int, out_channels: int) -> ResnetBlock:
    return ResnetBlock(in_channels, out_channels, config.time_embed_dim, config.norm_num_groups, config.norm_eps)


def _transformer(config: UNetConfig, channels: int) -> SpatialTransformer:
    context_dim = config.cross_attention_dim if config.add_audio_layer else None
    return SpatialTransformer(channels, config.attention_head_dim, context_dim, config.norm_num_groups)


class _LayerStack(nn.Module):
    """``resnets``, optional ``attentions`` and optional ``motion_modules``, applied layer by layer."""

    def __init__(self, config: UNetConfig, resnets: List[ResnetBlock], channels: int, with_attention: bool,
                 with_motion: bool):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(_transformer(config, channels) for _ in resnets) if with_attention else None
        self.motion_modules = nn.ModuleList(
            MotionModule(channels, config.motion_module_kwargs) for _ in resnets) if with_motion else None

    def _layer(self, i: int, hidden: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        hidden = self.resnets[i](hidden, temb)
        if self.attentions is not None:
            hidden = self.attentions[i](hidden, audio)
        if self.motion_modules is not None:
            hidden = self.motion_modules[i](hidden)
        return hidden


class DownBlock(_LayerStack):
    """``CrossAttnDownBlock3D`` (``with_attention``) or ``DownBlock3D``."""

    def __init__(self, config: UNetConfig, in_channels: int, out_channels: int, with_attention: bool,
                 with_motion: bool, downsample: bool):
        resnets = [_resnet(config, in_channels if i == 0 else out_channels, out_channels)
                   for i in range(config.layers_per_block)]
        super().__init__(config, resnets, out_channels, with_attention, with_motion)
        self.downsamplers = nn.ModuleList([Downsample(out_channels, config.downsample_padding)]) \
            if downsample else None

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor
                ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """The block's output and the skips it leaves for the up blocks (each layer's output, the downsampled)."""
        skips = []
        for i in range(len(self.resnets)):
            hidden = self._layer(i, hidden, temb, audio)
            skips.append(hidden)
        if self.downsamplers is not None:
            hidden = self.downsamplers[0](hidden)
            skips.append(hidden)
        return hidden, skips


class MidBlock(nn.Module):
    """``UNetMidBlock3DCrossAttn``: resnet, then spatial transformer → [motion module] → resnet."""

    def __init__(self, config: UNetConfig, channels: int, with_motion: bool):
        super().__init__()
        self.resnets = nn.ModuleList([_resnet(config, channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([_transformer(config, channels)])
        self.motion_modules = nn.ModuleList([MotionModule(channels, config.motion_module_kwargs)]) \
            if with_motion else None

    def forward(self, hidden: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        hidden = self.resnets[0](hidden, temb)
        hidden = self.attentions[0](hidden, audio)
        if self.motion_modules is not None:
            hidden = self.motion_modules[0](hidden)
        return self.resnets[1](hidden, temb)


class UpBlock(_LayerStack):
    """``CrossAttnUpBlock3D`` (``with_attention``) or ``UpBlock3D``: ``layers_per_block + 1`` layers.

    ``prev_channels`` come from the block below, ``skip_channels`` is the width of the last layer's skip (the
    down block one level up); the other skips are ``out_channels`` wide.
    """

    def __init__(self, config: UNetConfig, prev_channels: int, skip_channels: int, out_channels: int,
                 with_attention: bool, with_motion: bool, upsample: bool):
        layers = config.layers_per_block + 1
        resnets = [_resnet(config, (prev_channels if i == 0 else out_channels)
                           + (skip_channels if i == layers - 1 else out_channels), out_channels)
                   for i in range(layers)]
        super().__init__(config, resnets, out_channels, with_attention, with_motion)
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def layer(self, i: int, hidden: torch.Tensor, skip: torch.Tensor, temb: torch.Tensor, audio: torch.Tensor
              ) -> torch.Tensor:
        """Layer ``i`` on ``hidden`` with ``skip`` concatenated on channels."""
        return self._layer(i, torch.cat([hidden, skip], dim=1), temb, audio)

    def forward(self, hidden: torch.Tensor, skips: List[torch.Tensor], temb: torch.Tensor, audio: torch.Tensor
                ) -> torch.Tensor:
        """All layers, popping their skips off the end of ``skips``; then upsampling to the size of the next
        skip (the one the block above takes first)."""
        for i in range(len(self.resnets)):
            hidden = self.layer(i, hidden, skips.pop(), temb, audio)
        if self.upsamplers is not None:
            hidden = self.upsamplers[0](hidden, skips[-1].shape[-2:])
        return hidden
