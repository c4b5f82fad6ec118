"""The worker's malloc setting: freed memory kept for the next image, handed back after a job, and glibc's own
variables left to win. Each case runs in a fresh Python (malloc's settings are process-wide and read at start)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from musetalk_worker.allocator import MALLOC_VARIABLES, malloc_set_by_environment

ROOT = Path(__file__).resolve().parents[1]

# Allocates, fills and frees 16 MiB tensors as a decoder's activations come and go (torch's, not numpy's, which
# asks for huge pages), counting the minor page faults of the last 8 (the first few may fault while the heap
# grows); then frees 256 MiB at once and hands it back.
_CHILD = r"""
import json, resource, sys
import torch
from musetalk_worker.allocator import keep_freed_memory, return_freed_memory

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

kept = keep_freed_memory()
for _ in range(4):
    torch.ones(4 * 1024 * 1024)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):
    torch.ones(4 * 1024 * 1024)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / 8
blocks = [torch.ones(4 * 1024 * 1024) for _ in range(16)]
del blocks
freed = rss_mib()
return_freed_memory()
print(json.dumps({"kept": kept, "faults": faults, "rss_freed": freed, "rss_returned": rss_mib()}))
"""


def _child(extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", _CHILD], cwd=ROOT, env={**env, **extra_env},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc's thresholds are glibc's (Linux)")
def test_freed_memory_is_reused_without_page_faults_and_handed_back_after_a_job():
    report = _child({})
    assert report["kept"] is True
    # A 16 MiB buffer is 4096 pages; reused, it costs (nearly) none.
    assert report["faults"] < 100
    # 256 MiB freed stay with the process until handed back.
    assert report["rss_freed"] - report["rss_returned"] > 200


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc's thresholds are glibc's (Linux)")
def test_glibc_variables_from_the_environment_are_left_to_win():
    # The setting the worker image used to have: every block of 128 KiB or more mapped afresh.
    report = _child({"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert report["kept"] is False
    assert report["faults"] > 3000


def test_which_environments_set_malloc_themselves():
    assert not malloc_set_by_environment({})
    assert not malloc_set_by_environment({"MALLOC_CONF": "background_thread:true", "GLIBC_TUNABLES": "glibc.rtld.nns=2"})
    assert malloc_set_by_environment({"MALLOC_ARENA_MAX": "2"})
    assert malloc_set_by_environment({"MALLOC_TRIM_THRESHOLD_": "0"})
    assert malloc_set_by_environment({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.mmap_threshold=4096"})
