"""scripts/setup.sh's branches, run on Linux with every outside command faked.

These machines have no Mac: ``uname`` answers what the test says, and brew,
apt-get, sudo, the venv's python (pip) and build_mmcv.sh only write what they
were asked to do to a log. Nothing is installed.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import ROOT

_STUB = '#!/bin/sh\necho "{name} $*" >> "$SETUP_LOG"\n'


def _run(tmp_path: Path, system: str, *args: str, tools=("brew", "apt-get", "sudo")) -> tuple[int, str, str]:
    """Runs setup.sh with PATH holding only fakes (no ffmpeg, so it is installed) and a fake venv."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for name in (*tools, "bash", "id", "sysctl"):
        (bin_dir / name).write_text(_STUB.format(name=name))
    (bin_dir / "uname").write_text(f"#!/bin/sh\necho {system}\n")
    (bin_dir / "id").write_text("#!/bin/sh\necho 1000\n")
    (bin_dir / "sysctl").write_text("#!/bin/sh\necho 8\n")
    (bin_dir / "dirname").symlink_to(shutil.which("dirname"))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(_STUB.format(name="python"))
    for path in [*bin_dir.iterdir(), venv / "bin" / "python"]:
        path.chmod(0o755)
    env = {"PATH": str(bin_dir), "VENV": str(venv), "SETUP_LOG": str(log), "HOME": str(tmp_path)}
    proc = subprocess.run([shutil.which("bash"), str(ROOT / "scripts" / "setup.sh"), *args], env=env,
                          capture_output=True, text=True, timeout=60)
    return proc.returncode, log.read_text() if log.exists() else "", proc.stdout + proc.stderr


def test_macos_takes_ffmpeg_from_homebrew_and_skips_openmmlab(tmp_path):
    code, calls, out = _run(tmp_path, "Darwin")
    assert code == 0, out
    assert "brew install ffmpeg" in calls and "apt-get" not in calls
    assert "-r requirements/torch.txt" in calls and "-r requirements/worker.txt" in calls
    assert "build_mmcv" not in calls and "requirements/openmmlab.txt" not in calls
    assert "face landmarks come from dlib" in out


def test_macos_installs_openmmlab_when_asked(tmp_path):
    code, calls, out = _run(tmp_path, "Darwin", "--openmmlab", "--test")
    assert code == 0, out
    assert "bash scripts/build_mmcv.sh" in calls and "-r requirements/openmmlab.txt" in calls
    assert "-r requirements/test.txt" in calls


def test_macos_without_homebrew_says_what_to_install(tmp_path):
    code, calls, out = _run(tmp_path, "Darwin", tools=("apt-get", "sudo"))
    assert code == 1 and "install Homebrew (https://brew.sh)" in out
    assert "python" not in calls


def test_linux_takes_ffmpeg_from_apt_and_installs_openmmlab(tmp_path):
    code, calls, out = _run(tmp_path, "Linux")
    assert code == 0, out
    assert "sudo apt-get install -y -qq --no-install-recommends ffmpeg" in calls and "brew" not in calls
    assert "bash scripts/build_mmcv.sh" in calls and "--no-deps mmpose==1.3.2 mmdet==3.3.0" in calls
    assert "requirements/test.txt" not in calls


def test_linux_without_openmmlab(tmp_path):
    code, calls, out = _run(tmp_path, "Linux", "--no-openmmlab")
    assert code == 0, out
    assert "build_mmcv" not in calls and "face landmarks come from dlib" in out


def test_an_unknown_option_is_refused(tmp_path):
    code, _, out = _run(tmp_path, "Linux", "--fast")
    assert code == 2 and "unknown option --fast" in out


def test_the_script_defines_functions_only_when_sourced():
    script = f"source {ROOT / 'scripts/setup.sh'}; wants_openmmlab; wants_openmmlab --no-openmmlab"
    out = subprocess.run([shutil.which("bash"), "-c", script], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.split() == ["1", "0"]
