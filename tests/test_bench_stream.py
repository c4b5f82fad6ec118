"""Smoke test of bench/stream.py: one round of a cache miss and a cached avatar on a 1 s clip (small models, CPU)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.stream import MODES
from conftest import ROOT


def test_stream_bench_reports_first_segment_and_total_for_both_modes(fixture_models, media_dir, tmp_path):
    out = tmp_path / "stream.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.stream", "--models", str(fixture_models), "--device", "cpu", "--runs", "1",
         "--seconds", "1", "--fps", "10", "--width", "128", "--height", "128", "--batch-size", "4",
         "--threads", "1", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout
    assert "| figure | " + " | ".join(label for _, label in MODES) + " |" in table
    for row in ("first segment s", "total job s", "first / total", "watcher: segment 0 listed s",
                "watcher: playlist listed s", "segments", "frames"):
        assert f"| {row} | **" in table, row
    assert "logical cores" in table and "load average: at start" in table
    assert "CPU criterion (cached avatar)" in table and ("PASS" in table or "FAIL" in table)

    report = json.loads(out.read_text())
    for mode, _ in MODES:
        (run,) = report["runs"][mode]
        assert 0 < run["first_segment_s"] < run["total_s"], (mode, run)
        assert run["frames"] == 10 and run["segments"] == 2
        # The watcher saw segment 0 in the bucket, no earlier than the worker could have put it there.
        assert 0 < run["watcher_segment_s"] <= run["watcher_playlist_s"] < run["returned_s"]
        assert run["stage_started_s"]["streaming"] > 0
    assert (report["runs"]["miss"][0]["cache_hit"], report["runs"]["cached"][0]["cache_hit"]) == (False, True)
    assert report["passed"] in (True, False) and report["summary"]["cached"]["first_segment_s"] > 0
