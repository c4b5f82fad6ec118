"""LatentSync's paste-back: the generated mouth into the aligned face, the face back into its frame.

Upstream (``LipsyncPipeline.paste_surrounding_pixels_back``, ``restore_video`` and ``AlignRestore.restore_img`` at
``a229c39``) keeps the reference outside the mouth mask in aligned space, resizes the face to the crop size
(torchvision bicubic with antialias), warps it back with the inverse matrix (kornia, fill 127), and blends it
into the frame with a warped rectangle that is eroded (2x2, then a (2 w)^2 square, w = sqrt(area) // 20) and
Gaussian-blurred; the result is truncated to uint8.

Only pixels near the warped crop can change, so everything here works on a region of the frame,
:func:`restore_box`, with the full frame's arithmetic (the grid is the full frame's, and the region's edges hold
only zeros of the masks, so erosion and blur cannot tell the region from the frame). It is torch throughout and
runs on the faces' device; upstream's CPU ``cv2.erode`` is replaced by an exactly equal min-pooling. Computed in
float32 (upstream's CUDA default is float16).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .align import FILL_VALUE, FaceGeometry, MouthMask, homography, inverse_3x3, sampling_grid, sampling_theta

Box = Tuple[int, int, int, int]

# Upstream's restore region around the inverse-warped crop rectangle, in frame pixels.
BOX_MARGIN = 3


def paste_mouth(decoded: torch.Tensor, reference: torch.Tensor, mask: MouthMask) -> torch.Tensor:
    """The decoded faces (B, 3, r, r) where the mask regenerates, the reference pixels where it keeps.

    As upstream: the regenerate weight is ``1 - keep`` taken in float64, then cast to the faces' dtype.
    """
    regenerate = (1 - mask.keep).to(device=decoded.device, dtype=decoded.dtype)
    return decoded * regenerate + reference.to(decoded) * (1 - regenerate)


def resize_to_crop(faces: torch.Tensor, geometry: FaceGeometry) -> torch.Tensor:
    """Faces (B, 3, r, r) resized to the crop (B, 3, height, width): bicubic with antialias, in float32.

    This is torchvision's ``resize(..., BICUBIC, antialias=True)`` on a float tensor (no clamp), returned in the
    faces' dtype.
    """
    width, height = geometry.crop_size
    if faces.shape[-2:] == (height, width):
        return faces
    resized = F.interpolate(faces.to(torch.float32), size=(height, width), mode="bicubic", align_corners=False,
                            antialias=True)
    return resized.to(faces.dtype)


def invert_affine(matrices: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) inverses of affine matrices (kornia's ``invert_affine_transform``), float32 on the CPU."""
    return inverse_3x3(homography(matrices.detach().to("cpu", torch.float32)))[:, :2, :]


def _frame_bounds(matrix: torch.Tensor, left: float, top: float, right: float, bottom: float) -> np.ndarray:
    """(x_min, y_min, x_max, y_max) in the frame of the crop rectangle [left, right] x [top, bottom]."""
    forward = np.vstack([matrix.detach().cpu().numpy().astype(np.float64), [0.0, 0.0, 1.0]])
    inverse = np.linalg.inv(forward)[:2]
    corners = np.array([[left, top, 1.0], [right, top, 1.0], [left, bottom, 1.0], [right, bottom, 1.0]])
    points = corners @ inverse.T
    return np.concatenate([points.min(axis=0), points.max(axis=0)])


def restore_box(matrix: torch.Tensor, geometry: FaceGeometry, frame_size: Tuple[int, int]) -> Box:
    """The part (x0, y0, x1, y1; exclusive ends) of a (height, width) frame that restoring one face may change.

    The inverse-warped crop rectangle plus :data:`BOX_MARGIN` pixels (the region the fixtures record), widened
    where that is not enough: the bilinear footprint of the warped rectangle reaches one crop pixel beyond it
    (several frame pixels when the face is large), and the region must keep a border of zero mask around it
    (one pixel before, two after) for erosion and blur to match the whole frame's.
    """
    width, height = geometry.crop_size
    frame_h, frame_w = frame_size
    rect = _frame_bounds(matrix, 0.0, 0.0, width, height)
    footprint = _frame_bounds(matrix, -1.0, -1.0, width, height)
    x0 = min(math.floor(rect[0]) - BOX_MARGIN, math.floor(footprint[0]))
    y0 = min(math.floor(rect[1]) - BOX_MARGIN, math.floor(footprint[1]))
    x1 = max(math.ceil(rect[2]) + BOX_MARGIN + 1, math.ceil(footprint[2]) + 2)
    y1 = max(math.ceil(rect[3]) + BOX_MARGIN + 1, math.ceil(footprint[3]) + 2)
    return max(0, x0), max(0, y0), min(frame_w, x1), min(frame_h, y1)


def union_box(boxes: Sequence[Box]) -> Box:
    """The smallest box holding all ``boxes``."""
    x0, y0, x1, y1 = zip(*boxes)
    return min(x0), min(y0), max(x1), max(y1)


