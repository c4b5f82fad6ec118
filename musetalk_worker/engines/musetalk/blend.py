"""Blending: put generated faces back into their source frames, on the faces' device.

Only the face box changes, so only the box's pixels travel: the source's box
regions and their masks go to the device packed into one padded batch, the
faces are resized and composited there, and one padded batch comes back. On a
GPU nothing waits: the copy back is queued behind the composite, and
:meth:`BlendedBatch.paste` (called on the encoder's thread) is the only place
that waits for it.

Optional face restoration (:meth:`FaceBlender.restore`) sits between the
composite and the copy back: the composited face, in a window of its frame,
goes through GFPGAN in the aligned square, and the restored pixels replace part
of the generated face before the same integer blend. Without it nothing of
that path runs, so the output is what it was before restoration existed.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ...restoration.network import FaceRestorer
from ...restoration.warp import Placement, mix_restored, restore_regions
from .boxes import Box, clip_box
from .masks import BlendMask


def visible_part(box: Box, width: int, height: int) -> Optional[Box]:
    """The part of ``box`` inside a ``width`` x ``height`` frame, or None when nothing of it is."""
    x1, y1, x2, y2 = clip_box(box, width, height)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


class BlendedBatch:
    """A batch of blended face regions on their way back to the host."""

    def __init__(self, regions: List[Optional[Box]], blended: torch.Tensor, ready: Optional[torch.cuda.Event]):
        self._regions, self._blended, self._ready = regions, blended, ready
        self._host: Optional[np.ndarray] = None

    def paste(self, k: int, frame: np.ndarray) -> np.ndarray:
        """Writes the ``k``-th blended region into its source ``frame`` (in place) and returns the frame.

        The first call waits for the device's copy to arrive.
        """
        region = self._regions[k]
        if region is None:
            return frame
        if self._host is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._host = self._blended.numpy()
        x1, y1, x2, y2 = region
        frame[y1:y2, x1:x2] = self._host[k, : y2 - y1, : x2 - x1]
        return frame


@dataclasses.dataclass(frozen=True)
class Composite:
    """A batch of faces ready to blend on the device: int32, packed per frame from each region's top-left.

    Attributes:
        regions: per frame, the visible part of its face box (None: unchanged frame).
        source: the source's pixels [B, rows, cols, 3].
        alpha: the blend masks [B, rows, cols, 1], 0..255.
        face: the generated faces resized to their boxes [B, rows, cols, 3], 0..255.
    """

    regions: List[Optional[Box]]
    source: torch.Tensor
    alpha: torch.Tensor
    face: torch.Tensor

    def pixels(self) -> torch.Tensor:
        """The blended regions [B, rows, cols, 3] (uint8): ``(source * (255 - a) + face * a) / 255`` with
        the rounding of PIL's masked paste."""
        mixed = self.source * (255 - self.alpha) + self.face * self.alpha + 128
        return (((mixed >> 8) + mixed) >> 8).to(torch.uint8)


