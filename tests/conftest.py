"""Shared test fixtures: where the shared media and parity fixtures are, ffprobe, and a probe spy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Loopback HTTP and S3 (moto_server) fixtures, shared by the worker's tests.
pytest_plugins = ["servers"]

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MEDIA = SHARED / "media"
PARITY_ROOT = SHARED / "parity"
FIXTURE_MODELS = PARITY_ROOT / "v15-yongen" / "models"

# Two cores are shared by everything in CI; one torch thread per test process keeps
# timings steady and avoids oversubscription.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def ffprobe(path: Path) -> dict:
    """ffprobe's JSON (streams + format) for a file, with frames counted."""
    out = subprocess.run(
        ["ffprobe", "-v", "error", "-count_frames", "-print_format", "json",
         "-show_format", "-show_streams", str(path)],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out)


@pytest.fixture(scope="session")
def media_dir() -> Path:
    if not MEDIA.is_dir():
        pytest.skip(f"shared media not found at {MEDIA}")
    return MEDIA


@pytest.fixture(scope="session")
def fixture_models() -> Path:
    """The parity fixture's small random-weight models (standard layout)."""
    if not FIXTURE_MODELS.is_dir():
        pytest.skip(f"parity fixture models not found at {FIXTURE_MODELS}")
    return FIXTURE_MODELS


@pytest.fixture
def probe_calls(monkeypatch) -> list:
    """The paths ``decode.probe`` is called with while the test runs (the real probe still runs).

    Every loaded ``musetalk_worker`` module that holds the real ``probe`` gets the spy, so a
    ``from .decode import probe`` anywhere is counted too.
    """
    from musetalk_worker import decode

    real, calls = decode.probe, []

    def spy(path):
        calls.append(Path(path))
        return real(path)

    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "musetalk_worker" and getattr(module, "probe", None) is real:
            monkeypatch.setattr(module, "probe", spy)
    return calls
