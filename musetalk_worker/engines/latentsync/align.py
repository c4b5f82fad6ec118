"""LatentSync's face alignment: three landmark points, a smoothed similarity fit, the crop and its mouth mask.

Upstream (``latentsync/utils/affine_transform.py`` and ``image_processor.py`` at ``a229c39``) fits a similarity
transform from three points (the eyebrow centres and the nose centre) to a fixed template, warps the frame with
kornia (bilinear, fill 127, ``align_corners=True``), truncates to uint8 and resizes the crop to the model's
resolution with cv2's LANCZOS4. Everything here reproduces that arithmetic in float32 (the parity fixtures' setting)
to the bit: the small matrices are computed on the CPU in a fixed rounding order (see :func:`matmul`), the warp is
written with torch so it runs on any device, and the LANCZOS resize stays on the CPU (cv2 is the only LANCZOS4
that matches).

The fit carries state: the nose offset is smoothed with an EMA over the source frames in their original order, so
one :class:`FaceAligner` belongs to one job and sees each source frame once, even when the video is ping-ponged.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F

# The 106-point (insightface 2d106det) indices upstream averages into its three points.
BROW_A_106 = (43, 48, 49, 51, 50)
BROW_B_106 = (101, 102, 103, 104, 105)
NOSE_106 = (74, 77, 83, 86)

# The same points from iBUG 68 landmarks (the published 106<->68 correspondence, in the order above).
BROW_A_68 = (17, 18, 19, 20, 21)
BROW_B_68 = (26, 22, 23, 24, 25)
# The nose: 106-points 74 and 86 are iBUG 29 and 30; 77 and 83 (the nose sides) have no iBUG point and are
# synthesised from 29, 31, 33 and 35 (see _nose_sides_68).
NOSE_BRIDGE_68, NOSE_TIP_68 = 29, 30

# Template (the three points in the aligned crop) and crop size, in units that `ratio` scales.
_TEMPLATE = ((17.0, 20.0), (58.0, 20.0), (37.5, 40.0))
_CROP_UNITS = (75, 100)  # width, height

# kornia's fill colour for pixels the warp takes from outside the frame.
FILL_VALUE = 127.0

# The EMA of the nose offset: weight of the previous state from the second frame on.
_SMOOTH_PREV = 0.2
_SMOOTH_NEW = 0.8


def _three_points(brow_a: np.ndarray, brow_b: np.ndarray, nose: np.ndarray) -> np.ndarray:
    """Upstream's three points from integer landmark groups: each group's mean, rounded (float64)."""
    return np.round([brow_a.mean(axis=0), brow_b.mean(axis=0), nose.mean(axis=0)])


def round_landmarks(landmarks: np.ndarray) -> np.ndarray:
    """Landmarks rounded to integer pixels (int64), as upstream's face detector returns them."""
    return np.round(np.asarray(landmarks)).astype(np.int_)


def points_from_106(landmarks: np.ndarray) -> np.ndarray:
    """The three alignment points (brow, brow, nose; (3, 2) float64 pixels) from 106-point landmarks.

    As upstream: the landmarks are rounded to integers first, then each group is averaged and rounded again.
    """
    lmk = round_landmarks(landmarks)
    return _three_points(lmk[list(BROW_A_106)], lmk[list(BROW_B_106)], lmk[list(NOSE_106)])


def _nose_sides_68(lmk: np.ndarray) -> np.ndarray:
    """The two nose-side points (106-points 77 and 83) that the 106<->68 correspondence synthesises."""
    p29, p31, p33, p35 = lmk[29], lmk[31], lmk[33], lmk[35]
    return np.stack([(p29 + p31) / 2 + (p31 - p33) / 4, (p29 + p35) / 2 + (p35 - p33) / 4])


def points_from_68(landmarks: np.ndarray) -> np.ndarray:
    """The three alignment points from iBUG 68-point landmarks (DWPose, dlib), as :func:`points_from_106`.

    The 106-point equivalents are built in float32 (as the correspondence is published and the fixtures were
    made), then rounded and averaged exactly as upstream does with its 106 points.
    """
    lmk = np.asarray(landmarks, dtype=np.float32)
    sides = _nose_sides_68(lmk)
    nose = np.stack([lmk[NOSE_BRIDGE_68], sides[0], sides[1], lmk[NOSE_TIP_68]])
    return _three_points(*(round_landmarks(group) for group in (lmk[list(BROW_A_68)], lmk[list(BROW_B_68)], nose)))


