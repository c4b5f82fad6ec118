"""Convert a PyTorch state-dict checkpoint (``torch.save`` zip format) to safetensors, without torch.

Why not ``torch.load`` + ``safetensors.torch.save_file``: the image's weights
stage would need a 1-3 GB torch install for one conversion, and ``torch.load``
runs a pickle. Here the pickle is read by an unpickler that allows only what a
state dict is made of (an ordered dict of tensors) and builds no tensor at all:
each tensor is a reference to a byte range of a storage file in the zip, which
is copied straight into the safetensors file. Memory stays at one chunk of a
tensor; the output is the same bytes for the same input, so its hash is stable.

The checkpoint is either the state dict itself (MuseTalk's ``unet.pth``) or a
training checkpoint that holds it under ``state_dict`` beside plain numbers
(LatentSync's ``{"state_dict": ..., "global_step": ...}``) or under
``params_ema`` (BasicSR's layout: GFPGAN's ``{"params_ema": ...}``, possibly
beside the non-averaged ``params``, which is dropped, as ``GFPGANer`` loads
``params_ema``); only the state dict is written. Keys and shapes are kept exactly, and dtypes too unless a cast is
asked for: ``cast_to="F16"`` rounds every float32 tensor to float16 (IEEE
round-to-nearest-even, overflow to infinity: the bits ``tensor.half()`` gives,
NaN payloads aside). The cast uses numpy, because the standard library's only
float16 codec (``struct`` "e") raises on values beyond float16's range and is
about 70 times slower (160 s instead of 2 s for LatentSync's 1.27 G elements).
The state dict's ``_metadata`` (module versions) is dropped, as
``safetensors.torch.save_file`` does.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import os
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any, BinaryIO, Dict, Mapping, Optional, Tuple

import numpy as np

# torch storage class name -> (safetensors dtype, bytes per element)
_STORAGE_DTYPES: Dict[str, Tuple[str, int]] = {
    "DoubleStorage": ("F64", 8),
    "FloatStorage": ("F32", 4),
    "HalfStorage": ("F16", 2),
    "BFloat16Storage": ("BF16", 2),
    "LongStorage": ("I64", 8),
    "IntStorage": ("I32", 4),
    "ShortStorage": ("I16", 2),
    "CharStorage": ("I8", 1),
    "ByteStorage": ("U8", 1),
    "BoolStorage": ("BOOL", 1),
}
# The casts a conversion makes: (dtype asked for, dtype in the checkpoint) -> numpy's names of (from, to).
_CASTS: Dict[Tuple[str, str], Tuple[str, str]] = {("F16", "F32"): ("<f4", "<f2")}
# A multiple of every item size, so that a chunk never splits an element.
_COPY_CHUNK = 16 << 20
# What a training checkpoint may hold beside its state dict.
_PLAIN = (int, float, str, bool, type(None))
# Where a training checkpoint keeps its state dict, and what else it may hold that is not written
# (BasicSR's non-averaged weights beside the EMA ones the model is used with).
_NESTED = {"state_dict": (), "params_ema": ("params",)}


class ConversionError(ValueError):
    """The checkpoint is not a plain state dict this converter can read."""


@dataclasses.dataclass(frozen=True)
class ConversionResult:
    """What was written: the file, its size, its SHA-256 and how many tensors it holds."""

    path: Path
    size: int
    sha256: str
    tensors: int


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str


@dataclasses.dataclass(frozen=True)
class _StorageRef:
    key: str
    dtype: str
    itemsize: int


@dataclasses.dataclass(frozen=True)
class _TensorRef:
    storage: _StorageRef
    offset: int
    shape: Tuple[int, ...]
    stride: Tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.storage.itemsize


def _rebuild_tensor(
    storage: Any, storage_offset: int, size: Tuple[int, ...], stride: Tuple[int, ...], *_: Any
) -> _TensorRef:
    if not isinstance(storage, _StorageRef):
        raise ConversionError("a tensor refers to something that is not a storage")
    if len(size) != len(stride) or not _is_contiguous(size, stride):
        raise ConversionError(f"a tensor of shape {tuple(size)} is not contiguous (stride {tuple(stride)})")
    return _TensorRef(storage, int(storage_offset), tuple(int(s) for s in size), tuple(stride))


def _is_contiguous(shape: Tuple[int, ...], stride: Tuple[int, ...]) -> bool:
    expected = 1
    for dim, step in zip(reversed(shape), reversed(stride), strict=True):
        # Size-1 dimensions may carry any stride (torch treats them as contiguous).
        if dim != 1 and step != expected:
            return False
        expected *= dim
    return True


class _StateDictUnpickler(pickle.Unpickler):
    """Unpickles a state dict into tensor references; refuses any other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise ConversionError(
            f"the checkpoint needs {module}.{name}, which a plain state dict of tensors does not; "
            "it cannot be converted here (load it with torch instead, or build without --convert-unet)"
        )

    def persistent_load(self, pid: Any) -> _StorageRef:
        if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise ConversionError(f"unexpected storage reference {pid!r} in the checkpoint")
        dtype, itemsize = _STORAGE_DTYPES[pid[1].name]
        return _StorageRef(str(pid[2]), dtype, itemsize)


