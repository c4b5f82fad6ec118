"""The weights lock itself, and the models-folder check the worker runs at start."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict

import pytest

from conftest import ROOT, SHARED
from latentsync_fixtures import fixture_dirs
from musetalk_worker.weights import HFSource, LockError, URLSource, load_lock, present_components, verify_models

WEIGHTS_DOC = SHARED / "docs" / "weights.md"
LATENTSYNC_DOC = SHARED / "docs" / "latentsync.md"
LATENTSYNC = ("latentsync-1.6", "latentsync-1.5")
UPSTREAM_RAW = "https://raw.githubusercontent.com/bytedance/LatentSync"

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
# What the LatentSync engine loads from a version's folder: the layout of a LatentSync model folder.
LATENTSYNC_FILES = [
    "latentsync_unet.pt",
    "whisper/tiny.pt",
    "sd-vae-ft-mse/config.json",
    "sd-vae-ft-mse/diffusion_pytorch_model.safetensors",
    "mask.png",
]


def test_every_entry_has_a_pinned_source_a_sha256_and_a_size():
    lock = load_lock()
    files = lock.all_files()
    assert len(files) == 18 + 2 * len(LATENTSYNC_FILES)
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


def test_each_latentsync_version_is_an_optional_self_contained_folder():
    lock = load_lock()
    assert not set(LATENTSYNC) & set(lock.default_components)  # 5 GB each: only on request
    for name in LATENTSYNC:
        assert [f.path for f in lock.components[name].files] == [f"{name}/{rel}" for rel in LATENTSYNC_FILES]
        (unet,) = [f for f in lock.components[name].files if f.converted_path]
        assert (unet.converted_path, unet.converted_dtype) == (f"{name}/latentsync_unet.safetensors", "F16")


@pytest.mark.parametrize("folder", fixture_dirs(), ids=lambda folder: folder.name)
def test_the_latentsync_layout_is_that_of_the_parity_fixtures(folder):
    """The engine's parity tests read a fixture's models folder; the image's folders have the same files."""
    models = folder / "models"
    fixture = {p.relative_to(models).as_posix() for p in models.rglob("*") if p.is_file()}
    # The fixture's configs describe its tiny architecture; the engine has the real ones built in.
    assert {rel for rel in fixture if not rel.startswith("configs/")} == set(LATENTSYNC_FILES)


def test_files_shared_between_models_are_the_same_locked_bytes():
    """The VAE, Whisper tiny and the mask are one file each, whatever the folder (fetched once, then linked)."""
    by_path = {f.path: f for f in load_lock().all_files()}
    for name in LATENTSYNC:
        for rel in ("config.json", "diffusion_pytorch_model.safetensors"):
            ours, musetalk = by_path[f"{name}/sd-vae-ft-mse/{rel}"], by_path[f"sd-vae/{rel}"]
            assert (ours.size, ours.sha256, ours.source) == (musetalk.size, musetalk.sha256, musetalk.source)
        for rel in ("whisper/tiny.pt", "mask.png"):
            ours, other = by_path[f"{name}/{rel}"], by_path[f"latentsync-1.6/{rel}"]
            assert (ours.size, ours.sha256) == (other.size, other.sha256)
    assert by_path["latentsync-1.6/latentsync_unet.pt"].sha256 != by_path["latentsync-1.5/latentsync_unet.pt"].sha256


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
    # weights.md lists MuseTalk's files; LatentSync's are in latentsync.md (the next test); SyncNet v2's size and
    # SHA-256 come from issue 13 and latentsync.md's auxiliary row (weights.md lists only LatentSync's SyncNet).
    lock_files = {f.path: f for f in load_lock().all_files()
                  if f.component not in LATENTSYNC and f.component != "syncnet_v2"}
    assert set(rows) == set(lock_files)
    for path, row in rows.items():
        f = lock_files[path]
        assert (f.size, f.sha256) == (row["size"], row["sha256"]), path
        if isinstance(f.source, HFSource):
            assert (f.source.repo, f.source.revision) == row["source"], path
        else:
            assert f.source.url == row["source"], path