@dataclasses.dataclass(frozen=True)
class FaceGeometry:
    """The aligned face of one model resolution (256 for LatentSync 1.5, 512 for 1.6).

    ``ratio`` = resolution/256 * 2.8 scales the template and the crop: at 256 the crop is 210x280, at 512
    420x560; the crop is then resized (anisotropically) to ``resolution`` squared.
    """

    resolution: int

    def __post_init__(self) -> None:
        if not isinstance(self.resolution, int) or self.resolution < 8 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (256 or 512), got {self.resolution!r}")

    @property
    def ratio(self) -> float:
        """Template units to crop pixels."""
        return self.resolution / 256 * 2.8

    @property
    def template(self) -> np.ndarray:
        """Where the three points land in the crop, (3, 2) float64 pixels."""
        return np.array(_TEMPLATE) * self.ratio

    @property
    def crop_size(self) -> Tuple[int, int]:
        """(width, height) of the crop, before the resize to ``resolution``."""
        return int(_CROP_UNITS[0] * self.ratio), int(_CROP_UNITS[1] * self.ratio)

    @property
    def box(self) -> Tuple[int, int, int, int]:
        """Upstream's per-frame ``box``: the crop rectangle (0, 0, width, height)."""
        width, height = self.crop_size
        return 0, 0, width, height


# Small-matrix arithmetic. The fixtures' matrices equal torch's CPU linear algebra under MKL's reproducible
# mode (MKL_CBWR=COMPATIBLE, the oracle machine's code path); MKL's AVX-512 kernels round a few ulps
# differently, and a warp grid an ulp off flips truncated crop pixels (0.1-0.5 % of them). So products,
# inverses and the 2x2 SVD are spelled out in float32 operations that round the same on every machine and
# equal what the fixtures computed bit for bit.

