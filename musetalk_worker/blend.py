"""Blending: put a generated face back into its source frame through its mask."""

from __future__ import annotations

import cv2
import numpy as np

from .masks import BlendMask


def blend_face(frame: np.ndarray, face: np.ndarray, mask: BlendMask) -> np.ndarray:
    """Returns a copy of ``frame`` (BGR) with ``face`` (BGR, any size) blended into the mask's box.

    The face is resized to the box (bilinear) and mixed as
    ``(frame * (255 - a) + face * a) / 255`` with the rounding PIL's masked
    paste uses, so results match upstream to the last bit. Pixels outside the
    box are untouched; parts of the box outside the frame are dropped.
    """
    x1, y1, x2, y2 = mask.box
    height, width = frame.shape[:2]
    face = cv2.resize(face, (x2 - x1, y2 - y1), interpolation=cv2.INTER_LINEAR)
    cx1, cy1, cx2, cy2 = max(x1, 0), max(y1, 0), min(x2, width), min(y2, height)
    out = frame.copy()
    if cx2 <= cx1 or cy2 <= cy1:
        return out
    inner = (slice(cy1 - y1, cy2 - y1), slice(cx1 - x1, cx2 - x1))
    alpha = mask.alpha[inner][..., None].astype(np.uint32)
    mixed = out[cy1:cy2, cx1:cx2].astype(np.uint32) * (255 - alpha) + face[inner].astype(np.uint32) * alpha
    mixed += 128
    out[cy1:cy2, cx1:cx2] = ((mixed >> 8) + mixed) >> 8
    return out
