"""LoRA adapters on the MuseTalk UNet: add, save, load, switch and remove, never merged into the base.

An adapter folder holds ``adapter.safetensors`` (the LoRA tensors, peft's key
names without the adapter name) and ``adapter.json``: the base weights' hashes,
rank, alpha, target modules, the tensor file's SHA-256 and the evaluation of the
fit that made it. The LoRA config is rebuilt from ``adapter.json`` (alpha
included), not guessed from the tensors: diffusers' own file loader infers the
rank from the shapes and drops alpha unless it is stored in its own metadata,
which silently rescales the adapter.

The base stays untouched: with no adapter active, peft's LoRA layers call the
base layer alone, and :func:`unload_adapter` of the last adapter puts the
original modules back, so the UNet is then bit-identical to the one loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from ..errors import ErrorCode, LipSyncError

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FULL_UNET_FILE = "unet.safetensors"
FORMAT = 1
# The attention projections of diffusers' Attention blocks (self- and cross-attention to the audio).
TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")


@dataclasses.dataclass(frozen=True)
class AdapterInfo:
    """What ``adapter.json`` says about an adapter; ``name`` is the name it is loaded under."""

    name: str
    kind: str  # "lora", or "full" (a whole fine-tuned UNet, loaded as the base instead)
    rank: int
    alpha: float
    target_modules: Sequence[str]
    tensors_sha256: str
    base: Dict[str, str]  # models-folder path -> SHA-256 of the base weights it was trained on
    meta: dict


def sha256_file(path: Path) -> str:
    """SHA-256 (hex) of a file, read in 16 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(16 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, name: str = "default",
             target_modules: Sequence[str] = TARGET_MODULES) -> list:
    """Adds a trainable LoRA named ``name`` to ``unet`` (B starts at zero: the identity) and activates it.

    Returns its parameters, the only ones with ``requires_grad``.
    """
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                                init_lora_weights=True), adapter_name=name)
    return [p for n, p in unet.named_parameters() if "lora_" in n and f".{name}." in n and p.requires_grad]


def lora_tensors(unet: torch.nn.Module, name: str = "default") -> Dict[str, torch.Tensor]:
    """The LoRA tensors of adapter ``name`` (float32, CPU), keyed as peft saves them."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=name)
    return {k: v.detach().float().cpu().contiguous() for k, v in state.items()}


def save_adapter(out_dir: Path, tensors: Dict[str, torch.Tensor], meta: dict, full: bool = False) -> Path:
    """Writes the tensors and ``adapter.json`` (with the tensor file's SHA-256) into ``out_dir``; returns the tensors' path.

    ``full``: ``tensors`` is a whole UNet state dict, written as ``unet.safetensors``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (FULL_UNET_FILE if full else ADAPTER_FILE)
    save_file(tensors, str(path))
    meta = {"format": FORMAT, **meta, "kind": "full" if full else "lora", "file": path.name,
            "tensors_sha256": sha256_file(path), "tensors_bytes": path.stat().st_size}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def read_adapter_info(adapter_dir: Path, name: Optional[str] = None) -> AdapterInfo:
    """Reads and checks ``adapter.json`` and the tensor file's hash.

    Raises:
        LipSyncError(invalid_input): a missing or malformed ``adapter.json``, or a tensor file whose
            SHA-256 is not the one recorded (a corrupted or swapped file).
    """
    adapter_dir = Path(adapter_dir)
    try:
        meta = json.loads((adapter_dir / META_FILE).read_text())
        kind, digest = meta["kind"], meta["tensors_sha256"]
        path = adapter_dir / meta["file"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _invalid(f"{adapter_dir} holds no readable {META_FILE} ({e})") from None
    if not path.is_file() or sha256_file(path) != digest:
        raise _invalid(f"{path.name} in {adapter_dir} is missing or does not match the SHA-256 in {META_FILE}")
    return AdapterInfo(name=name or f"adapter_{digest[:12]}", kind=kind, rank=int(meta.get("rank", 0)),
                       alpha=float(meta.get("alpha", 0)), target_modules=tuple(meta.get("target_modules", ())),
                       tensors_sha256=digest, base=dict(meta.get("base", {}).get("files", {})), meta=meta)


def load_adapter(unet: torch.nn.Module, adapter_dir: Path, name: Optional[str] = None,
                 base: Optional[Dict[str, str]] = None) -> AdapterInfo:
    """Loads the LoRA in ``adapter_dir`` into ``unet`` under ``name`` and makes it the active one.

    ``base``: the SHA-256 of the loaded base weights by models-folder path (for instance from the weights
    lock); an adapter trained on other weights is refused. The adapter's tensors follow the UNet's
    device and dtype. Use :func:`use_adapter` to switch and :func:`unload_adapter` to remove it.

    Raises:
        LipSyncError(invalid_input): see :func:`read_adapter_info`; a ``full`` fit (load its
            ``unet.safetensors`` as the base instead); other base weights; tensors that do not fit the UNet.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    info = read_adapter_info(adapter_dir, name)
    if info.kind != "lora":
        raise _invalid(f"{adapter_dir} is a {info.kind!r} fit, not a LoRA: put its {FULL_UNET_FILE} in place of "
                       "the base UNet instead")
    for path, digest in (base or {}).items():
        if path in info.base and info.base[path] != digest:
            raise _invalid(f"{adapter_dir} was trained on other base weights ({path} {info.base[path][:12]}…, "
                           f"loaded {digest[:12]}…)")
    tensors = load_file(str(Path(adapter_dir) / info.meta["file"]))
    unet.add_adapter(LoraConfig(r=info.rank, lora_alpha=info.alpha, target_modules=list(info.target_modules),
                                init_lora_weights=True), adapter_name=info.name)
    result = set_peft_model_state_dict(unet, tensors, adapter_name=info.name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{info.name}." in k]
    if missing or result.unexpected_keys:
        unload_adapter(unet, info.name)
        raise _invalid(f"{adapter_dir} does not fit this UNet ({len(missing)} LoRA tensors missing, "
                       f"{len(result.unexpected_keys)} unexpected)")
    param = next(p for n, p in unet.named_parameters() if "lora_" not in n)
    for n, p in unet.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(device=param.device, dtype=param.dtype)
        p.requires_grad_(False)
    use_adapter(unet, info.name)
    return info


def use_adapter(unet: torch.nn.Module, name: Optional[str]) -> None:
    """Makes adapter ``name`` the only active one; None runs the plain base."""
    if not getattr(unet, "_hf_peft_config_loaded", False):
        if name is None:
            return
        raise KeyError(f"no adapter {name!r} is loaded")
    if name is None:
        unet.disable_adapters()
    else:
        unet.enable_adapters()
        unet.set_adapter(name)


def unload_adapter(unet: torch.nn.Module, name: str) -> None:
    """Removes adapter ``name``; removing the last one restores the UNet's original modules."""
    unet.delete_adapters(name)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()


def _invalid(message: str) -> LipSyncError:
    return LipSyncError(ErrorCode.INVALID_INPUT, f"adapter: {message}", stage="load")