def read_state_dict(archive: zipfile.ZipFile) -> Tuple[str, Dict[str, _TensorRef]]:
    """The archive's folder prefix and its tensors by key, read without building tensors.

    A checkpoint of the form ``{"state_dict": {...}, "global_step": n}`` gives
    the tensors of its ``state_dict``; ``{"params_ema": {...}}`` those of its
    ``params_ema``.
    """
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        raise ConversionError("not a torch.save zip archive (expected one <name>/data.pkl)")
    prefix = pickles[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in archive.namelist():
        order = archive.read(f"{prefix}byteorder").decode().strip()
        if order != "little":
            raise ConversionError(f"the checkpoint is {order}-endian; safetensors is little-endian")
    with archive.open(pickles[0]) as f:
        obj = _StateDictUnpickler(f).load()
    nested = next((k for k in _NESTED if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)), None)
    if nested is not None:
        others = {key: value for key, value in obj.items() if key != nested and key not in _NESTED[nested]}
        if not all(isinstance(value, _PLAIN) for value in others.values()):
            raise ConversionError(
                f"the checkpoint holds more than a state dict and plain numbers beside it ({', '.join(others)}); "
                "only the state dict of a training checkpoint can be converted"
            )
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError("the checkpoint is not a non-empty dict of tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, _TensorRef):
            raise ConversionError(
                f"entry {key!r} of the checkpoint is not a tensor; only a flat state dict can be converted"
            )
    return prefix, dict(obj)


def convert(src: Path, dst: Path, metadata: Mapping[str, str], cast_to: Optional[str] = None) -> ConversionResult:
    """Write ``src`` (a torch.save'd state dict, or a checkpoint holding one) to ``dst`` as safetensors.

    The file is written under a temporary name and renamed when complete.
    ``metadata`` goes to the header's ``__metadata__`` (with ``format: pt``).
    ``cast_to`` (``"F16"``) rounds the float32 tensors to that dtype; the
    others are copied as they are.

    Raises:
        ConversionError: the checkpoint is not a state dict of contiguous tensors.
    """
    targets = sorted({target for target, _ in _CASTS})
    if cast_to is not None and cast_to not in targets:
        raise ConversionError(f"cannot cast to {cast_to!r}; only to {', '.join(targets)}")
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        with zipfile.ZipFile(src) as archive:
            prefix, tensors = read_state_dict(archive)
            names = sorted(tensors)
            header: Dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
            start = 0
            for name in names:
                dtype, nbytes, _ = _written(tensors[name], cast_to)
                header[name] = {
                    "dtype": dtype, "shape": list(tensors[name].shape), "data_offsets": [start, start + nbytes]
                }
                start += nbytes
            encoded = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
            encoded += b" " * (-len(encoded) % 8)  # keeps the tensor data 8-byte aligned
            digest = hashlib.sha256()
            with open(tmp, "wb") as out:
                _write(out, digest, struct.pack("<Q", len(encoded)) + encoded)
                for name in names:
                    _copy_tensor(archive, prefix, tensors[name], cast_to, out, digest)
        size = tmp.stat().st_size
        os.replace(tmp, dst)
        return ConversionResult(dst, size, digest.hexdigest(), len(names))
    finally:
        tmp.unlink(missing_ok=True)


def _written(ref: _TensorRef, cast_to: Optional[str]) -> Tuple[str, int, Optional[Tuple[str, str]]]:
    """The dtype a tensor is written in, its bytes in the output, and the numpy cast that makes them (None: copied)."""
    cast = _CASTS.get((cast_to, ref.storage.dtype))
    if cast is None:
        return ref.storage.dtype, ref.nbytes, None
    return cast_to, math.prod(ref.shape) * np.dtype(cast[1]).itemsize, cast


def _write(out: BinaryIO, digest: hashlib._Hash, data: bytes) -> None:
    out.write(data)
    digest.update(data)


def _copy_tensor(
    archive: zipfile.ZipFile, prefix: str, ref: _TensorRef, cast_to: Optional[str], out: BinaryIO,
    digest: hashlib._Hash,
) -> None:
    member = f"{prefix}data/{ref.storage.key}"
    begin = ref.offset * ref.storage.itemsize
    if begin + ref.nbytes > archive.getinfo(member).file_size:
        raise ConversionError(f"a tensor reaches past the end of its storage {member}")
    cast = _written(ref, cast_to)[2]
    with archive.open(member) as f:
        f.seek(begin)
        left = ref.nbytes
        while left:
            want = min(left, _COPY_CHUNK)
            chunk = f.read(want)
            if len(chunk) != want:
                raise ConversionError(f"storage {member} ended early")
            if cast is not None:
                with np.errstate(over="ignore"):  # overflow to infinity is the cast asked for, as in torch
                    chunk = np.frombuffer(chunk, dtype=cast[0]).astype(cast[1]).tobytes()
            _write(out, digest, chunk)
            left -= want
