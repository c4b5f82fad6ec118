"""S3FD face detector (the box half of the ``dwpose`` back-end), batched.

The network is the VGG-16 based single-shot detector of the face-alignment
project whose weights upstream MuseTalk uses (``s3fd-619a316812.pth``); the
module and parameter names below are that checkpoint's state-dict keys.

What upstream does with it, and what :class:`S3FDDetector` reproduces: the
frame goes in with its channels reversed (BGR -> RGB) minus (104, 117, 123) at
full resolution; each of the six prediction levels (strides 4 to 128) gives
face scores (softmax) and box offsets around square anchors 4x the stride;
the best-scoring box over all levels is the face when its score is above 0.5.
Upstream filters, runs NMS and keeps the first survivor, which is always that
best-scoring box, so one argmax replaces it here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

Box = tuple[int, int, int, int]

# Subtracted from the channel-reversed frame, as upstream does.
PIXEL_MEAN = (104.0, 117.0, 123.0)
SCORE_THRESHOLD = 0.5
# Box-offset scales of the SSD encoding: centre offsets, log-size offsets.
CENTER_VARIANCE = 0.1
SIZE_VARIANCE = 0.2
# Strides of the six prediction levels; each level's anchor is 4x its stride.
STRIDES = (4, 8, 16, 32, 64, 128)
ANCHOR_PER_STRIDE = 4

# VGG-16 stages: (name prefix, output channels, number of 3x3 convs). Each
# stage ends in a 2x2 max-pool.
_VGG_STAGES = (("conv1", 64, 2), ("conv2", 128, 2), ("conv3", 256, 3), ("conv4", 512, 3), ("conv5", 512, 3))
# Prediction sources: (feature name, channels, L2-norm scale or None).
_SOURCES = (
    ("conv3_3", 256, 10.0),
    ("conv4_3", 512, 8.0),
    ("conv5_3", 512, 5.0),
    ("fc7", 1024, None),
    ("conv6_2", 512, None),
    ("conv7_2", 256, None),
)
# The first level predicts three background scores and one face score; the
# background is the maximum of the three (S3FD's "max-out" label).
_FIRST_LEVEL_BACKGROUNDS = 3


class ChannelL2Norm(nn.Module):
    """Scales each position's feature vector to unit length, then by a learned per-channel weight."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.weight = nn.Parameter(torch.full((channels,), scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.pow(2).sum(dim=1, keepdim=True).sqrt() + 1e-10
        return x / norm * self.weight.view(1, -1, 1, 1)


class S3FD(nn.Module):
    """The S3FD network: image batch -> per level (face-vs-background logits, box offsets)."""

    def __init__(self) -> None:
        super().__init__()
        in_channels = 3
        for prefix, channels, n_convs in _VGG_STAGES:
            for i in range(1, n_convs + 1):
                self.add_module(f"{prefix}_{i}", nn.Conv2d(in_channels, channels, 3, padding=1))
                in_channels = channels
        # The checkpoint was trained with fc6 padded by 3 and not dilated: keep it.
        self.fc6 = nn.Conv2d(512, 1024, 3, padding=3)
        self.fc7 = nn.Conv2d(1024, 1024, 1)
        self.conv6_1 = nn.Conv2d(1024, 256, 1)
        self.conv6_2 = nn.Conv2d(256, 512, 3, stride=2, padding=1)
        self.conv7_1 = nn.Conv2d(512, 128, 1)
        self.conv7_2 = nn.Conv2d(128, 256, 3, stride=2, padding=1)
        for name, channels, scale in _SOURCES:
            head = f"{name}_norm" if scale is not None else name
            if scale is not None:
                self.add_module(head, ChannelL2Norm(channels, scale))
            n_scores = _FIRST_LEVEL_BACKGROUNDS + 1 if name == "conv3_3" else 2
            self.add_module(f"{head}_mbox_conf", nn.Conv2d(channels, n_scores, 3, padding=1))
            self.add_module(f"{head}_mbox_loc", nn.Conv2d(channels, 4, 3, padding=1))

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``x``: [B, 3, H, W] normalised images -> six (logits [B, 2, h, w], offsets [B, 4, h, w])."""
        features = {}
        for prefix, _, n_convs in _VGG_STAGES:
            for i in range(1, n_convs + 1):
                x = F.relu(getattr(self, f"{prefix}_{i}")(x))
            features[f"{prefix}_{n_convs}"] = x
            x = F.max_pool2d(x, 2, 2)
        x = F.relu(self.fc7(F.relu(self.fc6(x))))
        features["fc7"] = x
        x = F.relu(self.conv6_2(F.relu(self.conv6_1(x))))
        features["conv6_2"] = x
        x = F.relu(self.conv7_2(F.relu(self.conv7_1(x))))
        features["conv7_2"] = x

        levels = []
        for name, _, scale in _SOURCES:
            feature = features[name]
            head = name
            if scale is not None:
                head = f"{name}_norm"
                feature = getattr(self, head)(feature)
            logits = getattr(self, f"{head}_mbox_conf")(feature)
            if logits.shape[1] > 2:
                background = logits[:, :_FIRST_LEVEL_BACKGROUNDS].amax(dim=1, keepdim=True)
                logits = torch.cat([background, logits[:, _FIRST_LEVEL_BACKGROUNDS:]], dim=1)
            levels.append((logits, getattr(self, f"{head}_mbox_loc")(feature)))
        return levels


def level_priors(height: int, width: int, stride: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Anchors of one level as [height * width, 4] (centre x, centre y, width, height), row-major."""
    ys, xs = torch.meshgrid(
        torch.arange(height, device=device, dtype=torch.float32),
        torch.arange(width, device=device, dtype=torch.float32),
        indexing="ij",
    )
    size = torch.full_like(xs, float(stride * ANCHOR_PER_STRIDE))
    centres = (torch.stack([xs, ys], dim=-1) + 0.5) * stride
    return torch.cat([centres, size[..., None], size[..., None]], dim=-1).reshape(-1, 4)