_F32 = np.float32
# LAPACK's slamch('E') (unit roundoff) and safe minimum, which its 2x2 SVD branches on.
_EPS = _F32(2.0**-24)
_SAFE_MIN = _F32(np.finfo(np.float32).tiny)


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for small matrices as element-wise operations, summed in index order without fused
    multiply-adds (as BLAS's reference kernels)."""
    out = a[..., :, :1] * b[..., :1, :]
    for k in range(1, a.shape[-1]):
        out = out + a[..., :, k : k + 1] * b[..., k : k + 1, :]
    return out


def _inverse_3x3(matrix: np.ndarray) -> np.ndarray:
    """The inverse of one 3x3 float32 matrix as ``torch.linalg.inv`` computes it (LU factor, then solve).

    LU with partial pivoting (the column scaled by the pivot's reciprocal), then the permuted identity solved
    through L (unit diagonal) and U (each row times the diagonal's reciprocal), in float32 scalars.
    """
    one = _F32(1)
    lu = [[_F32(v) for v in row] for row in matrix]
    order = [0, 1, 2]
    for j in range(3):
        pivot = max(range(j, 3), key=lambda i: abs(lu[i][j]))
        lu[j], lu[pivot] = lu[pivot], lu[j]
        order[j], order[pivot] = order[pivot], order[j]
        reciprocal = one / lu[j][j]
        for i in range(j + 1, 3):
            lu[i][j] = lu[i][j] * reciprocal
        for i in range(j + 1, 3):
            for k in range(j + 1, 3):
                lu[i][k] = lu[i][k] - lu[i][j] * lu[j][k]
    out = [[one if order[i] == j else _F32(0) for j in range(3)] for i in range(3)]
    for j in range(3):
        for k in range(3):
            if out[k][j] != 0:
                for i in range(k + 1, 3):
                    out[i][j] = out[i][j] - out[k][j] * lu[i][k]
        for k in range(2, -1, -1):
            if out[k][j] != 0:
                out[k][j] = out[k][j] * (one / lu[k][k])
                for i in range(k):
                    out[i][j] = out[i][j] - out[k][j] * lu[i][k]
    return np.array(out, dtype=np.float32)


def inverse_3x3(matrices: torch.Tensor) -> torch.Tensor:
    """The inverses of (B, 3, 3) float32 matrices on the CPU, rounded as :func:`_inverse_3x3`."""
    inverses = [_inverse_3x3(m) for m in matrices.detach().to("cpu", torch.float32).numpy()]
    return torch.from_numpy(np.stack(inverses)).reshape(matrices.shape)


def _sign(a: np.float32, b: np.float32) -> np.float32:
    """Fortran's SIGN(a, b): ``|a|`` with the sign of ``b``."""
    return _F32(abs(a)) if b >= 0 else _F32(-abs(a))


def _hypot(x: np.float32, y: np.float32) -> np.float32:
    """``sqrt(x^2 + y^2)`` scaled by the larger magnitude, as LAPACK's slapy2."""
    big, small = max(abs(x), abs(y)), min(abs(x), abs(y))
    if small == 0:
        return _F32(big)
    ratio = small / big
    return big * np.sqrt(_F32(1) + ratio * ratio)


def _triangular_svd(f: np.float32, g: np.float32, h: np.float32) -> Tuple[np.float32, ...]:
    """SVD of the upper-triangular [[f, g], [0, h]] (Demmel and Kahan, LAPACK's slasv2) in float32.

    Returns (smaller singular value, larger, sin and cos of the right rotation, sin and cos of the left).
    """
    one, two = _F32(1), _F32(2)
    ft, fa, ht, ha = f, abs(f), h, abs(h)
    largest = "f"
    swap = ha > fa
    if swap:
        largest, ft, ht, fa, ha = "h", ht, ft, ha, fa
    gt, ga = g, abs(g)
    if ga == 0:
        ssmin, ssmax, clt, crt, slt, srt = ha, fa, one, one, _F32(0), _F32(0)
    else:
        g_small = True
        if ga > fa:
            largest = "g"
            if fa / ga < _EPS:
                # g dominates so much that the singular values are ga and fa*ha/ga.
                g_small = False
                ssmax = ga
                ssmin = fa / (ga / ha) if ha > 1 else (fa / ga) * ha
                clt, slt, srt, crt = one, ht / gt, one, ft / gt
        if g_small:
            d = fa - ha
            el = one if d == fa else d / fa
            m = gt / ft
            t = two - el
            mm, tt = m * m, t * t
            s = np.sqrt(tt + mm)
            r = abs(m) if el == 0 else np.sqrt(el * el + mm)
            a = _F32(0.5) * (s + r)
            ssmin, ssmax = ha / a, fa * a
            if mm == 0:
                t = _sign(two, ft) * _sign(one, gt) if el == 0 else gt / _sign(d, ft) + m / t
            else:
                t = (m / (s + t) + m / (r + el)) * (one + a)
            el = np.sqrt(t * t + _F32(4))
            crt, srt = two / el, t / el
            clt = (crt + srt * m) / a
            slt = (ht / ft) * srt / a
    if swap:
        csl, snl, csr, snr = srt, crt, slt, clt
    else:
        csl, snl, csr, snr = clt, slt, crt, srt
    if largest == "f":
        tsign = _sign(one, csr) * _sign(one, csl) * _sign(one, f)
    elif largest == "g":
        tsign = _sign(one, snr) * _sign(one, csl) * _sign(one, g)
    else:
        tsign = _sign(one, snr) * _sign(one, snl) * _sign(one, h)
    ssmax = _sign(ssmax, tsign)
    ssmin = _sign(ssmin, tsign * _sign(one, f) * _sign(one, h))
    return ssmin, ssmax, snr, csr, snl, csl


def svd_2x2(matrix: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(U, V^T) of a 2x2 float32 matrix, rounded as LAPACK's sgesdd (what ``torch.svd`` calls on the CPU).

    The reference algorithm in float32 scalars: a Householder reflection makes the matrix upper bidiagonal, the
    2x2 bidiagonal SVD gives both rotations (unless the off-diagonal is negligible), the singular values are
    made positive and sorted, and the reflection is applied to U.
    """
    one = _F32(1)
    a = [[_F32(v) for v in row] for row in matrix]
    # Householder reflection (I - tau [1 v][1 v]^T) zeroing a[1][0].
    alpha, x = a[0][0], a[1][0]
    tau, v = _F32(0), _F32(0)
    if x != 0:
        beta = -_sign(_hypot(alpha, _F32(abs(x))), alpha)
        tau = (beta - alpha) / beta
        v = x * (one / (alpha - beta))
        alpha = beta
        w = a[0][1] + a[1][1] * v
        if w != 0:
            t = -tau * w
            a[0][1], a[1][1] = a[0][1] + t, a[1][1] + v * t
    d1, e1, d2 = alpha, a[0][1], a[1][1]
    # sbdsqr's negligibility test for the off-diagonal (relative tolerance 10 eps, at most 6 sweeps).
    smallest = min(abs(d1), abs(d2) * (abs(d1) / (abs(d1) + abs(e1)))) / np.sqrt(_F32(2))
    threshold = max(_F32(10) * _EPS * smallest, _F32(6) * (_F32(2) * (_F32(2) * _SAFE_MIN)))
    if abs(e1) <= threshold:
        sv = [d1, d2]
        cos_r, sin_r, cos_l, sin_l = one, _F32(0), one, _F32(0)
    else:
        sv_min, sv_max, sin_r, cos_r, sin_l, cos_l = _triangular_svd(d1, e1, d2)
        sv = [sv_max, sv_min]
    vt = [[cos_r, sin_r], [-sin_r, cos_r]]
    u = [[cos_l, -sin_l], [sin_l, cos_l]]
    for i in range(2):
        if sv[i] < 0:
            sv[i] = -sv[i]
            vt[i] = [-vt[i][0], -vt[i][1]]
    if sv[1] > sv[0]:
        vt = [vt[1], vt[0]]
        u = [[u[0][1], u[0][0]], [u[1][1], u[1][0]]]
    if tau != 0:
        for j in range(2):
            w = u[0][j] + u[1][j] * v
            if w != 0:
                t = -tau * w
                u[0][j], u[1][j] = u[0][j] + t, u[1][j] + v * t
    return np.array(u, dtype=np.float32), np.array(vt, dtype=np.float32)


def fit_similarity(points: np.ndarray, template: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
    """The similarity transform taking ``points`` to ``template`` (both (3, 2)), in float32 on the CPU.

    Both point sets are centred and divided by their (unbiased) standard deviation over all six values, the
    rotation comes from the SVD of the normalised cross-covariance with the reflection fixed. Returns the (2, 3)
    matrix and the nose offset ``template_n[2] - points_n[2]`` in normalised units (the smoothing's input).
    """
    p = torch.tensor(np.asarray(points), dtype=torch.float32)
    q = torch.tensor(np.asarray(template), dtype=torch.float32)
    c1, c2 = p.mean(dim=0), q.mean(dim=0)
    s1, s2 = torch.std(p - c1), torch.std(q - c2)
    p_n, q_n = (p - c1) / s1, (q - c2) / s2
    u, vt = (torch.from_numpy(m) for m in svd_2x2(matmul(p_n.T, q_n).numpy()))
    v = vt.T.clone()
    rotation = matmul(v, u.T)
    if rotation[0, 0] * rotation[1, 1] - rotation[0, 1] * rotation[1, 0] < 0:
        v[:, -1] = -v[:, -1]
        rotation = matmul(v, u.T)
    scale = s2 / s1
    translation = c2.reshape(2, 1) - scale * matmul(rotation, c1.reshape(2, 1))
    return torch.cat((scale * rotation, translation), dim=1), q_n[2] - p_n[2]


class FaceAligner:
    """One job's alignment matrices: the fit of each source frame plus the smoothed nose offset.

    The smoothing state advances once per source frame with a face, in the source's order: call :meth:`fit`
    for source frames 0, 1, 2, ... (frames without a face are skipped and leave the state as it is) and reuse
    the returned matrices when the output loops back over the source. A new job needs a new aligner.

    ``fp16_matrix`` rounds each matrix to float16 as upstream does on CUDA (its default dtype), for the warp
    and the restore. It is off by default because the parity fixtures ran upstream in float32, and rounding
    moves the crop: half a float16 ulp of the translation, up to 0.03 px on the fixtures (a 1080p face's
    translation of ~-664 px moves by up to 0.11-0.21 px), which changes ~20 % of the fixtures' crop pixels, by
    up to 12 levels at edges. Only the matrix is rounded: upstream's CUDA path also warps in float16.
    """

    def __init__(self, geometry: FaceGeometry, *, fp16_matrix: bool = False):
        self.geometry = geometry
        self.fp16_matrix = fp16_matrix
        self._template = geometry.template
        self._bias: Optional[torch.Tensor] = None
        self._last_index: Optional[int] = None

    @property
    def bias(self) -> Optional[torch.Tensor]:
        """The smoothed nose offset after the last fitted frame ((2,) float32, normalised units), or None."""
        return self._bias

    def fit(self, points: np.ndarray, source_index: int) -> torch.Tensor:
        """The (2, 3) float32 matrix (frame pixels to crop pixels) of source frame ``source_index``.

        ``points`` are the frame's three points (:func:`points_from_106` / :func:`points_from_68`). The
        offset is ``0.2 * previous + 0.8 * new`` from the second frame on and is added to the translation.

        Raises:
            ValueError: when ``source_index`` does not follow the last fitted frame (the state would run out
                of order, or twice over a looped source).
        """
        if self._last_index is not None and source_index <= self._last_index:
            raise ValueError(
                f"source frame {source_index} fitted after frame {self._last_index}: fit each source frame "
                "once, in order (reuse the matrices when the video loops)"
            )
        matrix, bias = fit_similarity(points, self._template)
        if self._bias is not None:
            bias = self._bias * _SMOOTH_PREV + bias * _SMOOTH_NEW
        self._bias, self._last_index = bias, source_index
        matrix[:, 2] = matrix[:, 2] + bias
        if self.fp16_matrix:
            matrix = matrix.to(torch.float16).to(torch.float32)
        return matrix


def _pixel_to_normalised(height: int, width: int) -> torch.Tensor:
    """(1, 3, 3) float32: pixel coordinates to [-1, 1] with ``align_corners=True`` (kornia's convention)."""
    mat = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, -1.0], [0.0, 0.0, 1.0]])
    mat[0, 0] = mat[0, 0] * 2.0 / (width - 1.0 if width > 1 else 1e-14)
    mat[1, 1] = mat[1, 1] * 2.0 / (height - 1.0 if height > 1 else 1e-14)
    return mat.unsqueeze(0)


def homography(matrices: torch.Tensor) -> torch.Tensor:
    """(B, 2, 3) affine matrices as (B, 3, 3) homographies."""
    out = F.pad(matrices, [0, 0, 0, 1], "constant", value=0.0)
    out[..., -1, -1] += 1.0
    return out


def sampling_theta(matrices: torch.Tensor, src_size: Tuple[int, int], dst_size: Tuple[int, int]) -> torch.Tensor:
    """The (B, 2, 3) sampling matrix (dst to src, both in [-1, 1]) of a warp by ``matrices`` (src to dst pixels).

    Sizes are (height, width). The steps are kornia's ``warp_affine`` (normalise both sides, then invert in
    normalised coordinates) in float32 on the CPU, so the grid, and with it every sampled value, equals upstream's.
    """
    matrices = matrices.detach().to("cpu", torch.float32)
    src_pix_from_norm = inverse_3x3(_pixel_to_normalised(*src_size))
    dst_norm_from_pix = _pixel_to_normalised(*dst_size)
    dst_norm_from_src_norm = matmul(dst_norm_from_pix, matmul(homography(matrices), src_pix_from_norm))
    return inverse_3x3(dst_norm_from_src_norm)[:, :2, :]


def sampling_grid(theta: torch.Tensor, size: Tuple[int, int], rows: slice = slice(None),
                  cols: slice = slice(None)) -> torch.Tensor:
    """``F.affine_grid(theta, size, align_corners=True)`` (B, h, w, 2), or its ``rows`` x ``cols`` part.

    Built element-wise (``(x * t0 + y * t1) + t2``) for the rounding reason of :func:`matmul`; a part is the
    full grid's values, so a region of the output can be warped alone.
    """
    height, width = size
    xs = torch.linspace(-1.0, 1.0, width, device=theta.device)[cols].view(1, 1, -1)
    ys = torch.linspace(-1.0, 1.0, height, device=theta.device)[rows].view(1, -1, 1)
    t = theta[:, None, None]
    grid_x = (xs * t[..., 0, 0] + ys * t[..., 0, 1]) + t[..., 0, 2]
    grid_y = (xs * t[..., 1, 0] + ys * t[..., 1, 1]) + t[..., 1, 2]
    return torch.stack((grid_x, grid_y), dim=-1)


def warp_faces(frames: torch.Tensor, matrices: torch.Tensor, geometry: FaceGeometry) -> torch.Tensor:
    """The uint8 crops (B, height, width, 3) of ``frames`` (B, H, W, 3) uint8 under ``matrices`` (B, 2, 3).

    Bilinear with ``align_corners=True``; where a crop pixel's neighbours fall outside the frame the colour
    tends to 127, as kornia's fill (the warp of a ones mask decides how much). Truncated to uint8 as upstream's
    ``.astype(uint8)``. Runs on ``frames.device``.
    """
    width, height = geometry.crop_size
    src = frames.permute(0, 3, 1, 2).to(torch.float32)
    theta = sampling_theta(matrices, tuple(frames.shape[1:3]), (height, width)).to(frames.device)
    grid = sampling_grid(theta, (height, width))
    inside = F.grid_sample(torch.ones_like(src[:, :1]), grid, mode="bilinear", padding_mode="zeros",
                           align_corners=True)
    warped = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
    warped = warped + (1 - inside) * FILL_VALUE
    return warped.permute(0, 2, 3, 1).to(torch.uint8)


def resize_faces(crops: np.ndarray, geometry: FaceGeometry) -> np.ndarray:
    """(B, 3, r, r) uint8 faces from (B, height, width, 3) uint8 crops: cv2 LANCZOS4 on the CPU, as upstream."""
    size = (geometry.resolution, geometry.resolution)
    faces = [cv2.resize(crop, size, interpolation=cv2.INTER_LANCZOS4) for crop in crops]
    return np.stack(faces).transpose(0, 3, 1, 2) if faces else np.zeros((0, 3, *size), np.uint8)


def reference_pixels(faces: torch.Tensor) -> torch.Tensor:
    """The faces (B, 3, r, r) uint8 as the VAE's float32 pixels in [-1, 1]: ``(face / 255 - 0.5) / 0.5``."""
    return (faces / 255.0 - 0.5) / 0.5


@dataclasses.dataclass(frozen=True)
class MouthMask:
    """Upstream's fixed mouth mask at one resolution: ``pixels`` (3, r, r) float64, 1 = keep, 0 = regenerate."""

    pixels: torch.Tensor

    @classmethod
    def load(cls, path: Path, resolution: int) -> MouthMask:
        """``mask.png`` read as RGB, LANCZOS4-resized to ``resolution`` squared, divided by 255 (float64)."""
        image = cv2.imread(str(path))
        if image is None:
            raise FileNotFoundError(f"cannot read the LatentSync mouth mask {path}")
        image = cv2.cvtColor(image, cv2.COLOR_BGR2RGB)
        image = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_LANCZOS4) / 255.0
        return cls(torch.from_numpy(image).permute(2, 0, 1).contiguous())

    @property
    def keep(self) -> torch.Tensor:
        """(1, 1, r, r) float64: the first channel, upstream's per-frame ``masks`` (1 = keep the reference)."""
        return self.pixels[None, :1]

    def masked(self, pixels: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, 3, r, r) float32 times the mask, in float64 as torch promotes it upstream."""
        return pixels * self.pixels.to(pixels.device)
