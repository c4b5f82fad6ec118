"""LoRA adapters on the MuseTalk UNet: add, save, load, switch and remove, never merged into the base.

An adapter folder holds ``adapter.safetensors`` (the LoRA tensors, peft's key
names without the adapter name) and ``adapter.json``: the base weights' hashes,
rank, alpha, target modules, the tensor file's SHA-256 and the evaluation of the
fit that made it. The tensor file is self-describing: its safetensors header
metadata repeats what loading needs (format, kind, rank, alpha, target modules,
base hashes), so ``adapter.safetensors`` alone is a whole adapter (what a job
fetches). The LoRA config is rebuilt from that description (alpha included),
not guessed from the tensors: diffusers' own file loader infers the
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
import warnings
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import ErrorCode, LipSyncError

ADAPTER_FILE = "adapter.safetensors"
META_FILE = "adapter.json"
FULL_UNET_FILE = "unet.safetensors"
FORMAT = 1
# The safetensors header key holding what loading needs (JSON of HEADER_FIELDS), so the file alone is an adapter.
HEADER_KEY = "musetalk_worker.adapter"
HEADER_FIELDS = ("format", "kind", "rank", "alpha", "target_modules", "base")
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

    The fields that say how to load the tensors (:data:`HEADER_FIELDS`: format, kind, rank, alpha, target
    modules, base weights) also go into the safetensors header's metadata (key :data:`HEADER_KEY`, JSON), so
    the tensor file alone is a whole adapter (a job's ``adapter`` input is that one file).
    ``full``: ``tensors`` is a whole UNet state dict, written as ``unet.safetensors``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (FULL_UNET_FILE if full else ADAPTER_FILE)
    meta = {"format": FORMAT, **meta, "kind": "full" if full else "lora"}
    header = {k: meta[k] for k in HEADER_FIELDS if k in meta}
    save_file(tensors, str(path), metadata={HEADER_KEY: json.dumps(header, sort_keys=True)})
    meta = {**meta, "file": path.name, "tensors_sha256": sha256_file(path), "tensors_bytes": path.stat().st_size}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return path


def adapter_file(adapter: Path) -> Path:
    """The tensor file of ``adapter``: the file itself, or the one a folder's ``adapter.json`` names.

    Raises:
        LipSyncError(invalid_input): a folder without a readable ``adapter.json``, or nothing at ``adapter``.
    """
    adapter = Path(adapter)
    if adapter.is_dir():
        return adapter / _folder_meta(adapter)["file"]
    if not adapter.is_file():
        raise _invalid(f"{adapter} is neither an adapter folder nor a .safetensors file")
    return adapter


def read_adapter_info(adapter: Path, name: Optional[str] = None) -> AdapterInfo:
    """Reads and checks an adapter: a folder (``adapter.json`` + its tensor file) or the tensor file alone.

    The description comes from the tensor file's header (:func:`save_adapter`); a folder's ``adapter.json``
    adds the rest (evaluation, options), stands in for the header of files written before it had one,
    and its recorded SHA-256 must match the file. Rank and alpha are never guessed from the tensors.

    Raises:
        LipSyncError(invalid_input): a missing or malformed ``adapter.json``, a tensor file whose SHA-256 is
            not the one recorded (a corrupted or swapped file), a file that is not safetensors or whose
            header does not describe an adapter.
    """
    adapter = Path(adapter)
    folder = _folder_meta(adapter) if adapter.is_dir() else None
    path = adapter_file(adapter)
    digest = sha256_file(path) if path.is_file() else None
    if folder is not None and digest != folder.get("tensors_sha256"):
        raise _invalid(f"{path.name} in {adapter} is missing or does not match the SHA-256 in {META_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        described = json.loads(header[HEADER_KEY]) if HEADER_KEY in header else None
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for a broken file
        raise _invalid(f"{path.name} is not a readable safetensors file ({type(e).__name__}: {str(e)[:200]})") from None
    if described is None and folder is not None:
        described = {k: folder[k] for k in HEADER_FIELDS if k in folder}
    meta = {**(folder or {}), **(described or {}), "tensors_sha256": digest}
    try:
        kind = meta["kind"]
        rank, alpha = (int(meta["rank"]), float(meta["alpha"])) if kind == "lora" else (0, 0.0)
        targets = tuple(meta["target_modules"]) if kind == "lora" else ()
        base = dict(meta.get("base", {}).get("files", {}))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise _invalid(f"{path.name} does not describe an adapter in its header (key {HEADER_KEY!r}: {e!r}); "
                       "write it with save_adapter") from None
    if int(meta.get("format", FORMAT)) > FORMAT:
        raise _invalid(f"{path.name} has adapter format {meta['format']}; this worker reads up to {FORMAT}")
    return AdapterInfo(name=name or f"adapter_{digest[:12]}", kind=kind, rank=rank, alpha=alpha,
                       target_modules=targets, tensors_sha256=digest, base=base, meta=meta)


def load_adapter(unet: torch.nn.Module, adapter: Path, name: Optional[str] = None,
                 base: Optional[Dict[str, str]] = None) -> AdapterInfo:
    """Loads the LoRA at ``adapter`` (a folder or its ``adapter.safetensors`` alone) into ``unet`` under
    ``name`` and makes it the active one.

    ``base``: the SHA-256 of the loaded base weights by models-folder path (for instance from the weights
    lock); an adapter trained on other weights is refused, as is one that names none of these files. The
    adapter's tensors follow the UNet's device and dtype. Use :func:`use_adapter` to switch and
    :func:`unload_adapter` to remove it.

    Raises:
        LipSyncError(invalid_input): see :func:`read_adapter_info`; a ``full`` fit (load its
            ``unet.safetensors`` as the base instead); other base weights; tensors that do not fit the UNet.
    """
    from peft import LoraConfig, set_peft_model_state_dict

    info = read_adapter_info(adapter, name)
    if info.kind != "lora":
        raise _invalid(f"{adapter} is a {info.kind!r} fit, not a LoRA: put its {FULL_UNET_FILE} in place of "
                       "the base UNet instead")
    if base:
        for path, digest in base.items():
            if path in info.base and info.base[path] != digest:
                raise _invalid(f"{adapter} was trained on other base weights ({path} {info.base[path][:12]}…, "
                               f"loaded {digest[:12]}…)")
        if info.base and not set(info.base) & set(base):
            raise _invalid(f"{adapter} was trained on other base weights ({', '.join(sorted(info.base))}, "
                           f"not the loaded {', '.join(sorted(base))})")
    try:
        tensors = load_file(str(adapter_file(adapter)))
    except Exception as e:  # noqa: BLE001 - a header that reads but tensors that do not
        raise _invalid(f"the tensors of {adapter} do not load ({type(e).__name__}: {str(e)[:200]})") from None
    with warnings.catch_warnings():
        # Several adapters on one UNet is what the engine's cache means to do.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        unet.add_adapter(LoraConfig(r=info.rank, lora_alpha=info.alpha, target_modules=list(info.target_modules),
                                    init_lora_weights=True), adapter_name=info.name)
    try:
        result = set_peft_model_state_dict(unet, tensors, adapter_name=info.name)
    except RuntimeError as e:  # shapes that do not fit
        unload_adapter(unet, info.name)
        raise _invalid(f"{adapter} does not fit this UNet ({str(e)[:300]})") from None
    missing = [k for k in result.missing_keys if "lora_" in k and f".{info.name}." in k]
    if missing or result.unexpected_keys:
        unload_adapter(unet, info.name)
        raise _invalid(f"{adapter} does not fit this UNet ({len(missing)} LoRA tensors missing, "
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
    """Removes adapter ``name``; removing the last one restores the UNet's original modules.

    Which adapter is active afterwards is peft's choice: call :func:`use_adapter` before the next use.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Adapter .* was active which is now deleted")
        unet.delete_adapters(name)
    if not getattr(unet, "peft_config", None):
        unet.unload_lora()


def _folder_meta(folder: Path) -> dict:
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("file"), str):
            raise ValueError(f"no 'file' in {META_FILE}")
        return meta
    except (OSError, ValueError) as e:
        raise _invalid(f"{folder} holds no readable {META_FILE} ({e})") from None


def _invalid(message: str) -> LipSyncError:
    return LipSyncError(ErrorCode.INVALID_INPUT, f"adapter: {message}", stage="load")
