"""The LatentSync parity fixtures: every ``ls-*`` folder under ``../shared/parity/latentsync`` and every folder
listed in ``LATENTSYNC_PARITY_FIXTURES`` (separated by ``os.pathsep``), with their cases.

Tests parametrize over :func:`fixture_cases` (ids ``<folder>-<case>``) and read arrays through
:class:`LatentSyncFixture`; nothing may assume a particular fixture.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest

from conftest import PARITY_ROOT

LATENTSYNC_ROOT = PARITY_ROOT / "latentsync"


def fixture_dirs() -> List[Path]:
    """Every LatentSync fixture folder: the shared ``ls-*`` ones, then those in ``LATENTSYNC_PARITY_FIXTURES``."""
    shared = sorted(p for p in LATENTSYNC_ROOT.glob("ls-*") if (p / "parity.json").is_file()) \
        if LATENTSYNC_ROOT.is_dir() else []
    extra = [Path(p) for p in os.environ.get("LATENTSYNC_PARITY_FIXTURES", "").split(os.pathsep) if p]
    return shared + extra


class LatentSyncFixture:
    """One fixture folder: its settings, its cases and its arrays (loaded once)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.settings: Dict[str, Any] = json.loads((self.folder / "parity.json").read_text())
        self.models = self.folder / "models"
        self._arrays = np.load(self.folder / "parity.npz")

    @property
    def cases(self) -> Dict[str, Dict[str, Any]]:
        """The runs of this fixture by name, each with its settings (seed, resolution, steps, guidance...)."""
        return self.settings["cases"]

    def input(self, name: str) -> np.ndarray:
        """A case-independent input array (``frames``, ``landmarks_106``, ``det_bboxes``...)."""
        return self._arrays[name]

    def array(self, case: str, name: str) -> np.ndarray:
        """The array ``name`` that upstream computed in ``case``."""
        return self._arrays[f"{case}__{name}"]

    def has(self, case: str, name: str) -> bool:
        """Whether ``case`` holds ``name`` (some arrays exist only in some cases, e.g. ``faces_src``)."""
        return f"{case}__{name}" in self._arrays.files


@functools.lru_cache(maxsize=None)
def load(folder: Path) -> LatentSyncFixture:
    """The fixture in ``folder``, loaded once per test session."""
    return LatentSyncFixture(folder)


def fixture_cases() -> List[Any]:
    """``pytest.param(folder, case)`` for every case of every fixture, with the id ``<folder>-<case>``;
    one skipped param when there is no fixture at all (so the reason shows)."""
    params = [
        pytest.param(folder, case, id=f"{folder.name}-{case}")
        for folder in fixture_dirs()
        for case in json.loads((folder / "parity.json").read_text())["cases"]
    ]
    return params or [pytest.param(None, None, marks=pytest.mark.skip(
        reason=f"no LatentSync parity fixture under {LATENTSYNC_ROOT} or in LATENTSYNC_PARITY_FIXTURES"))]
