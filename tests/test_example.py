"""The main command from a fresh clone: ``bash scripts/run_example.sh`` with no ``../shared`` beside the project.

The project's files are copied to a folder of their own; only the small models
come from outside (``MUSETALK_MODELS_DIR``), as a user's own would. The
set-up runs against this checkout's venv (``VENV``), where it installs nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from conftest import ROOT, ffprobe


def test_run_example_works_from_a_clone_without_shared(fixture_models, tmp_path):
    clone = tmp_path / "clone" / "main"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split("\n")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (clone / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, clone / name)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MUSETALK_", "BUCKET_", "RUNPOD_"))}
    env.update(VENV=str(ROOT / ".venv"), MUSETALK_MODELS_DIR=str(fixture_models), MUSETALK_WEIGHTS_LOCK="none",
               MUSETALK_LANDMARKS="dlib", MUSETALK_DEVICE="cpu", MUSETALK_TEMP_DIR=str(tmp_path))
    proc = subprocess.run(["bash", "scripts/run_example.sh"], cwd=clone, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    streams = ffprobe(clone / "outputs" / "local_test.mp4")["streams"]
    # examples/speech.wav (2.2855 s) at test_input.json's 5 fps.
    assert int(next(s for s in streams if s["codec_type"] == "video")["nb_read_frames"]) == 11
    assert any(s["codec_type"] == "audio" for s in streams)
