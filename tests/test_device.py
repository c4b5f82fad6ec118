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
from musetalk_worker import device as device_module
from musetalk_worker.device import (
    MPS_FALLBACK_ENV, fit_cpu_threads, half_dtype, resolve_device, usable_cpus, warm_up_pays,
)
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


def _cgroup(tmp_path, files):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 2),  # v2, 1.5 CPUs: rounded up
    ({"cpu.max": "100000 100000\n"}, 1),
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3),  # v1
])
def test_usable_cpus_follow_the_containers_quota(tmp_path, files, quota):
    """A container's CPU quota caps the CPUs counted (the cgroup files are real files written here)."""
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path, files)) == min(affinity, quota)


@pytest.mark.parametrize("files", [{"cpu.max": "max 100000\n"}, {"cpu/cpu.cfs_quota_us": "-1\n",
                                                                  "cpu/cpu.cfs_period_us": "100000\n"}, {}])
def test_without_a_quota_every_cpu_of_the_affinity_mask_counts(tmp_path, files):
    assert usable_cpus(_cgroup(tmp_path, files)) == len(os.sched_getaffinity(0))


def test_torch_threads_are_capped_at_the_quota_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    before = torch.get_num_threads()
    cgroup = _cgroup(tmp_path, {"cpu.max": "100000 100000\n"})
    try:
        torch.set_num_threads(2)
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert fit_cpu_threads(cgroup) == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert fit_cpu_threads(cgroup) == 1 == torch.get_num_threads()
        # Never raised above torch's own choice.
        assert fit_cpu_threads(_cgroup(tmp_path / "wide", {"cpu.max": "max 100000\n"})) == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("device, compiled, expected", [
    ("cpu", False, False), ("cpu", True, True), ("cuda", False, True), ("mps", False, True), ("cuda:1", True, True),
])
def test_a_warm_up_runs_where_a_first_call_pays_set_up(device, compiled, expected):
    # Device objects only: no GPU is needed to name one.
    assert warm_up_pays(torch.device(device), compiled) is expected


def test_a_jobs_fp16_is_the_deployments_half_dtype_on_a_gpu_and_bfloat16_on_a_capable_cpu(monkeypatch):
    # Device objects only: the rule, not a GPU, is under test.
    assert half_dtype(torch.device("cuda"), "float16") is torch.float16
    assert half_dtype(torch.device("mps"), "bfloat16") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: True)
    assert half_dtype(torch.device("cpu"), "float16") is torch.bfloat16
    monkeypatch.setattr(device_module, "cpu_has_native_bfloat16", lambda: False)
    with pytest.raises(LipSyncError, match="needs a CPU with it in hardware") as caught:
        half_dtype(torch.device("cpu"))
    assert caught.value.stage == "validate"
