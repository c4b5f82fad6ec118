"""The device choice (CUDA, then Apple's MPS, then the CPU) and the MPS fallback setting, tested on Linux.

No Apple hardware here: MPS's availability is faked, and the fallback is
checked to be in the environment before torch is imported by the commands.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from musetalk_worker.device import MPS_FALLBACK_ENV, resolve_device
from musetalk_worker.errors import LipSyncError


@pytest.mark.parametrize("cuda, mps, expected", [
    (True, True, "cuda"), (False, True, "mps"), (False, False, "cpu"),
])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto").type == expected


def test_mps_can_be_asked_for_and_is_refused_where_absent(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("mps").type == "mps"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(LipSyncError, match="'mps' was asked for but Apple's MPS is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("module", ["musetalk_worker.__main__", "musetalk_worker.serve.__main__"])
def test_commands_set_the_mps_fallback_before_torch_loads(module):
    check = (f"import sys, os, {module}; "
             f"assert 'torch' not in sys.modules, 'torch was imported'; "
             f"print(os.environ['{MPS_FALLBACK_ENV}'])")
    env = {k: v for k, v in os.environ.items() if k != MPS_FALLBACK_ENV}
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "1", out.stderr[-2000:]
    # A user's own choice stands.
    env[MPS_FALLBACK_ENV] = "0"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "0", out.stderr[-2000:]
