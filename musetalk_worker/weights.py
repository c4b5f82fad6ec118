"""The weights lock: which model files exist, where they come from, and their exact bytes.

``weights.lock.json`` (at the project root) lists every weight file by its path
in the models folder, with a pinned source, a byte size and a SHA-256, grouped
into components (``v15``, ``vae``, ``s3fd``, ...). This module reads the lock
and checks a models folder against it; the build-time downloader
(``builder.fetch_weights``) and the worker's start-up check both use it.

Standard library only, and nothing else from this package is imported: the
worker runs the check before torch is loaded, and the image's weights stage
runs it with this one file copied alone.

A lock entry may name a ``converted_path``: a safetensors copy of the file that
the downloader can make (``--convert-unet``), with its floating-point tensors
cast to ``converted_dtype`` when the entry names one. The conversion is
recorded, with its own size and hash and the hash of the file it came from, in
``weights.converted.json`` in the models folder. A recorded, matching
conversion stands in for its source file; an unrecorded one is an error,
because the engine prefers it to the source.

Entries at different paths may hold the same bytes (the VAE that MuseTalk and
each LatentSync folder use): they must then agree on the size, and the
downloader fetches the bytes once and hard-links the other paths.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Literal, Optional, Sequence, Tuple, Union

LOCK_FILE = Path(__file__).resolve().parents[1] / "weights.lock.json"
CONVERSIONS_FILE = "weights.converted.json"
LOCK_FORMAT = 1
# The dtypes a conversion may cast floating-point tensors to (safetensors names).
CONVERTED_DTYPES = ("F16",)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_HASH_CHUNK = 8 << 20


class LockError(ValueError):
    """The lock file is unreadable or breaks its schema, or a request names what it lacks."""


@dataclasses.dataclass(frozen=True)
class HFSource:
    """A file in a Hugging Face repository at a pinned commit."""

    repo: str
    revision: str
    path: str
    repo_type: str = "model"

    def describe(self) -> str:
        """Where the file comes from, in words."""
        return f"hf://{self.repo}@{self.revision}/{self.path}"


@dataclasses.dataclass(frozen=True)
class URLSource:
    """A file at a plain HTTP(S) address."""

    url: str

    def describe(self) -> str:
        """Where the file comes from, in words."""
        return self.url


Source = Union[HFSource, URLSource]


@dataclasses.dataclass(frozen=True)
class WeightFile:
    """One file of the lock.

    Attributes:
        path: where it lives, relative to the models folder (POSIX separators).
        size: its size in bytes.
        sha256: its SHA-256, 64 lowercase hex digits.
        source: where the downloader gets it.
        component: the component it belongs to.
        converted_path: where a safetensors conversion of it goes, if it can be converted.
        converted_dtype: the dtype the conversion casts float32 tensors to; None keeps every dtype.
        note: anything a reader of the lock should know about this entry.
    """

    path: str
    size: int
    sha256: str
    source: Source
    component: str
    converted_path: Optional[str] = None
    converted_dtype: Optional[str] = None
    note: str = ""


@dataclasses.dataclass(frozen=True)
class Component:
    """A named group of files that are used together (one model)."""

    name: str
    description: str
    files: Tuple[WeightFile, ...]


@dataclasses.dataclass(frozen=True)
class WeightsLock:
    """The parsed lock: its components and the default set the image holds."""

    path: Path
    components: Dict[str, Component]
    default_components: Tuple[str, ...]

    def select(self, names: Optional[Iterable[str]] = None) -> List[WeightFile]:
        """The files of the named components (the default set when ``names`` is None).

        Raises:
            LockError: a name is not a component of the lock.
        """
        chosen = self.default_components if names is None else tuple(names)
        unknown = [name for name in chosen if name not in self.components]
        if unknown:
            raise LockError(
                f"unknown component(s) {', '.join(unknown)} in {self.path}; "
                f"choose from {', '.join(self.components)}"
            )
        files: List[WeightFile] = []
        for name in dict.fromkeys(chosen):
            files.extend(self.components[name].files)
        return files

    def all_files(self) -> List[WeightFile]:
        """Every file of every component."""
        return [f for component in self.components.values() for f in component.files]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A file the downloader derived from a lock entry, as recorded in the models folder."""

    path: str
    size: int
    sha256: str
    source_path: str
    source_sha256: str