class FaceBlender:
    """Composites generated faces into source frames on ``device`` (GPU or CPU).

    Each face is resized to its box (bilinear, half-pixel centres, as
    ``cv2.resize``) and mixed as ``(frame * (255 - a) + face * a) / 255`` with
    the rounding of PIL's masked paste that upstream MuseTalk uses; a pixel can
    differ from upstream by one level where float and fixed-point resizing
    round differently. Pixels outside the box are untouched; parts of the box
    outside the frame are dropped.
    """

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"

    def blend(
        self,
        sources: Sequence[Optional[np.ndarray]],
        faces: torch.Tensor,
        masks: Sequence[Optional[BlendMask]],
        width: int,
        height: int,
    ) -> BlendedBatch:
        """Starts blending a batch; :meth:`BlendedBatch.paste` then puts each result into its frame.

        The same as :meth:`finish` of :meth:`composite` (see there for the arguments).
        """
        return self.finish(self.composite(sources, faces, masks, width, height))

    def composite(
        self,
        sources: Sequence[Optional[np.ndarray]],
        faces: torch.Tensor,
        masks: Sequence[Optional[BlendMask]],
        width: int,
        height: int,
    ) -> Composite:
        """Moves a batch's source regions and masks to the device and resizes its faces to their boxes.

        Args:
            sources: per frame, its pixels (BGR uint8) inside ``visible_part(mask.box)``;
                None for a frame without a mask.
            faces: generated faces ``[B, 256, 256, 3]`` (uint8, BGR), on any device.
            masks: per frame, its blend mask, or None to leave the frame unchanged.
            width, height: the size of the source frames.
        """
        regions = [None if m is None else visible_part(m.box, width, height) for m in masks]
        present = [k for k, r in enumerate(regions) if r is not None]
        if not present:
            empty = torch.zeros((len(masks), 0, 0, 1), dtype=torch.int32, device=self.device)
            return Composite(regions, empty, empty, empty)
        rows = max(regions[k][3] - regions[k][1] for k in present)
        cols = max(regions[k][2] - regions[k][0] for k in present)
        packed_sources = self._host((len(masks), rows, cols, 3))
        packed_alphas = self._host((len(masks), rows, cols, 1))
        host_sources, host_alphas = packed_sources.numpy(), packed_alphas.numpy()
        resized = torch.zeros((len(masks), rows, cols, 3), dtype=torch.int32, device=self.device)
        for k in present:
            (x1, y1, x2, y2), (bx1, by1, bx2, by2) = regions[k], masks[k].box
            inside = (slice(y1 - by1, y2 - by1), slice(x1 - bx1, x2 - bx1))
            host_sources[k, : y2 - y1, : x2 - x1] = sources[k]
            host_alphas[k, : y2 - y1, : x2 - x1, 0] = masks[k].alpha[inside]
            face = faces[k].to(self.device).permute(2, 0, 1).unsqueeze(0).float()
            face = F.interpolate(face, size=(by2 - by1, bx2 - bx1), mode="bilinear", align_corners=False)
            part = face[0, :, inside[0], inside[1]].round_().permute(1, 2, 0)
            resized[k, : y2 - y1, : x2 - x1] = part.to(torch.int32)
        source = packed_sources.to(self.device, non_blocking=True).to(torch.int32)
        alpha = packed_alphas.to(self.device, non_blocking=True).to(torch.int32)
        return Composite(regions, source, alpha, resized.clamp_(0, 255))

    def restore(
        self,
        composite: Composite,
        windows: Sequence[np.ndarray],
        placements: Sequence[Placement],
        restorer: FaceRestorer,
        weight: float,
        region: str,
    ) -> Composite:
        """The composite with part of each face replaced by its GFPGAN restoration.

        The restorer sees the composited face in its window of the frame (what
        the output would be without restoration); the restored pixels then
        replace ``weight`` times the region weight (the aligned square, and
        the mouth for ``region="mouth"``) of the generated face, and the blend
        mask applies as before, so nothing outside the mask changes.

        Args:
            windows: per frame with a region (in order), the source's BGR pixels in its placement's window.
            placements: per frame with a region, its alignment, window and region (the visible box).
        """
        present = [k for k, r in enumerate(composite.regions) if r is not None]
        if not present:
            return composite
        rows, cols = composite.face.shape[1:3]
        height = max(p.window[3] - p.window[1] for p in placements)
        width = max(p.window[2] - p.window[0] for p in placements)
        packed = self._host((len(present), height, width, 3))
        host = packed.numpy()
        for i, pixels in enumerate(windows):
            host[i, : pixels.shape[0], : pixels.shape[1]] = pixels
        window_pixels = packed.to(self.device, non_blocking=True)
        blended = composite.pixels()
        for i, (k, p) in enumerate(zip(present, placements)):
            x1, y1, x2, y2 = p.region
            ox, oy = x1 - p.window[0], y1 - p.window[1]
            window_pixels[i, oy : oy + y2 - y1, ox : ox + x2 - x1] = blended[k, : y2 - y1, : x2 - x1]
        restored, share = restore_regions(restorer, window_pixels, placements, rows, cols, region)
        face = composite.face.clone()
        generated = face[present].float()
        face[present] = mix_restored(generated, restored, share, weight).to(torch.int32)
        return dataclasses.replace(composite, face=face)

    def finish(self, composite: Composite) -> BlendedBatch:
        """Blends a composite and queues its copy back to the host."""
        if all(r is None for r in composite.regions):
            return BlendedBatch(composite.regions, torch.zeros(0, dtype=torch.uint8), None)
        pixels = composite.pixels()
        back = self._host(tuple(pixels.shape))
        back.copy_(pixels, non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return BlendedBatch(composite.regions, back, ready)

    def _host(self, shape: Tuple[int, ...]) -> torch.Tensor:
        # Pinned host memory lets the copies run asynchronously; torch caches
        # and reuses these blocks, so pinning per batch costs little after the first.
        return torch.zeros(shape, dtype=torch.uint8, pin_memory=self._pin)
