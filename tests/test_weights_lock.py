"""The weights lock itself, and the models-folder check the worker runs at start."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict

import pytest

from conftest import ROOT, SHARED
from musetalk_worker.weights import HFSource, LockError, URLSource, load_lock, verify_models

WEIGHTS_DOC = SHARED / "docs" / "weights.md"

# Every file the engine loads, by version (the models folder layout).
ENGINE_FILES = {
    "v15": ["musetalkV15/unet.pth", "musetalkV15/musetalk.json"],
    "v1": ["musetalk/pytorch_model.bin", "musetalk/musetalk.json"],
    "shared": [
        "sd-vae/config.json",
        "sd-vae/diffusion_pytorch_model.safetensors",
        "whisper/config.json",
        "whisper/model.safetensors",
        "whisper/preprocessor_config.json",
        "dwpose/dw-ll_ucoco_384.pth",
        "face-parse-bisent/79999_iter.pth",
        "face-parse-bisent/resnet18-5c106cde.pth",
        "s3fd/s3fd-619a316812.pth",
    ],
}
ISSUE_COMPONENTS = {"v15", "v1", "vae", "whisper", "dwpose", "s3fd", "face_parsing", "syncnet", "gfpgan"}


def test_every_entry_has_a_pinned_source_a_sha256_and_a_size():
    lock = load_lock()
    files = lock.all_files()
    assert len(files) == 17
    for f in files:
        assert re.fullmatch(r"[0-9a-f]{64}", f.sha256), f.path
        assert isinstance(f.size, int) and f.size > 0, f.path
        if isinstance(f.source, HFSource):
            assert re.fullmatch(r"[0-9a-f]{40}", f.source.revision), f.path
            assert f.source.repo.count("/") == 1 and f.source.path, f.path
        else:
            assert isinstance(f.source, URLSource) and f.source.url.startswith("https://"), f.path


def test_components_cover_every_file_the_engine_loads():
    lock = load_lock()
    assert ISSUE_COMPONENTS.issubset(lock.components)
    everything = {f.path for f in lock.all_files()}
    for version_files in ENGINE_FILES.values():
        assert set(version_files) <= everything
    default = {f.path for f in lock.select(None)}
    assert set(ENGINE_FILES["v15"] + ENGINE_FILES["shared"]) <= default
    v1 = {f.path for f in lock.select(["v1"])}
    assert set(ENGINE_FILES["v1"]) == v1


def _doc_rows() -> Dict[str, dict]:
    """The table of ../shared/docs/weights.md: file -> source, size, sha256 (with "same ..." resolved)."""
    rows: Dict[str, dict] = {}
    by_number: Dict[str, dict] = {}
    hf = None
    for line in WEIGHTS_DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        number, file_cell, source_cell, size_cell, sha_cell = cells
        path = re.search(r"`([^`]+)`", file_cell)[1]
        pinned = re.search(r"HF (?:mirror )?`([^`]+)` @ `([0-9a-f]{40})`", source_cell)
        url = re.search(r"`(https://[^`]+)`", source_cell)
        if pinned:
            hf = (pinned[1], pinned[2])
            source = hf
        elif url:
            source = url[1]
        else:
            assert source_cell.startswith("same"), source_cell
            source = hf
        sha = re.search(r"[0-9a-f]{64}", sha_cell)
        if sha is None:
            sha_ref = by_number[re.search(r"#(\d+)", sha_cell)[1]]["sha256"]
        row = {"source": source, "size": int(size_cell), "sha256": sha[0] if sha else sha_ref}
        rows[path] = by_number[number] = row
    return rows


def test_the_lock_matches_the_weights_document():
    if not WEIGHTS_DOC.is_file():
        pytest.skip(f"{WEIGHTS_DOC} not found")
    rows = _doc_rows()
    lock_files = {f.path: f for f in load_lock().all_files()}
    assert set(rows) == set(lock_files)
    for path, row in rows.items():
        f = lock_files[path]
        assert (f.size, f.sha256) == (row["size"], row["sha256"]), path
        if isinstance(f.source, HFSource):
            assert (f.source.repo, f.source.revision) == row["source"], path
        else:
            assert f.source.url == row["source"], path


def _write(tmp_path: Path, mutate) -> Path:
    lock = json.loads((ROOT / "weights.lock.json").read_text())
    mutate(lock)
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(lock))
    return path


def _first(lock: dict) -> dict:
    return lock["components"]["v15"]["files"][0]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda lock: _first(lock)["source"].update(revision="main"), r"pinned to a 40-hex commit"),
        (lambda lock: _first(lock).update(sha256="7ebf6c98"), r"\"sha256\" must be 64 lowercase hex"),
        (lambda lock: _first(lock).update(size=0), r"\"size\" must be a positive integer"),
        (lambda lock: _first(lock).update(path="../unet.pth"), r"\"path\" must be a relative path"),
        (lambda lock: _first(lock).pop("source"), r"\"source\" must be an object"),
        (lambda lock: lock["components"]["v1"]["files"].append(_first(lock)), r"already claimed by component 'v15'"),
        (lambda lock: lock["default_components"].append("v2"), r"unknown component\(s\) v2"),
    ],
)
def test_a_broken_lock_is_refused_with_a_message_naming_the_field(tmp_path, mutate, message):
    with pytest.raises(LockError, match=message):
        load_lock(_write(tmp_path, mutate))


def _fixture_lock(tmp_path: Path, models: Path) -> Path:
    """A lock of two fixture components, with the SHA-256 that parity.json records."""
    recorded = json.loads((models.parent / "parity.json").read_text())["files"]

    def component(folder: str) -> dict:
        files = sorted(p.relative_to(models).as_posix() for p in (models / folder).iterdir())
        return {"files": [
            {"path": rel, "size": (models / rel).stat().st_size, "sha256": recorded[f"models/{rel}"],
             "source": {"type": "url", "url": f"https://example.invalid/{rel}"}}
            for rel in files
        ]}

    lock = {"format": 1, "default_components": ["vae", "v15"],
            "components": {"vae": component("sd-vae"), "v15": component("musetalkV15")}}
    path = tmp_path / "lock.json"
    path.write_text(json.dumps(lock))
    return path


def test_verify_models_checks_sizes_always_and_hashes_when_asked(tmp_path, fixture_models):
    lock = _fixture_lock(tmp_path, fixture_models)
    assert verify_models(fixture_models, lock, check_hashes=True).ok

    models = tmp_path / "models"
    shutil.copytree(fixture_models / "sd-vae", models / "sd-vae")
    shutil.copytree(fixture_models / "musetalkV15", models / "musetalkV15")
    (models / "musetalkV15" / "musetalk.json").unlink()
    config = models / "sd-vae" / "config.json"
    config.write_bytes(config.read_bytes().replace(b"{", b"[", 1))  # same size, other bytes

    quick = verify_models(models, lock)
    assert [(p.kind, p.path) for p in quick.problems] == [("missing", "musetalkV15/musetalk.json")]
    assert quick.broken_components == ("v15",)

    thorough = verify_models(models, lock, check_hashes=True)
    assert [(p.kind, p.path) for p in thorough.problems] == [
        ("hash", "sd-vae/config.json"), ("missing", "musetalkV15/musetalk.json")]
    message = thorough.describe()
    assert "1 missing, 1 wrong" in message and "--components vae,v15" in message

    only_vae = verify_models(models, lock, components=["vae"])
    assert only_vae.ok and only_vae.checked == 2


def test_verify_models_uses_the_project_lock_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    report = verify_models(tmp_path / "no-models")
    assert report.lock_path == ROOT / "weights.lock.json"
    assert not report.ok
    assert {p.path for p in report.missing} == {f.path for f in load_lock().select(None)}
    assert "s3fd/s3fd-619a316812.pth" in report.describe()


def test_the_worker_check_is_standard_library_only():
    """weights.py, loaded on its own, pulls in no third-party module (the worker runs it before torch)."""
    import subprocess
    import sys

    code = (
        "import importlib.util, sys; before = set(sys.modules); "
        f"spec = importlib.util.spec_from_file_location('weights', {str(ROOT / 'musetalk_worker' / 'weights.py')!r}); "
        "module = importlib.util.module_from_spec(spec); sys.modules['weights'] = module; "
        "spec.loader.exec_module(module); "
        "new = {m.split('.')[0] for m in set(sys.modules) - before} - {'weights'}; "
        "print(sorted(m for m in new if m not in sys.stdlib_module_names))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
