"""The avatar cache: saved stores, corruption, LRU bound, and reuse by the pipeline."""

from __future__ import annotations

import os
import subprocess
import time

import numpy as np
import pytest
import torch

from musetalk_worker import MuseTalkOptions
from musetalk_worker.avatar_cache import ENGINE_FILE, SECRET_FILE, AvatarCache, OtherEngineEntry
from musetalk_worker.engines.musetalk.masks import BlendMask
from musetalk_worker.engines.musetalk.pipeline import MuseTalkPipeline
from musetalk_worker.engines.musetalk.store import DATA_FILE, CorruptStoreError, SourceStore


def _store_with_frames(folder, count: int, seed: int = 0) -> SourceStore:
    rng = np.random.default_rng(seed)
    store = SourceStore(folder, 40, 30)
    for i in range(count):
        frame = rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)
        if i % 2:
            store.add(frame)
        else:
            mask = BlendMask((2, 3, 12, 20), rng.integers(0, 255, (17, 10), dtype=np.uint8))
            # Frame 2's box was given, not detected: it has no alignment points.
            points = None if i == 2 else rng.uniform(0, 30, (5, 2))
            store.add(frame, mask, torch.from_numpy(rng.standard_normal((8, 32, 32)).astype(np.float32)), points)
    return store


def test_a_saved_store_reopens_identically(tmp_path):
    store = _store_with_frames(tmp_path, 5)
    store.save_index()
    reopened = SourceStore.open(tmp_path)
    assert len(reopened) == 5 and reopened.faces == 3
    for i in range(5):
        np.testing.assert_array_equal(reopened.frame(i), store.frame(i))
        assert reopened.box(i) == store.box(i)
        if store.box(i) is not None:
            assert torch.equal(reopened.latent(i), store.latent(i))
            np.testing.assert_array_equal(reopened.mask(i).alpha, store.mask(i).alpha)
        if store.points(i) is None:
            assert reopened.points(i) is None
        else:  # exactly: the restored face is aligned the same on a cache hit
            np.testing.assert_array_equal(reopened.points(i), store.points(i))
    assert [store.points(i) is None for i in range(5)] == [False, True, True, True, False]


@pytest.mark.parametrize("damage", ["flip_a_byte", "truncate"])
def test_a_damaged_store_is_refused(tmp_path, damage):
    store = _store_with_frames(tmp_path, 3)
    store.save_index()
    store.close(delete=False)
    data = tmp_path / DATA_FILE
    raw = bytearray(data.read_bytes())
    if damage == "flip_a_byte":
        raw[len(raw) // 2] ^= 0xFF
    else:
        raw = raw[:-100]
    data.write_bytes(bytes(raw))
    with pytest.raises(CorruptStoreError):
        SourceStore.open(tmp_path)


def _key(n: int) -> str:
    """An entry name of the form the cache makes (40 hex digits)."""
    return f"{n:040x}"


def test_the_cache_evicts_least_recently_used_entries(tmp_path):
    entry_bytes = None
    cache = AvatarCache(tmp_path / "cache", max_bytes=1)  # bound set below, once an entry's size is known
    keys = []
    for n in range(3):
        keys.append(_key(n))
        with cache.making(keys[-1], "musetalk") as folder:
            store = _store_with_frames(folder, 4, seed=n)
            store.save_index()
            store.close(delete=False)
            entry_bytes = entry_bytes or sum(f.stat().st_size for f in folder.iterdir())
            cache.max_bytes = 2 * entry_bytes + 10
            if n == 1:
                # Use entry 0 again, so entry 1 is now the least recently used.
                time.sleep(0.01)
                assert cache.open(keys[0], SourceStore.open) is not None
                time.sleep(0.01)
    present = sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir())
    assert present == [keys[0], keys[2]]