def _latentsync_doc() -> tuple:
    """From ../shared/docs/latentsync.md: the §1.2 table (first cell -> source cell, bytes, sha256), the full
    Hub revisions of §1.1 (repo -> commit) and the upstream code commit of the header."""
    text = LATENTSYNC_DOC.read_text()
    section = text[text.index("### 1.2 Weight files"):text.index("### 1.3")]
    rows: Dict[str, tuple] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and re.fullmatch(r"[\d,]+", cells[2]) and re.fullmatch(r"`[0-9a-f]{64}`", cells[3]):
            rows[cells[0]] = (cells[1], int(cells[2].replace(",", "")), cells[3].strip("`"))
    revisions = dict(re.findall(r"`(ByteDance/LatentSync-1\.[56])`, pinned by others at rev `([0-9a-f]{40})`", text))
    upstream = re.search(r"HEAD `([0-9a-f]{40})`", text)[1]
    return rows, revisions, upstream


def test_the_latentsync_entries_match_the_latentsync_document():
    if not LATENTSYNC_DOC.is_file():
        pytest.skip(f"{LATENTSYNC_DOC} not found")
    rows, revisions, upstream = _latentsync_doc()
    vae_repo, vae_revision = re.fullmatch(r"`([^`]+)` @ `([0-9a-f]{40})`", rows["VAE `config.json`"][0]).groups()
    by_path = {f.path: f for f in load_lock().all_files()}
    for name in LATENTSYNC:
        version = name.removeprefix("latentsync-")
        repo = f"ByteDance/LatentSync-{version}"
        expected = {  # file in the folder -> (its row's first cell, the source the lock must name)
            "latentsync_unet.pt": (f"`latentsync_unet.pt` **({version})**", (repo, revisions[repo])),
            "whisper/tiny.pt": ("`whisper/tiny.pt` (same in 1.5 and 1.6)", (repo, revisions[repo])),
            "sd-vae-ft-mse/config.json": ("VAE `config.json`", (vae_repo, vae_revision)),
            "sd-vae-ft-mse/diffusion_pytorch_model.safetensors":
                ("VAE `diffusion_pytorch_model.safetensors`", (vae_repo, vae_revision)),
            "mask.png": ("`LS/latentsync/utils/mask.png`", f"{UPSTREAM_RAW}/{upstream}/latentsync/utils/mask.png"),
        }
        assert set(expected) == set(LATENTSYNC_FILES)
        for rel, (row, source) in expected.items():
            f = by_path[f"{name}/{rel}"]
            assert (f.size, f.sha256) == rows[row][1:], f.path
            if isinstance(f.source, HFSource):
                assert (f.source.repo, f.source.revision) == source, f.path
                # The row names the repo (or "both repos" / "same" for the row above); §1.1 the full commit.
                assert rows[row][0] in ("both repos", "same") or rows[row][0].startswith(f"`{source[0]}` @ `"), f.path
            else:
                assert f.source.url == source, f.path


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
        (lambda lock: _first(lock).update(converted_dtype="F8"), r"\"converted_dtype\" .* one of F16"),
        (lambda lock: lock["components"]["v1"]["files"][1].update(size=749),
         r"has the SHA-256 of musetalkV15/musetalk.json but 749 bytes instead of 748"),
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


def test_present_components_names_the_optional_models_a_folder_holds(tmp_path):
    models = tmp_path / "models"
    assert present_components(models, components=LATENTSYNC) == ()
    mask = models / "latentsync-1.5" / "mask.png"
    mask.parent.mkdir(parents=True)
    mask.write_bytes(b"\x89PNG")
    assert present_components(models, components=LATENTSYNC) == ("latentsync-1.5",)
    # Present means checked: the half-filled folder is reported, naming what it lacks.
    report = verify_models(models, components=present_components(models, components=LATENTSYNC))
    assert {p.path for p in report.missing} == {f"latentsync-1.5/{r}" for r in LATENTSYNC_FILES if r != "mask.png"}
    assert [(p.kind, p.path) for p in report.wrong] == [("size", "latentsync-1.5/mask.png")]
    # The converted UNet alone (the image drops the .pt) counts as the model being there.
    converted = models / "latentsync-1.6" / "latentsync_unet.safetensors"
    converted.parent.mkdir()
    converted.write_bytes(b"{}")
    assert present_components(models, components=LATENTSYNC) == LATENTSYNC
    with pytest.raises(LockError, match=r"unknown component\(s\) latentsync-1.0"):
        present_components(models, components=["latentsync-1.0"])


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