def _min_filter(image: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """Minimum over the window [-before, +after] in both axes, ignoring what lies outside the image.

    A rectangle's minimum is separable, so this is two 1-D max-poolings of the negated image.
    """
    size = before + after + 1
    negated = -image
    negated = F.pad(negated, [before, after, 0, 0], value=-math.inf)
    negated = F.max_pool2d(negated, (1, size), stride=1)
    negated = F.pad(negated, [0, 0, before, after], value=-math.inf)
    return -F.max_pool2d(negated, (size, 1), stride=1)


def center_erosion(mask: torch.Tensor, w_edge: int) -> torch.Tensor:
    """``cv2.erode(mask, ones((2 w_edge, 2 w_edge)))`` on (B, 1, H, W): an even window anchored at its centre.

    An empty kernel (w_edge 0) means cv2's default 3x3 square.
    """
    if w_edge == 0:
        return _min_filter(mask, 1, 1)
    return _min_filter(mask, w_edge, w_edge - 1)


def gaussian_kernel(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    """kornia's normalised 1-D Gaussian (float32) of odd ``size`` centred at ``size // 2``."""
    sigma_t = torch.tensor([[sigma]], dtype=torch.float32, device=device)
    x = torch.arange(size, dtype=torch.float32, device=device) - float(size // 2)
    gauss = torch.exp(-x.pow(2.0) / (2 * sigma_t.pow(2.0)))
    return (gauss / gauss.sum(-1, keepdim=True))[0]


def gaussian_blur(image: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """kornia's separable ``gaussian_blur2d`` on (B, 1, H, W) float32: reflect padding, x then y."""
    kernel = gaussian_kernel(size, sigma, image.device)
    half = (size - 1) // 2
    out = F.conv2d(F.pad(image, [half, size - 1 - half, 0, 0], mode="reflect"), kernel.view(1, 1, 1, size))
    return F.conv2d(F.pad(out, [0, 0, half, size - 1 - half], mode="reflect"), kernel.view(1, 1, size, 1))


def soft_mask(eroded: torch.Tensor) -> torch.Tensor:
    """Upstream's feathered blend weight from one frame's eroded warped rectangle (1, 1, h, w).

    ``w_edge = int(sqrt(area)) // 20``; the rectangle is eroded by a (2 w_edge)^2 square and blurred with a
    (2 w_edge + 1)^2 Gaussian of sigma ``0.3 ((size - 1) / 2 - 1) + 0.8``.
    """
    w_edge = int(torch.sum(eroded) ** 0.5) // 20
    size = 2 * w_edge + 1
    sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    return gaussian_blur(center_erosion(eroded, w_edge), size, sigma)


def restore_region(region: torch.Tensor, faces: torch.Tensor, matrices: torch.Tensor, box: Box,
                   frame_size: Tuple[int, int]) -> torch.Tensor:
    """Blend crop-size faces back into one region of their frames.

    ``region`` (B, y1 - y0, x1 - x0, 3) uint8 is ``box`` of each frame (of ``frame_size`` (height, width)),
    ``faces`` (B, 3, height, width) the resized pasted faces in [-1, 1], ``matrices`` (B, 2, 3) the frames'
    alignment matrices. ``box`` must hold each frame's :func:`restore_box`. Returns the region's new uint8
    pixels, computed on ``faces.device``.
    """
    device = faces.device
    x0, y0, x1, y1 = box
    crop_h, crop_w = faces.shape[-2:]
    theta = sampling_theta(invert_affine(matrices), (crop_h, crop_w), frame_size).to(device)
    grid = sampling_grid(theta, frame_size, rows=slice(y0, y1), cols=slice(x0, x1))
    faces = faces.to(torch.float32)
    inside = F.grid_sample(torch.ones_like(faces[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    warped = F.grid_sample(faces, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped = warped + (1 - inside) * FILL_VALUE
    face_pixels = (warped / 2 + 0.5).clamp(0, 1) * 255
    # kornia's geodesic 2x2 erosion: the window is the pixel and its up/left neighbours.
    eroded = _min_filter(inside, 1, 0)
    weight = torch.cat([soft_mask(eroded[i : i + 1]) for i in range(len(eroded))])
    frame_pixels = region.to(device).permute(0, 3, 1, 2).to(torch.float32)
    blended = weight * (eroded * face_pixels) + (1 - weight) * frame_pixels
    return blended.permute(0, 2, 3, 1).to(torch.uint8)


def restore_frames(frames: np.ndarray, pasted: torch.Tensor, matrices: torch.Tensor,
                   geometry: FaceGeometry) -> Tuple[np.ndarray, Box]:
    """Upstream's restore of a batch: new frames with each pasted face (B, 3, r, r) blended into its frame.

    ``frames`` (B, H, W, 3) uint8 RGB are left as they are (a looped source frame may come back); the copies
    differ only inside the returned box (the union of the frames' :func:`restore_box`), the only part that
    travels to ``pasted.device``.
    """
    frame_size = tuple(frames.shape[1:3])
    box = union_box([restore_box(m, geometry, frame_size) for m in matrices])
    x0, y0, x1, y1 = box
    region = torch.from_numpy(np.ascontiguousarray(frames[:, y0:y1, x0:x1]))
    restored = restore_region(region, resize_to_crop(pasted, geometry), matrices, box, frame_size)
    out = frames.copy()
    out[:, y0:y1, x0:x1] = restored.cpu().numpy()
    return out, box