def load_lock(path: Union[str, Path, None] = None) -> WeightsLock:
    """Read and validate a lock file (the project's ``weights.lock.json`` by default).

    Raises:
        LockError: the file is missing, is not JSON, or breaks the schema; the
            message names the entry and the field.
    """
    lock_path = Path(path) if path is not None else LOCK_FILE
    try:
        raw = json.loads(lock_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LockError(f"weights lock {lock_path} not found; pass the path of weights.lock.json") from None
    except json.JSONDecodeError as e:
        raise LockError(f"weights lock {lock_path} is not valid JSON ({e}); fix the file") from None
    if not isinstance(raw, dict) or raw.get("format") != LOCK_FORMAT:
        raise LockError(f"weights lock {lock_path}: expected an object with \"format\": {LOCK_FORMAT}")
    raw_components = raw.get("components")
    if not isinstance(raw_components, dict) or not raw_components:
        raise LockError(f"weights lock {lock_path}: \"components\" must be a non-empty object")

    components: Dict[str, Component] = {}
    seen: Dict[str, str] = {}
    by_sha256: Dict[str, WeightFile] = {}
    for name, body in raw_components.items():
        where = f"{lock_path}: component {name!r}"
        if not isinstance(body, dict) or not isinstance(body.get("files"), list) or not body["files"]:
            raise LockError(f"{where} needs a non-empty \"files\" list")
        files = tuple(_parse_file(entry, name, f"{where} file #{i + 1}") for i, entry in enumerate(body["files"]))
        for f in files:
            for claimed in filter(None, (f.path, f.converted_path)):
                if claimed in seen:
                    raise LockError(f"{where}: {claimed} is already claimed by component {seen[claimed]!r}")
                seen[claimed] = name
            twin = by_sha256.setdefault(f.sha256, f)
            if twin.size != f.size:
                raise LockError(
                    f"{where}: {f.path} has the SHA-256 of {twin.path} but {f.size} bytes instead of {twin.size}; "
                    "one of the two entries is wrong"
                )
        components[name] = Component(name, str(body.get("description", "")), files)

    defaults = raw.get("default_components")
    if not isinstance(defaults, list) or not all(isinstance(d, str) for d in defaults):
        raise LockError(f"weights lock {lock_path}: \"default_components\" must be a list of component names")
    lock = WeightsLock(lock_path, components, tuple(defaults))
    lock.select(None)  # every default must exist
    return lock


def _parse_file(entry: object, component: str, where: str) -> WeightFile:
    if not isinstance(entry, dict):
        raise LockError(f"{where} must be an object")
    path = entry.get("path")
    if not _is_relative_posix(path):
        raise LockError(f"{where}: \"path\" must be a relative path inside the models folder, got {path!r}")
    where = f"{where} ({path})"
    size = entry.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise LockError(f"{where}: \"size\" must be a positive integer (bytes), got {size!r}")
    sha256 = entry.get("sha256")
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise LockError(f"{where}: \"sha256\" must be 64 lowercase hex digits, got {sha256!r}")
    converted = entry.get("converted_path")
    if converted is not None and not (_is_relative_posix(converted) and converted.endswith(".safetensors")):
        raise LockError(f"{where}: \"converted_path\" must be a relative path ending in .safetensors")
    converted_dtype = entry.get("converted_dtype")
    if converted_dtype is not None and (converted is None or converted_dtype not in CONVERTED_DTYPES):
        raise LockError(
            f"{where}: \"converted_dtype\" needs a \"converted_path\" and must be one of "
            f"{', '.join(CONVERTED_DTYPES)}, got {converted_dtype!r}"
        )
    return WeightFile(
        path=path,
        size=size,
        sha256=sha256,
        source=_parse_source(entry.get("source"), where),
        component=component,
        converted_path=converted,
        converted_dtype=converted_dtype,
        note=str(entry.get("note", "")),
    )


def _parse_source(source: object, where: str) -> Source:
    if not isinstance(source, dict):
        raise LockError(f"{where}: \"source\" must be an object with a \"type\" of hf or url")
    kind = source.get("type")
    if kind == "hf":
        repo, revision, path = source.get("repo"), source.get("revision"), source.get("path")
        if not isinstance(repo, str) or repo.count("/") != 1:
            raise LockError(f"{where}: hf source needs \"repo\" as owner/name, got {repo!r}")
        if not isinstance(revision, str) or not _COMMIT.fullmatch(revision):
            raise LockError(
                f"{where}: hf source needs \"revision\" pinned to a 40-hex commit (not a branch), got {revision!r}"
            )
        if not _is_relative_posix(path):
            raise LockError(f"{where}: hf source needs \"path\" inside the repository, got {path!r}")
        return HFSource(repo, revision, path, str(source.get("repo_type", "model")))
    if kind == "url":
        url = source.get("url")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise LockError(f"{where}: url source needs an http(s) \"url\", got {url!r}")
        return URLSource(url)
    raise LockError(f"{where}: source \"type\" must be hf or url, got {kind!r}")


def _is_relative_posix(path: object) -> bool:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path:
        return False
    return all(part not in ("", ".", "..") for part in path.split("/"))


def file_sha256(path: Union[str, Path]) -> str:
    """The SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def read_conversions(models_dir: Union[str, Path]) -> Dict[str, Conversion]:
    """The conversions recorded in a models folder, by converted path (empty if none)."""
    record = Path(models_dir) / CONVERSIONS_FILE
    try:
        raw = json.loads(record.read_text(encoding="utf-8"))
        return {path: Conversion(path=path, **fields) for path, fields in raw.items()}
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, TypeError, AttributeError) as e:
        raise LockError(
            f"{record} is unreadable ({e}); delete it and the converted files, then run the downloader again"
        ) from None


def record_conversion(models_dir: Union[str, Path], conversion: Conversion) -> None:
    """Add (or replace) one conversion in the models folder's record, atomically."""
    record = Path(models_dir) / CONVERSIONS_FILE
    conversions = {**read_conversions(models_dir), conversion.path: conversion}
    # Keyed by path, so the path is not repeated inside (read_conversions puts it back).
    entries = {path: {k: v for k, v in dataclasses.asdict(c).items() if k != "path"} for path, c in conversions.items()}
    tmp = record.with_name(record.name + ".tmp")
    tmp.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, record)


