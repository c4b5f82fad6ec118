"""Avatar cache: the per-source-frame work of a face video, kept for the next job.

Preparing a source (face boxes, latents, blend masks of every frame) costs more
than generating from it. Jobs that reuse an avatar (the same face video with
new speech) skip that work: a finished :class:`~musetalk_worker.store.SourceStore`
is saved under a key made of the source's SHA-256 and every option that changes
the prepared data. The folder may be a RunPod network volume shared by workers.

- Entries are created in a temporary folder and renamed into place, so a
  reader never sees half an entry.
- Each entry's data carries a CRC-32 checked on every hit; a corrupted entry is
  deleted and prepared again.
- The total size is bounded: after each new entry the least recently used
  entries (by the time of their last hit) are evicted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional

from .store import INDEX_FILE, CorruptStoreError, SourceStore
from .weights import file_sha256

logger = logging.getLogger(__name__)

_TEMP_PREFIX = ".incoming-"
# Bump when what a store holds, or how it is computed, changes.
_KEY_VERSION = 1


class AvatarCache:
    """A folder of prepared sources, bounded to ``max_bytes`` with LRU eviction."""

    def __init__(self, root: Path, max_bytes: int):
        self.root = Path(root)
        self.max_bytes = int(max_bytes)
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, source: Path, settings: Mapping[str, object]) -> str:
        """The entry name for ``source`` prepared with ``settings`` (JSON-serialisable)."""
        described = json.dumps({"v": _KEY_VERSION, "source": file_sha256(source), **settings}, sort_keys=True)
        return hashlib.sha256(described.encode()).hexdigest()[:40]

    def open(self, key: str) -> Optional[SourceStore]:
        """The saved store for ``key``, or None on a miss; a corrupted entry is removed."""
        folder = self.root / key
        if not (folder / INDEX_FILE).exists():
            return None
        try:
            store = SourceStore.open(folder)
        except CorruptStoreError as error:
            logger.warning("avatar cache entry %s is corrupted and will be prepared again: %s", key, error)
            shutil.rmtree(folder, ignore_errors=True)
            return None
        os.utime(folder / INDEX_FILE)
        return store

    def new_entry(self) -> Path:
        """A fresh temporary folder to prepare an entry in."""
        return Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.root))

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
            index = folder / INDEX_FILE
            used = index.stat().st_mtime if index.exists() else 0.0
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
