"""GFPGAN v1.4 (``GFPGANv1Clean``, 512 px): loading it, and running it the way its authors' code does.

The architecture is spandrel's (MIT; the same maths as upstream's
``gfpganv1_clean_arch``), used as a plain module: spandrel's own call feeds
GFPGAN [0, 1] instead of [-1, 1], so the scaling here is ``GFPGANer``'s
(``/255``, ``normalize(0.5, 0.5)``; out: clamp to [-1, 1], back to 0..255).
The weights come from the image's safetensors conversion of the release's
``params_ema`` (``builder.fetch_weights``), loaded with strict keys, so the
worker never unpickles anything. The noise of StyleGAN's layers is the
checkpoint's fixed buffers (``randomize_noise=False``): the same face gives
the same output on every call, where upstream draws new noise each time.

Float16 is never used: GFPGAN's authors confirm it breaks the network
(TencentARC/GFPGAN#50), and spandrel marks it unsupported.
"""

from __future__ import annotations

import logging
from pathlib import Path

from typing import Optional

import torch
from safetensors.torch import load_file

from ..errors import ErrorCode, LipSyncError
from ..options import RESTORE_DTYPES

logger = logging.getLogger(__name__)

# The lock component, and the file of it the worker loads (the conversion the image's build writes).
COMPONENT = "gfpgan"
WEIGHTS = "gfpgan/GFPGANv1.4.safetensors"


class FaceRestorer:
    """A loaded GFPGAN network: aligned RGB faces in, restored RGB faces out, ``batch`` faces per forward.

    ``size`` is the network's face size (512 for GFPGAN v1.4; smaller test networks use less).
    """

    def __init__(self, net: torch.nn.Module, size: int = 512, dtype: torch.dtype = torch.float32, batch: int = 8):
        if dtype == torch.float16:
            raise ValueError("GFPGAN breaks in float16; use float32 or bfloat16")
        self.net, self.size, self.dtype, self.batch = net, size, dtype, batch

    @torch.inference_mode()
    def __call__(self, faces: torch.Tensor) -> torch.Tensor:
        """Restores faces [B, 3, size, size] (RGB, 0..255, float) into the same layout (float, unrounded)."""
        restored = []
        for chunk in faces.split(self.batch):
            x = (chunk.float() / 255 - 0.5) / 0.5
            y = self.net(x.to(self.dtype), return_rgb=False, randomize_noise=False)[0]
            restored.append((y.float().clamp(-1, 1) + 1) / 2 * 255)
        return torch.cat(restored)

    def warm_up(self) -> None:
        """Runs the network once on a zero face, so the first job pays no kernel set-up."""
        device = next(self.net.parameters()).device
        self(torch.zeros(1, 3, self.size, self.size, device=device))


def missing_weights(models_dir: Path) -> LipSyncError:
    """The ``models_missing`` error of a job asking for ``restore`` on a worker without GFPGAN's weights."""
    return LipSyncError(
        ErrorCode.MODELS_MISSING,
        f"'restore' needs the weights component '{COMPONENT}' (GFPGAN v1.4, {WEIGHTS}), which this worker's "
        f"models folder {models_dir} does not have. Build the image with --build-arg "
        f"WEIGHT_COMPONENTS=default,{COMPONENT}, or fetch it with `python -m builder.fetch_weights --dest "
        f"{models_dir} --components {COMPONENT} --convert-unet {COMPONENT}`; or set 'restore' to false.",
        stage="validate",
    )


def installed_restorer(models_dir: Path, device: torch.device, dtype: str = "float32",
                       batch: int = 8) -> Optional[FaceRestorer]:
    """GFPGAN when the models folder has its weights (:func:`load_restorer`), else None: restoration is optional,
    and a job asking for it on such a worker gets :func:`missing_weights`."""
    if not (Path(models_dir) / WEIGHTS).is_file():
        return None
    return load_restorer(models_dir, device, dtype, batch)


def load_restorer(models_dir: Path, device: torch.device, dtype: str = "float32", batch: int = 8) -> FaceRestorer:
    """GFPGAN v1.4 from ``models_dir`` (:data:`WEIGHTS`) on ``device``, in eval mode, computing in ``dtype``.

    Raises:
        LipSyncError(models_missing): the file is absent, spandrel is not
            installed, or the file's tensors are not exactly GFPGAN v1.4's.
    """
    if dtype not in RESTORE_DTYPES:
        raise ValueError(f"restore dtype {dtype!r}: use one of {', '.join(RESTORE_DTYPES)} (never float16)")
    path = Path(models_dir) / WEIGHTS
    if not path.is_file():
        raise missing_weights(models_dir)
    try:
        from spandrel.architectures.GFPGAN import GFPGAN
    except ImportError as error:
        raise LipSyncError(ErrorCode.MODELS_MISSING, "face restoration needs spandrel: pip install -r "
                           "requirements/worker.txt", stage="load") from error
    state = load_file(str(path))
    # Built on the meta device: the weights replace every tensor, so a random initialisation would be wasted.
    with torch.device("meta"):
        net = GFPGAN()
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise LipSyncError(ErrorCode.MODELS_MISSING, f"{path} is not GFPGAN v1.4's params_ema ({error}); "
                           "fetch the component again.", stage="load") from error
    logger.info("loaded GFPGAN v1.4 from %s (%s)", path, dtype)
    net = net.to(device=device, dtype=getattr(torch, dtype)).eval().requires_grad_(False)
    return FaceRestorer(net, 512, getattr(torch, dtype), batch)