def decode_boxes(offsets: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD box decoding: offsets [..., 4] around priors [..., 4] (cx, cy, w, h) -> boxes [..., 4] (x1, y1, x2, y2)."""
    centres = priors[..., :2] + offsets[..., :2] * CENTER_VARIANCE * priors[..., 2:]
    sizes = priors[..., 2:] * torch.exp(offsets[..., 2:] * SIZE_VARIANCE)
    return torch.cat([centres - sizes / 2, centres + sizes / 2], dim=-1)


def best_boxes(levels: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the highest face score over all levels and positions, and its decoded box.

    Returns (scores [B], boxes [B, 4]) in input pixels, before thresholding and clipping.
    """
    scores, offsets, priors = [], [], []
    for (logits, loc), stride in zip(levels, STRIDES, strict=True):
        batch, _, height, width = logits.shape
        scores.append(logits.softmax(dim=1)[:, 1].reshape(batch, -1))
        offsets.append(loc.permute(0, 2, 3, 1).reshape(batch, -1, 4))
        priors.append(level_priors(height, width, stride, device=logits.device))
    all_scores = torch.cat(scores, dim=1)
    best_score, best = all_scores.max(dim=1)
    best_offsets = torch.cat(offsets, dim=1)[torch.arange(len(best), device=best.device), best]
    return best_score, decode_boxes(best_offsets, torch.cat(priors, dim=0)[best])


class S3FDDetector:
    """Batched S3FD: BGR frames -> the best face box per frame, or None."""

    # Frames per forward pass are capped by pixels, because S3FD runs at full
    # resolution and its first activations take ~0.5 GB per megapixel.
    max_pixels_per_batch = 8_000_000

    def __init__(self, net: S3FD, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        # The frames arrive channels-last (NHWC); keeping the convolutions in that
        # layout avoids a transpose and is ~20% faster on CPU.
        self.net = net.to(self.device, memory_format=torch.channels_last).eval()
        self._mean = torch.tensor(PIXEL_MEAN, device=self.device).view(1, 3, 1, 1)

    @classmethod
    def from_file(cls, path: Path, device: torch.device | str = "cpu") -> S3FDDetector:
        """Load the S3FD state dict at ``path`` (a plain dict of tensors)."""
        net = S3FD()
        net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return cls(net, device)

    def detect(self, frames: Sequence[np.ndarray]) -> list[Box | None]:
        """BGR uint8 frames of one size -> per frame (x1, y1, x2, y2) clipped at 0 and truncated, or None."""
        if not len(frames):
            return []
        height, width = frames[0].shape[:2]
        per_batch = max(1, self.max_pixels_per_batch // (height * width))
        results: list[Box | None] = []
        for start in range(0, len(frames), per_batch):
            results.extend(self._detect_batch(frames[start : start + per_batch]))
        return results

    @torch.inference_mode()
    def _detect_batch(self, frames: Sequence[np.ndarray]) -> list[Box | None]:
        # Upload uint8 (a quarter of the bytes) and convert on the device.
        images = torch.from_numpy(np.stack(frames)).to(self.device)
        images = images.flip(-1).permute(0, 3, 1, 2).float().contiguous(memory_format=torch.channels_last)
        images = images - self._mean
        scores, boxes = best_boxes(self.net(images))
        boxes = boxes.clamp(min=0).cpu().numpy()
        found = (scores > SCORE_THRESHOLD).cpu().numpy()
        return [tuple(int(v) for v in box) if ok else None for box, ok in zip(boxes, found, strict=True)]
