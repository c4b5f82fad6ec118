"""Into the aligned square and back, on the device: sampling grids, the restorer's pass, the mixing weights.

The restorer's input is sampled from a *window* of the frame around the face
(its forehead, hair and background included) and its output is sampled back
onto the *region* the engine pastes (MuseTalk's face box), both with
``grid_sample`` (bilinear, half-pixel centres: ``cv2.warpAffine``'s
convention). Where the aligned square reaches past the frame, the frame's
edge pixels are repeated (``BORDER_REPLICATE``), never black, which GFPGAN's
whole-image style code would take for part of the face.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .align import ALIGNED_SIZE, Box, invert
from .network import FaceRestorer

# Aligned pixels (of 512) over which the restored pixels fade out towards the square's edge, so the
# square's outline never shows where a face reaches past it.
EDGE_FEATHER = 16.0
# "mouth": an ellipse in aligned space (of 512) from below the nose to the chin and past the mouth
# corners (the template's are at x 201 and 313, y 371), generous enough for a wide-open generated
# mouth; restored pixels fade in over its inner MOUTH_FEATHER share of the radius.
MOUTH_CENTRE = (257.0, 380.0)
MOUTH_AXES = (90.0, 70.0)
MOUTH_FEATHER = 0.3


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where one face's aligned square lies in its frame.

    Attributes:
        to_aligned: 2x3 similarity from frame pixels onto the 512 px template.
        window: the frame box the restorer's input is sampled from (inside the frame).
        region: the frame box the restored pixels are sampled back onto.
    """

    to_aligned: np.ndarray
    window: Box
    region: Box


def warp_in(windows: torch.Tensor, placements: Sequence[Placement], size: int) -> torch.Tensor:
    """The aligned ``size`` x ``size`` faces [B, C, size, size] sampled from packed windows.

    ``windows`` [B, C, H, W] holds each window's pixels from its top-left corner
    (padding beyond); samples are clamped to the window, i.e. to the frame.
    """
    # A pixel of the size-px square -> the same place in 512 px template units (half-pixel centres).
    scale = size / ALIGNED_SIZE
    offset = 0.5 / scale - 0.5
    to_template = np.array([[1 / scale, 0, offset], [0, 1 / scale, offset], [0, 0, 1]])
    matrices = [invert(p.to_aligned) @ to_template - np.array([[0, 0, p.window[0]], [0, 0, p.window[1]]])
                for p in placements]
    coords = _pixel_grid(matrices, size, size, windows.device)
    limits = torch.tensor([[p.window[2] - p.window[0] - 1, p.window[3] - p.window[1] - 1] for p in placements],
                          dtype=coords.dtype, device=coords.device)
    coords = torch.minimum(coords.clamp(min=0), limits[:, None, None, :])
    height, width = windows.shape[-2:]
    return _sample(windows, coords, height, width)


def warp_out(aligned: torch.Tensor, placements: Sequence[Placement], rows: int, cols: int
             ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Aligned faces [B, C, S, S] sampled back onto each region's pixels: ([B, C, rows, cols], the aligned
    coordinates of those pixels [B, rows, cols, 2] in 512 px template units)."""
    size = aligned.shape[-1]
    matrices = [p.to_aligned @ np.array([[1, 0, p.region[0]], [0, 1, p.region[1]], [0, 0, 1]]) for p in placements]
    coords = _pixel_grid(matrices, rows, cols, aligned.device)
    scale = size / ALIGNED_SIZE
    return _sample(aligned, coords * scale + (scale - 1) / 2, size, size), coords


def region_weight(coords: torch.Tensor, region: str) -> torch.Tensor:
    """How much of the restored pixel to take [B, 1, rows, cols] in 0..1, from aligned coordinates.

    ``face``: everywhere inside the aligned square, fading out over its edge;
    ``mouth``: also only inside the mouth ellipse.
    """
    x, y = coords[..., 0], coords[..., 1]
    inset = torch.minimum(torch.minimum(x + 0.5, ALIGNED_SIZE - 0.5 - x), torch.minimum(y + 0.5, ALIGNED_SIZE - 0.5 - y))
    weight = (inset / EDGE_FEATHER).clamp(0, 1)
    if region == "mouth":
        radius = torch.hypot((x - MOUTH_CENTRE[0]) / MOUTH_AXES[0], (y - MOUTH_CENTRE[1]) / MOUTH_AXES[1])
        weight = weight * ((1 - radius) / MOUTH_FEATHER).clamp(0, 1)
    return weight.unsqueeze(1)


def restore_regions(restorer: FaceRestorer, windows: torch.Tensor, placements: Sequence[Placement], rows: int, cols: int,
                    region: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Restores the faces in packed BGR windows [B, H, W, 3] (0..255).

    Returns the restored BGR pixels of each region [B, rows, cols, 3] (float,
    0..255, unrounded) and their weights [B, rows, cols, 1] (:func:`region_weight`).
    """
    faces = warp_in(windows.permute(0, 3, 1, 2).float(), placements, restorer.size)
    restored = restorer(faces.flip(1)).flip(1)  # the network works in RGB
    pixels, coords = warp_out(restored, placements, rows, cols)
    return pixels.permute(0, 2, 3, 1), region_weight(coords, region).permute(0, 2, 3, 1)


def mix_restored(generated: torch.Tensor, restored: torch.Tensor, share: torch.Tensor, weight: float) -> torch.Tensor:
    """The generated pixels with ``weight`` times each pixel's region weight (``share``) taken from the
    restored ones: what both engines paste, rounded and clamped to 0..255 (float)."""
    return (generated + (weight * share) * (restored - generated)).round_().clamp_(0, 255)


def _pixel_grid(matrices: Sequence[np.ndarray], rows: int, cols: int, device: torch.device) -> torch.Tensor:
    """Each matrix applied to the (x, y) pixel centres of a rows x cols image: [B, rows, cols, 2]."""
    ys, xs = torch.meshgrid(torch.arange(rows, dtype=torch.float64), torch.arange(cols, dtype=torch.float64),
                            indexing="ij")
    base = torch.stack([xs, ys, torch.ones_like(xs)], dim=-1)
    stacked = torch.from_numpy(np.stack([np.asarray(m, np.float64) for m in matrices]))
    # The matrices are composed in float64 on the host; the grids are float32 on the device.
    return torch.einsum("hwk,bjk->bhwj", base.to(device, torch.float32), stacked.to(device, torch.float32))


def _sample(images: torch.Tensor, coords: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear samples of ``images`` at pixel coordinates (half-pixel centres), edges repeated."""
    size = torch.tensor([width, height], dtype=coords.dtype, device=coords.device)
    grid = (2 * coords + 1) / size - 1
    return F.grid_sample(images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=False)
