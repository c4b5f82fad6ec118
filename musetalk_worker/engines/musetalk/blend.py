"""Blending: put generated faces back into their source frames, on the faces' device.

Only the face box changes, so only the box's pixels travel: the source's box
regions and their masks go to the device packed into one padded batch, the
faces are resized and composited there, and one padded batch comes back. On a
GPU nothing waits: the copy back is queued behind the composite, and
:meth:`BlendedBatch.paste` (called on the encoder's thread) is the only place
that waits for it.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

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
            return BlendedBatch(regions, torch.zeros(0, dtype=torch.uint8), None)
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
        mixed = source * (255 - alpha) + resized.clamp_(0, 255) * alpha + 128
        back = self._host(mixed.shape)
        back.copy_((((mixed >> 8) + mixed) >> 8).to(torch.uint8), non_blocking=True)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return BlendedBatch(regions, back, ready)

    def _host(self, shape: Tuple[int, ...]) -> torch.Tensor:
        # Pinned host memory lets the copies run asynchronously; torch caches
        # and reuses these blocks, so pinning per batch costs little after the first.
        return torch.zeros(shape, dtype=torch.uint8, pin_memory=self._pin)
