"""Avatar cache: the per-source-frame work of a face video, kept for the next job.

Preparing a source (for MuseTalk: face boxes, latents, blend masks of every
frame) costs more than generating from it. Jobs that reuse an avatar (the same
face video with new speech) skip that work: an engine's finished per-source
folder is saved under a key made of the source's SHA-256 and every option that
changes the prepared data. The cache knows folders only; what is in them, and
how to read it back, is the engine's. The folder may be a RunPod network volume shared by workers.

Both engines keep their entries in the one folder; each entry names the
engine that made it (``engine`` file; none: MuseTalk, which came first), so an
id given to the other model is refused by name, never read as a broken entry.

The key is also the avatar's id, which a later job may give instead of the
source. It is an HMAC of that description under a random secret kept in the
cache folder, so nobody can compute or guess an id without having been told
it, not even from the source's bytes (160 bits).

- Entries are created in a temporary folder and renamed into place, so a
  reader never sees half an entry.
- Each entry's data carries a CRC-32 checked on every hit; a corrupted entry is
  deleted and prepared again.
- The total size is bounded: after each new entry the least recently used
  entries (by the time of their last hit) are evicted.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, TypeVar

from .errors import ErrorCode, LipSyncError
from .options import AVATAR_ID_PATTERN
from .weights import file_sha256

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".incoming-"
SECRET_FILE = ".secret"
ENGINE_FILE = "engine"
# Bump when what a store holds, or how it is computed, changes.
_KEY_VERSION = 3
_ID = re.compile(AVATAR_ID_PATTERN)
Entry = TypeVar("Entry")


class CorruptEntryError(Exception):
    """An entry's files do not check out (an engine's reader raises it, or a subclass)."""


class OtherEngineEntry(Exception):
    """The entry was made by another engine (its name in ``engine``); it is left as it is."""

    def __init__(self, engine: str):
        super().__init__(engine)
        self.engine = engine


class AvatarCache:
    """A folder of prepared sources, bounded to ``max_bytes`` with LRU eviction."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)
        self._secret = _shared_secret(self.root / SECRET_FILE)

    def key(self, source: Path, settings: Mapping[str, object]) -> str:
        """The entry name (and avatar id) for ``source`` prepared with ``settings`` (JSON-serialisable)."""
        described = json.dumps({"v": _KEY_VERSION, "source": file_sha256(source), **settings}, sort_keys=True)
        return hmac.new(self._secret, described.encode(), hashlib.sha256).hexdigest()[:40]

    def open(self, key: str, read: Callable[[Path], Entry], engine: str = "musetalk") -> Optional[Entry]:
        """``read(folder)`` of ``engine``'s entry ``key``, or None on a miss (or a malformed key).

        An entry ``read`` finds corrupted (:class:`CorruptEntryError`) is removed, a miss.

        Raises:
            OtherEngineEntry: ``key`` is an entry of another engine.
        """
        if not _ID.fullmatch(key):
            return None
        folder = self.root / key
        if not folder.is_dir():
            return None
        made_by = _engine_of(folder)
        if made_by != engine:
            raise OtherEngineEntry(made_by)
        try:
            entry = read(folder)
        except CorruptEntryError as error:
            logger.warning("avatar cache entry %s is corrupted and will be prepared again: %s", key, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        # The folder's time is its last use, for eviction.
        os.utime(folder)
        return entry

    @contextlib.contextmanager
    def making(self, key: str, engine: str) -> Iterator[Path]:
        """A fresh folder to prepare ``engine``'s entry ``key`` in: moved into place (:meth:`commit`) when the
        block ends without an error, removed when it raises."""
        folder = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.root))
        try:
            (folder / ENGINE_FILE).write_text(engine)
            yield folder
        except BaseException:
            self.discard(folder)
            raise
        self.commit(folder, key)

    def commit(self, folder: Path, key: str) -> Path:
        """Moves a prepared entry into place (keeping an existing one) and evicts to the size bound."""
        target = self.root / key
        try:
            os.rename(folder, target)
        except OSError:
            # Another job saved the same avatar first; theirs is as good as ours.
            shutil.rmtree(folder, ignore_errors=True)
        self._evict(keep=key)
        return target

    def discard(self, folder: Path) -> None:
        """Removes an entry that was not finished."""
        shutil.rmtree(folder, ignore_errors=True)

    def _evict(self, keep: str) -> None:
        entries = []
        for folder in self.root.iterdir():
            if folder.name.startswith(_TEMP_PREFIX) or not folder.is_dir():
                continue
            used = folder.stat().st_mtime
            size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            entries.append((used, size, folder))
        total = sum(size for _, size, _ in entries)
        for used, size, folder in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if folder.name == keep:
                continue
            shutil.rmtree(folder, ignore_errors=True)
            total -= size
            logger.info("avatar cache: evicted %s (last used %s)", folder.name, time.ctime(used))


def open_avatar(cache: Optional[AvatarCache], avatar_id: Optional[str], read: Callable[[Path], Entry],
                engine: str) -> Entry:
    """The prepared source a job names by ``avatar_id``, read by ``engine``'s ``read``.

    Raises:
        LipSyncError(invalid_input): no id, no cache, an id the cache does not
            hold, or an avatar of the other model.
    """
    if avatar_id is None:
        raise LipSyncError(ErrorCode.INVALID_INPUT, "give a 'source' (or the 'avatar_id' of a prepared one).",
                           stage="validate")
    if cache is None:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            "'avatar_id' needs an avatar cache, and this worker has none (MUSETALK_AVATAR_CACHE_DIR); "
            "send the 'source' instead.",
            stage="validate",
        )
    try:
        entry = cache.open(avatar_id, read, engine)
    except OtherEngineEntry as other:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'avatar_id' {avatar_id!r} was prepared by model '{other.engine}', not '{engine}': send it with "
            f"'model': '{other.engine}', or send the 'source' for model '{engine}'.",
            stage="validate",
        ) from None
    if entry is None:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'avatar_id' {avatar_id!r} is not in the avatar cache: it is unknown, or was evicted to keep the "
            "cache within its size. Send the 'source' again; the result carries its new avatar_id.",
            stage="validate",
        )
    return entry


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file, read in 16 MiB pieces (an entry's data check)."""
    crc = 0
    with open(path, "rb") as data:
        while chunk := data.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _engine_of(folder: Path) -> str:
    try:
        return (folder / ENGINE_FILE).read_text().strip() or "musetalk"
    except FileNotFoundError:
        return "musetalk"  # entries from before there were two engines


def _shared_secret(path: Path) -> bytes:
    """The cache's HMAC secret: read from ``path``, or made there once (safe when workers race)."""
    if not path.exists():
        draft = path.with_name(f"{path.name}.{secrets.token_hex(8)}")
        fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(secrets.token_hex(32))
        try:
            # A link fails if another worker made the secret first; theirs wins, so all agree.
            os.link(draft, path)
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    secret = bytes.fromhex(path.read_text().strip())
    if len(secret) < 32:
        raise ValueError(f"{path} holds no valid avatar cache secret; delete it (the cache's ids then change)")
    return secret