def test_a_corrupted_entry_is_a_miss_and_removed(tmp_path):
    cache = AvatarCache(tmp_path, max_bytes=10**9)
    with cache.making(_key(7), "musetalk") as folder:
        store = _store_with_frames(folder, 2)
        store.save_index()
        store.close(delete=False)
    with open(tmp_path / _key(7) / DATA_FILE, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    assert cache.open(_key(7), SourceStore.open) is None
    assert not (tmp_path / _key(7)).exists()


def test_an_entry_made_in_a_failing_block_is_not_kept_and_ids_keep_to_their_engine(tmp_path):
    cache = AvatarCache(tmp_path, max_bytes=10**9)
    with pytest.raises(RuntimeError, match="preparation failed"), cache.making(_key(1), "latentsync") as folder:
        (folder / "frames.bin").write_bytes(b"half")
        raise RuntimeError("preparation failed")
    assert [p.name for p in tmp_path.iterdir() if p.name != SECRET_FILE] == []

    with cache.making(_key(2), "latentsync") as folder:
        (folder / "frames.bin").write_bytes(b"done")
    with cache.making(_key(3), "musetalk") as folder:
        store = _store_with_frames(folder, 2)
        store.save_index()
        store.close(delete=False)
    (tmp_path / _key(3) / ENGINE_FILE).unlink()  # as entries made before there were two engines
    with pytest.raises(OtherEngineEntry) as other:
        cache.open(_key(2), SourceStore.open)
    assert other.value.engine == "latentsync"
    with pytest.raises(OtherEngineEntry) as unmarked:
        cache.open(_key(3), SourceStore.open, engine="latentsync")
    assert unmarked.value.engine == "musetalk"
    # Refused, not read: neither entry is taken for a corrupted one and removed.
    assert (tmp_path / _key(2) / "frames.bin").read_bytes() == b"done"
    opened = cache.open(_key(3), SourceStore.open)
    assert opened is not None and len(opened) == 2
    opened.close(delete=False)


def _frames(path) -> bytes:
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"],
                          capture_output=True, check=True).stdout


def test_the_pipeline_reuses_a_cached_avatar(fixture_models, media_dir, tmp_path):
    source, audio = tmp_path / "avatar.mp4", tmp_path / "speech.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(media_dir / "yongen.mp4"), "-t", "0.32", "-c:v", "libx264",
                    str(source)], check=True)
    subprocess.run(["ffmpeg", "-v", "error", "-i", str(media_dir / "eng.wav"), "-t", "0.4", str(audio)], check=True)
    cache_dir = tmp_path / "cache"
    pipe = MuseTalkPipeline.from_models(fixture_models, device="cpu", landmarks="dlib", cache_dir=cache_dir)

    first = pipe(source, audio, tmp_path / "1.mp4", MuseTalkOptions())
    assert first.cache_hit is False and {"faces", "latents", "masks"} <= set(first.timings)
    (entry,) = [p for p in cache_dir.iterdir() if p.is_dir()]
    second = pipe(source, audio, tmp_path / "2.mp4", MuseTalkOptions())
    assert second.cache_hit is True
    assert not {"faces", "latents", "masks"} & set(second.timings), "a hit skips the preparation stages"
    assert _frames(tmp_path / "1.mp4") == _frames(tmp_path / "2.mp4")

    other = pipe(source, audio, tmp_path / "3.mp4", MuseTalkOptions(parsing_mode="raw"))
    assert other.cache_hit is False, "options that change the masks make a new entry"

    with open(entry / DATA_FILE, "r+b") as f:
        f.seek(os.path.getsize(entry / DATA_FILE) // 2)
        f.write(b"\xff" * 16)
    again = pipe(source, audio, tmp_path / "4.mp4", MuseTalkOptions())
    assert again.cache_hit is False, "a corrupted entry is prepared again"
    assert _frames(tmp_path / "4.mp4") == _frames(tmp_path / "1.mp4")
    assert not [p for p in cache_dir.iterdir() if p.name.startswith(".incoming")]
