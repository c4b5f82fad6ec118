"""Blend masks: where, inside the face box, the generated mouth replaces the source.

A mask depends only on the source frame, so it is computed once per source
frame (batched through BiSeNet) and reused on every pass of the ping-pong loop.
The steps reproduce upstream MuseTalk's v1.5 ``get_image``: parse a square
around the face, keep skin and mouth classes (shaped by the parsing mode),
keep only the face box's part in the lower half of the square, then blur.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Executor
from typing import List, Optional, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from ...batching import in_calls
from ...device import images_per_call
from .bisenet import BiSeNet
from .boxes import Box, blend_square

PARSE_SIZE = 512
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
# CelebAMask-HQ classes used by the masks.
_SKIN, _NOSE, _MOUTH_AND_LIPS, _NECK = 1, 10, (11, 12, 13), 14


@dataclasses.dataclass(frozen=True)
class BlendMask:
    """The mask (uint8, 0..255) over the face box of one source frame."""

    box: Box
    alpha: np.ndarray  # (y2 - y1, x2 - x1), uint8


def _jaw_dilation_kernel() -> np.ndarray:
    # A downward cone widening by 2 px per row, then a 21 px wide tail: growing the
    # skin region mostly downwards lets the new jaw line cover the old one.
    kernel = np.zeros((33, 33), np.uint8)
    for row in range(10, 21):
        half = row - 10
        kernel[row, 16 - half : 16 + half + 1] = 1
    kernel[21:, 6:27] = 1
    return kernel


class MaskMaker:
    """Builds blend masks with a loaded BiSeNet, for one parsing mode and cheek widths."""

    def __init__(
        self,
        net: BiSeNet,
        mode: str = "jaw",
        left_cheek_width: int = 90,
        right_cheek_width: int = 90,
        pool: Optional[Executor] = None,
    ):
        """``pool``: threads for the per-frame image work (OpenCV and PIL release the GIL)."""
        self.net = net
        self._map = pool.map if pool is not None else map
        self.images_per_call = images_per_call(next(net.parameters()).device)
        self.mode = mode
        self._dilate = _jaw_dilation_kernel()
        self._erode = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
        # 255 on the cheek bands, where the jaw mask is eroded rather than just dilated.
        cheeks = np.zeros((PARSE_SIZE, PARSE_SIZE), np.uint8)
        centre = PARSE_SIZE // 2
        cheeks[:, : centre - left_cheek_width + 1] = 255
        cheeks[:, centre + right_cheek_width :] = 255
        self._cheeks = cheeks

    @torch.inference_mode()
    def parse(self, squares: Sequence[Image.Image]) -> np.ndarray:
        """Face-parsing classes [B,512,512] (uint8) of RGB PIL squares."""
        param = next(self.net.parameters())
        resized = self._map(lambda square: np.asarray(square.resize((PARSE_SIZE, PARSE_SIZE), Image.BILINEAR)), squares)
        batch = np.stack(list(resized))
        x = torch.from_numpy(batch).to(param.device).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        classes = in_calls(lambda part: self.net(part).argmax(dim=1), ((x - mean) / std).to(param.dtype),
                           self.images_per_call)
        return classes.to(torch.uint8).cpu().numpy()

    def region(self, classes: np.ndarray) -> np.ndarray:
        """The 512x512 mask (0/255) of the parsing mode, from parsing classes."""
        mouth = np.isin(classes, _MOUTH_AND_LIPS)
        if self.mode == "raw":
            keep = mouth | (classes == _SKIN)
        elif self.mode == "neck":
            keep = mouth | (classes == _SKIN) | (classes == _NECK)
        else:
            skin = np.where(classes == _SKIN, 255, 0).astype(np.uint8)
            dilated = cv2.dilate(skin, self._dilate, iterations=1)
            eroded = cv2.erode(dilated, self._erode, iterations=2)
            jaw = (eroded & self._cheeks) | (dilated & ~self._cheeks)
            keep = ((jaw == 255) & (classes != _NOSE)) | mouth
        return np.where(keep, 255, 0).astype(np.uint8)

    def make(self, frames: Sequence[np.ndarray], boxes: Sequence[Box]) -> List[BlendMask]:
        """Blend masks for BGR source frames and their face boxes (extra margin applied)."""
        squares = list(self._map(_square_crop, frames, boxes))
        classes = self.parse(squares)
        return list(self._map(lambda c, box: self._finish(self.region(c), box), classes, boxes))

    @staticmethod
    def _finish(region: np.ndarray, box: Box) -> BlendMask:
        (sx1, sy1, sx2, _), half = blend_square(box)
        side = sx2 - sx1
        mask = np.asarray(Image.fromarray(region).resize((side, side), Image.BICUBIC))
        x1, y1, x2, y2 = box
        kept = np.zeros_like(mask)
        # Only the face box, and only the lower half of the square (the mouth area).
        top = max(y1 - sy1, int(side * 0.5))
        kept[top : y2 - sy1, x1 - sx1 : x2 - sx1] = mask[top : y2 - sy1, x1 - sx1 : x2 - sx1]
        kernel = int(0.05 * side // 2 * 2) + 1
        blurred = cv2.GaussianBlur(kept, (kernel, kernel), 0)
        return BlendMask(box, np.ascontiguousarray(blurred[y1 - sy1 : y2 - sy1, x1 - sx1 : x2 - sx1]))


def _square_crop(frame: np.ndarray, box: Box) -> Image.Image:
    """The blending square around ``box`` as an RGB PIL image; outside the frame is black."""
    square, _ = blend_square(box)
    return Image.fromarray(frame[:, :, ::-1]).crop(square)
