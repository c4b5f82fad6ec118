"""Choosing the torch device a worker or a command runs its models on.

torch is imported only when a device is resolved, so a command can call
:func:`enable_mps_fallback` first: torch reads that setting when it loads.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import ErrorCode, LipSyncError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

MPS_FALLBACK_ENV = "PYTORCH_ENABLE_MPS_FALLBACK"


def enable_mps_fallback() -> None:
    """Lets ops without an Apple MPS kernel run on the CPU instead of failing (unless the user set it to 0).

    torch registers its MPS fallback once, when it is imported, so this must run
    before that; a command calls it first thing.
    """
    os.environ.setdefault(MPS_FALLBACK_ENV, "1")
    if "torch" in sys.modules:
        logger.warning("%s was set after torch was imported; torch will not see it", MPS_FALLBACK_ENV)


def resolve_device(device: str = "auto") -> "torch.device":
    """``auto`` picks CUDA, then Apple's MPS, then the CPU; an explicit choice must be available."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise LipSyncError(ErrorCode.INVALID_INPUT, f"unknown device {device!r}; use auto, cuda, mps or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LipSyncError(ErrorCode.INVALID_INPUT, "device 'cuda' was asked for but no CUDA GPU is visible")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise LipSyncError(ErrorCode.INVALID_INPUT, "device 'mps' was asked for but Apple's MPS is not available")
    return chosen


def images_per_call(device: "torch.device") -> Optional[int]:
    """How many images the convolutional image networks (the VAE, face parsing) take per call on ``device``.

    On the CPU, one: the activations of one 256x256 image stay in the caches,
    a batch's do not, and one image at a time measured faster per image for
    the VAE's encoder and decoder and for BiSeNet, with the small and the
    real-size models (``bench/images_per_call.py``; bench/README.md has the
    figures). It also makes each image's result independent of the batch it
    came in. On CUDA and MPS, None: the whole batch in one call.
    """
    return 1 if device.type == "cpu" else None


def warm_up_pays(device: "torch.device", compiled: bool = False) -> bool:
    """Whether running the networks once at start takes a one-time cost off the first job on ``device``.

    CUDA's first calls load kernels and grow the caching allocator, MPS's
    compile shaders, and ``torch.compile`` (``compiled``) compiles on its first
    call anywhere. Eager CPU calls have no such cost, so a warm-up there only
    delays readiness by as long as it computes, seconds with the real-size
    models, and the first job is no faster for it
    (``scripts/measure_cold_start.py --random-models`` times both; bench/README.md).
    """
    return compiled or device.type != "cpu"


def cpu_has_native_bfloat16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (Intel AMX or AVX512-BF16), where oneDNN runs the
    networks' convolutions and matrix products in it several times faster than in float32."""
    import torch

    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own probes (CPUID)
    return any(getattr(torch.cpu, check, lambda: False)() for check in checks)


def half_dtype(device: "torch.device", configured: str = "float16") -> "torch.dtype":
    """What a job's ``fp16`` computes in on ``device``: ``configured`` (the deployment's half dtype) on a GPU;
    on the CPU bfloat16 where the CPU has it in hardware (float16 has no fast CPU kernels).

    Raises:
        LipSyncError(invalid_input): a CPU without bfloat16 in hardware.
    """
    import torch

    if device.type != "cpu":
        return getattr(torch, configured)
    if not cpu_has_native_bfloat16():
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            "fp16 on the CPU computes in bfloat16, which needs a CPU with it in hardware (Intel AMX or "
            "AVX512-BF16); this one has neither. Set fp16 to false.",
            stage="validate",
        )
    return torch.bfloat16


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """The CPUs this process can keep busy: its affinity mask, capped by the container's CPU quota.

    A container limited to N CPUs (``docker --cpus``, a RunPod CPU pod) still
    sees every core of its host in ``os.cpu_count()``; the quota (rounded up)
    is in the cgroup's files.
    """
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_cpu_quota(cgroup)
    return count if quota is None else max(1, min(count, math.ceil(quota)))


def _cgroup_cpu_quota(cgroup: Path) -> Optional[float]:
    """CPUs' worth of time per period the cgroup allows; None: no quota (or no cgroup files)."""
    try:  # cgroup v2: "max 100000" or "200000 100000"
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:  # cgroup v1
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota in ("max", "-1"):
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def fit_cpu_threads(cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Caps torch's CPU threads at :func:`usable_cpus` (torch counts the host's cores, so in a container
    with a CPU quota its threads would fight over the few CPUs it has); returns torch's thread count.
    ``OMP_NUM_THREADS``, when set, is the user's choice and is left alone."""
    import torch

    usable = usable_cpus(cgroup)
    if "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() > usable:
        logger.info("torch CPU threads %d -> %d (the CPUs this container may use)", torch.get_num_threads(), usable)
        torch.set_num_threads(usable)
    return torch.get_num_threads()