ProblemKind = Literal["missing", "size", "hash", "unrecorded"]


@dataclasses.dataclass(frozen=True)
class FileProblem:
    """What is wrong with one file of the models folder."""

    path: str
    component: str
    kind: ProblemKind
    detail: str

    def describe(self) -> str:
        """One line naming the file, its component and what is wrong."""
        return f"{self.kind:<10} {self.path} (component {self.component}): {self.detail}"


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The result of checking a models folder against the lock."""

    models_dir: Path
    lock_path: Path
    components: Tuple[str, ...]
    checked: int
    hashes_checked: bool
    problems: Tuple[FileProblem, ...]

    @property
    def ok(self) -> bool:
        """True when every file is present with the right size (and hash, if checked)."""
        return not self.problems

    @property
    def missing(self) -> Tuple[FileProblem, ...]:
        """The files that are absent."""
        return tuple(p for p in self.problems if p.kind == "missing")

    @property
    def wrong(self) -> Tuple[FileProblem, ...]:
        """The files that are present but are not the locked bytes."""
        return tuple(p for p in self.problems if p.kind != "missing")

    @property
    def broken_components(self) -> Tuple[str, ...]:
        """The components with at least one problem, in lock order."""
        return tuple(dict.fromkeys(p.component for p in self.problems))

    def describe(self) -> str:
        """A message for a log or an error: every problem, and what to do about it."""
        how = "size and SHA-256" if self.hashes_checked else "size"
        if self.ok:
            return (
                f"models folder {self.models_dir}: all {self.checked} files of "
                f"{', '.join(self.components)} match {self.lock_path.name} ({how} checked)"
            )
        lines = [
            f"models folder {self.models_dir} does not match {self.lock_path} ({how} checked): "
            f"{len(self.missing)} missing, {len(self.wrong)} wrong, in {', '.join(self.broken_components)}"
        ]
        lines += [f"  {p.describe()}" for p in self.problems]
        lines.append(
            "  Rebuild the image, or fetch the files with: python -m builder.fetch_weights "
            f"--lock {self.lock_path} --dest {self.models_dir} --components {','.join(self.broken_components)}"
        )
        return "\n".join(lines)


def _lock(lock: Union[str, Path, WeightsLock, None]) -> WeightsLock:
    """``lock`` itself when it was read already, else the lock file it names (read and validated)."""
    return lock if isinstance(lock, WeightsLock) else load_lock(lock)


def verify_models(
    models_dir: Union[str, Path],
    lock_path: Union[str, Path, WeightsLock, None] = None,
    components: Optional[Sequence[str]] = None,
    check_hashes: bool = False,
) -> VerifyReport:
    """Check a models folder against the lock.

    Args:
        models_dir: the models folder (the layout of the lock's paths).
        lock_path: the lock (its path, or the lock read already); the project's
            ``weights.lock.json`` when None.
        components: the components to check; the lock's default set when None.
        check_hashes: also hash every file (seconds per GB); sizes are always checked.

    Returns:
        A report listing every missing or wrong file; ``report.ok`` is True when
        there is none.

    Raises:
        LockError: the lock is unreadable or a component name is unknown.
    """
    lock = _lock(lock_path)
    files = lock.select(components)
    root = Path(models_dir)
    conversions = read_conversions(root)
    problems = [p for wf in files if (p := check_file(root, wf, conversions, check_hashes)) is not None]
    chosen = lock.default_components if components is None else tuple(components)
    return VerifyReport(root, lock.path, chosen, len(files), check_hashes, tuple(problems))


def present_components(
    models_dir: Union[str, Path],
    lock_path: Union[str, Path, WeightsLock, None] = None,
    components: Optional[Sequence[str]] = None,
) -> Tuple[str, ...]:
    """The components (of ``components``, or of the whole lock) with at least one file in the models folder.

    For optional models that an image may or may not hold (LatentSync 1.5 and
    1.6): the worker verifies those that are there, so a half-filled folder is
    an error at start while an absent one only means the model is not offered.
    A recorded conversion's file counts as its entry's.

    Raises:
        LockError: the lock is unreadable or a component name is unknown.
    """
    lock = _lock(lock_path)
    root = Path(models_dir)
    names = tuple(lock.components) if components is None else tuple(components)
    lock.select(names)  # unknown names are an error, not an absent model
    def holds(wf: WeightFile) -> bool:
        return any((root / rel).exists() for rel in filter(None, (wf.path, wf.converted_path)))

    return tuple(name for name in dict.fromkeys(names) if any(map(holds, lock.components[name].files)))


def check_file(
    models_dir: Path, wf: WeightFile, conversions: Dict[str, Conversion], check_hash: bool
) -> Optional[FileProblem]:
    """What is wrong with one lock entry in a models folder, or None if nothing.

    A recorded conversion of the entry that matches stands in for the entry's
    own file, which may then be absent.
    """
    if wf.converted_path is not None and (models_dir / wf.converted_path).exists():
        conversion = conversions.get(wf.converted_path)
        if conversion is None or conversion.source_sha256 != wf.sha256:
            return FileProblem(
                wf.converted_path,
                wf.component,
                "unrecorded",
                f"is not recorded in {CONVERSIONS_FILE} as a conversion of {wf.path} "
                f"(sha256 {wf.sha256}); the engine would load it instead of the locked file, so delete it "
                "or make it again with python -m builder.fetch_weights --convert-unet",
            )
        problem = _check_bytes(
            models_dir, conversion.path, conversion.size, conversion.sha256, wf.component, check_hash
        )
        if problem is not None or not (models_dir / wf.path).exists():
            return problem
    return _check_bytes(models_dir, wf.path, wf.size, wf.sha256, wf.component, check_hash)


def _check_bytes(
    models_dir: Path, rel: str, size: int, sha256: str, component: str, check_hash: bool
) -> Optional[FileProblem]:
    path = models_dir / rel
    if not path.is_file():
        return FileProblem(rel, component, "missing", f"expected {size} bytes, sha256 {sha256}")
    actual_size = path.stat().st_size
    if actual_size != size:
        return FileProblem(rel, component, "size", f"has {actual_size} bytes, expected {size}")
    if check_hash:
        actual = file_sha256(path)
        if actual != sha256:
            return FileProblem(rel, component, "hash", f"sha256 is {actual}, expected {sha256}")
    return None
