"""The build-time downloader against real HTTP servers on loopback.

A file server mirrors the parity fixture's model files (real bytes, checked
against the SHA-256 that parity.json records for them); a second pair of
servers plays the Hugging Face Hub (HEAD/GET on /{repo}/resolve/{commit}/{path},
with the headers huggingface_hub reads) and its CDN. The downloader runs as its
command line, in a subprocess, from a working directory of its own.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import pytest

from conftest import FIXTURE_MODELS, ROOT
from musetalk_worker.weights import CONVERSIONS_FILE, load_lock, present_components, verify_models

HF_REPO = "TMElyralab/MuseTalk"
HF_REVISION = "2bcb936e2fddb4d86db4c62fd45b387d0c061571"
COMPONENT_OF_FOLDER = {"musetalkV15": "v15", "sd-vae": "vae", "whisper": "whisper", "face-parse-bisent": "face_parsing"}
UNET = "musetalkV15/unet.pth"


@dataclasses.dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: Dict[str, str]


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 that hands every request to ``app`` and logs it."""

    def __init__(self, app: Callable[[http.server.BaseHTTPRequestHandler], None]):
        seen: List[Seen] = []
        self.seen = seen

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                seen.append(Seen(self.command, self.path, dict(self.headers)))
                app(self)

            do_HEAD = do_GET

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def gets(self, path: str) -> List[Seen]:
        return [s for s in self.seen if s.method == "GET" and s.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def send_bytes(h: http.server.BaseHTTPRequestHandler, data: bytes, *, ranges: bool = True,
               drop_after: Optional[int] = None, headers: Optional[Dict[str, str]] = None) -> None:
    """Answer with ``data`` (206 for a Range request when ``ranges``); ``drop_after`` cuts the body short."""
    status, start = 200, 0
    match = re.fullmatch(r"bytes=(\d+)-", h.headers.get("Range", ""))
    if ranges and match:
        status, start = 206, int(match[1])
    body = data[start:]
    h.send_response(status)
    h.send_header("Content-Length", str(len(body)))
    if ranges:
        h.send_header("Accept-Ranges", "bytes")
    if status == 206:
        h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
    for name, value in (headers or {}).items():
        h.send_header(name, value)
    h.end_headers()
    if h.command == "HEAD":
        return
    # HTTP/1.0: the server closes the connection after the response, so a short body is a dropped transfer.
    h.wfile.write(body if drop_after is None else body[:drop_after])


class FileMirror:
    """Serves files under /files/<path> (and any other registered path), with scripted faults per path."""

    def __init__(self, ranges: bool = True):
        self.routes: Dict[str, bytes] = {}
        self.faults: Dict[str, collections.deque] = collections.defaultdict(collections.deque)
        self.ranges = ranges
        self.server = LoopbackServer(self._answer)

    def _answer(self, h: http.server.BaseHTTPRequestHandler) -> None:
        data = self.routes.get(h.path)
        fault = self.faults[h.path].popleft() if self.faults[h.path] else None
        if data is None or fault == "404":
            h.send_error(404)
        elif fault == "503":
            h.send_error(503, "busy, try later")
        elif fault == "drop_half":
            send_bytes(h, data, ranges=self.ranges, drop_after=len(data) // 2)
        else:
            send_bytes(h, data, ranges=self.ranges)


@pytest.fixture(scope="module")
def fixture_files(fixture_models: Path) -> Dict[str, dict]:
    """Every fixture model file by path: its size, the SHA-256 parity.json records, and its bytes."""
    recorded = json.loads((fixture_models.parent / "parity.json").read_text())["files"]
    files = {}
    for path in sorted(p for p in fixture_models.rglob("*") if p.is_file()):
        rel = path.relative_to(fixture_models).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": recorded[f"models/{rel}"], "data": path.read_bytes()}
    return files


@pytest.fixture
def mirror(fixture_files: Dict[str, dict]):
    server = FileMirror()
    server.routes = {f"/files/{rel}": f["data"] for rel, f in fixture_files.items()}
    yield server
    server.server.close()


def write_lock(path: Path, files: Dict[str, dict], source: Callable[[str], dict]) -> Path:
    """A lock of ``files`` grouped by folder into the real component names, with ``source(rel)`` for each."""
    components: Dict[str, dict] = {}
    for rel, f in files.items():
        name = COMPONENT_OF_FOLDER[rel.split("/")[0]]
        entry = {"path": rel, "size": f["size"], "sha256": f["sha256"], "source": source(rel)}
        if rel == UNET:
            entry["converted_path"] = "musetalkV15/unet.safetensors"
        components.setdefault(name, {"description": name, "files": []})["files"].append(entry)
    lock = {"format": 1, "default_components": list(components), "components": components}
    path.write_text(json.dumps(lock, indent=1))
    return path


@pytest.fixture
def url_lock(tmp_path: Path, fixture_files: Dict[str, dict], mirror: FileMirror) -> Path:
    return write_lock(tmp_path / "lock.json", fixture_files,
                      lambda rel: {"type": "url", "url": f"{mirror.server.url}/files/{rel}"})


def run_fetch(tmp_path: Path, *args: str, env: Optional[Dict[str, str]] = None) -> subprocess.CompletedProcess:
    """The downloader's command line, run from a scratch working directory."""
    work = tmp_path / "cwd"
    work.mkdir(exist_ok=True)
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "WEIGHTS_"))}
    full_env.update(PYTHONPATH=str(ROOT), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                    HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "builder.fetch_weights", "--retry-wait", "0.01", "--timeout", "10", *args],
        cwd=work, env=full_env, capture_output=True, text=True, timeout=120,
    )


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def leftovers(dest: Path) -> List[str]:
    return sorted(p.name for p in dest.rglob("*") if p.name.endswith((".part", ".tmp")))


def test_full_download_matches_and_a_second_run_downloads_nothing(tmp_path, url_lock, mirror, fixture_files):
    dest = tmp_path / "models"
    first = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--jobs", "3")
    assert first.returncode == 0, first.stderr
    for rel, f in fixture_files.items():
        assert sha256_of(dest / rel) == f["sha256"], rel
        assert len(mirror.server.gets(f"/files/{rel}")) == 1, rel
    assert leftovers(dest) == []
    assert f"{len(fixture_files)} downloaded, 0 already present" in first.stdout

    requests_before = len(mirror.server.seen)
    second = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest))
    assert second.returncode == 0, second.stderr
    assert len(mirror.server.seen) == requests_before
    assert f"0 downloaded, {len(fixture_files)} already present" in second.stdout


def test_a_dropped_connection_is_resumed_with_a_range_request(tmp_path, url_lock, mirror, fixture_files):
    size = fixture_files[UNET]["size"]
    mirror.faults[f"/files/{UNET}"].append("drop_half")
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--components", "v15")
    assert result.returncode == 0, result.stderr
    assert sha256_of(dest / UNET) == fixture_files[UNET]["sha256"]
    first, second = mirror.server.gets(f"/files/{UNET}")
    assert "Range" not in first.headers
    assert second.headers["Range"] == f"bytes={size // 2}-"  # only the missing half was asked for
    assert "resuming at byte" in result.stderr


def test_a_server_that_ignores_ranges_is_downloaded_again_from_the_start(tmp_path, url_lock, mirror, fixture_files):
    mirror.ranges = False
    mirror.faults[f"/files/{UNET}"].append("drop_half")
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--components", "v15")
    assert result.returncode == 0, result.stderr
    assert sha256_of(dest / UNET) == fixture_files[UNET]["sha256"]
    assert len(mirror.server.gets(f"/files/{UNET}")) == 2
    assert "ignored the range request" in result.stderr


def test_503_is_retried_with_backoff_then_succeeds(tmp_path, url_lock, mirror, fixture_files):
    path = "sd-vae/config.json"
    mirror.faults[f"/files/{path}"].extend(["503", "503"])
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--components", "vae")
    assert result.returncode == 0, result.stderr
    assert len(mirror.server.gets(f"/files/{path}")) == 3
    assert sha256_of(dest / path) == fixture_files[path]["sha256"]
    assert result.stderr.count("HTTP 503") == 2 and "retrying in" in result.stderr


def test_persistent_failures_give_up_and_a_404_is_not_retried(tmp_path, url_lock, mirror):
    busy, gone = "/files/sd-vae/config.json", "/files/sd-vae/diffusion_pytorch_model.safetensors"
    mirror.faults[busy].extend(["503"] * 10)
    mirror.faults[gone].append("404")
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--components", "vae", "--attempts", "3")
    assert result.returncode == 1
    assert len(mirror.server.gets(busy)) == 3
    assert len(mirror.server.gets(gone)) == 1
    assert "gave up after 3 attempts" in result.stderr and "HTTP 404" in result.stderr
    assert not (dest / "sd-vae" / "config.json").exists()


def test_a_corrupted_file_is_refused_and_nothing_is_left(tmp_path, url_lock, mirror, fixture_files):
    path = "sd-vae/diffusion_pytorch_model.safetensors"
    bad = bytearray(fixture_files[path]["data"])
    bad[len(bad) // 2] ^= 0xFF
    mirror.routes[f"/files/{path}"] = bytes(bad)
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--components", "vae")
    assert result.returncode == 1
    message = result.stderr
    assert path in message
    assert fixture_files[path]["sha256"] in message
    assert hashlib.sha256(bad).hexdigest() in message
    assert not (dest / path).exists()
    assert leftovers(dest) == []
    assert sha256_of(dest / "sd-vae" / "config.json") == fixture_files["sd-vae/config.json"]["sha256"]


def test_a_stale_partial_file_that_leads_to_a_wrong_hash_is_downloaded_again(tmp_path, url_lock, mirror, fixture_files):
    dest = tmp_path / "models"
    part = dest / (UNET + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # left by an earlier run of some other file
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--components", "v15")
    assert result.returncode == 0, result.stderr
    assert sha256_of(dest / UNET) == fixture_files[UNET]["sha256"]
    first, second = mirror.server.gets(f"/files/{UNET}")
    assert first.headers["Range"] == "bytes=1000-" and "Range" not in second.headers


def test_verify_lists_a_missing_and_a_wrong_file(tmp_path, url_lock, fixture_files):
    dest = tmp_path / "models"
    assert run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest)).returncode == 0
    clean = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--verify")
    assert clean.returncode == 0, clean.stdout
    assert f"all {len(fixture_files)} files" in clean.stdout

    (dest / "whisper" / "config.json").unlink()
    wrong = dest / "face-parse-bisent" / "resnet18-5c106cde.pth"
    data = bytearray(wrong.read_bytes())
    data[100] ^= 0x01  # same size: only the hash can tell
    wrong.write_bytes(bytes(data))
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(dest), "--verify")
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any(line.split()[:2] == ["missing", "whisper/config.json"] for line in lines), result.stdout
    assert any(line.split()[:2] == ["hash", "face-parse-bisent/resnet18-5c106cde.pth"] for line in lines), result.stdout
    assert "1 missing, 1 wrong" in result.stdout


def test_plain_urls_come_from_the_url_mirror_when_one_is_set(tmp_path, fixture_files, mirror):
    rel = "face-parse-bisent/resnet18-5c106cde.pth"
    files = {rel: fixture_files[rel]}
    lock = write_lock(tmp_path / "lock.json", files,
                      lambda _: {"type": "url", "url": "https://download.pytorch.org/models/resnet18-5c106cde.pth"})
    mirrored = "/mirror/download.pytorch.org/models/resnet18-5c106cde.pth"
    mirror.routes[mirrored] = fixture_files[rel]["data"]
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(lock), "--dest", str(dest),
                       env={"WEIGHTS_URL_MIRROR": f"{mirror.server.url}/mirror/"})
    assert result.returncode == 0, result.stderr
    assert len(mirror.server.gets(mirrored)) == 1
    assert sha256_of(dest / rel) == fixture_files[rel]["sha256"]


def test_unet_conversion_is_recorded_and_stands_in_for_the_pth(tmp_path, url_lock, mirror, fixture_files):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    dest = tmp_path / "models"
    args = ("--lock", str(url_lock), "--dest", str(dest), "--components", "v15")
    result = run_fetch(tmp_path, *args, "--convert-unet", "--remove-converted-sources")
    assert result.returncode == 0, result.stderr
    converted = dest / "musetalkV15" / "unet.safetensors"
    assert not (dest / UNET).exists()
    record = json.loads((dest / CONVERSIONS_FILE).read_text())["musetalkV15/unet.safetensors"]
    assert record["sha256"] == sha256_of(converted)
    assert record["size"] == converted.stat().st_size
    assert record["source_sha256"] == fixture_files[UNET]["sha256"]

    original = torch.load(FIXTURE_MODELS / UNET, map_location="cpu", weights_only=True)
    loaded = safetensors_torch.load_file(converted)
    assert set(original) == set(loaded)
    for key, tensor in original.items():
        assert loaded[key].dtype == tensor.dtype and torch.equal(loaded[key], tensor), key

    # The recorded conversion satisfies the lock: nothing is fetched again, and the check passes.
    gets_before = len(mirror.server.gets(f"/files/{UNET}"))
    again = run_fetch(tmp_path, *args, "--convert-unet")
    assert again.returncode == 0, again.stderr
    assert len(mirror.server.gets(f"/files/{UNET}")) == gets_before
    assert verify_models(dest, url_lock, ["v15"], check_hashes=True).ok


def test_an_unrecorded_conversion_fails_the_check(tmp_path, url_lock, fixture_files):
    dest = tmp_path / "models"
    (dest / "musetalkV15").mkdir(parents=True)
    for rel in (UNET, "musetalkV15/musetalk.json"):
        shutil.copyfile(FIXTURE_MODELS / rel, dest / rel)
    assert verify_models(dest, url_lock, ["v15"]).ok
    (dest / "musetalkV15" / "unet.safetensors").write_bytes(b"not recorded")
    report = verify_models(dest, url_lock, ["v15"])
    assert [(p.kind, p.path) for p in report.problems] == [("unrecorded", "musetalkV15/unet.safetensors")]


def test_the_converter_refuses_a_pickle_that_is_not_a_state_dict(tmp_path):
    from builder.pth_to_safetensors import ConversionError, convert

    # A torch.save-shaped archive whose pickle calls a function a state dict never needs.
    payload = b"\x80\x02cos\nsystem\nq\x00X\x04\x00\x00\x00trueq\x01\x85q\x02Rq\x03."
    src = tmp_path / "evil.pth"
    with zipfile.ZipFile(src, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
    with pytest.raises(ConversionError, match=r"os\.system"):
        convert(src, tmp_path / "evil.safetensors", {})
    assert not (tmp_path / "evil.safetensors").exists()


# --- the Hugging Face path: huggingface_hub's own client asks a loopback "Hub" ---------------------


class FakeHub:
    """Answers /{repo}/resolve/{commit}/{path} as the Hub does for a pinned file, for each (repo, commit) given.

    Large files are LFS: a 302 to the CDN (another origin) carrying X-Linked-Etag
    (the SHA-256) and X-Linked-Size. Small files are answered directly with their
    git blob id as ETag. Every answer names the commit in X-Repo-Commit.
    """

    def __init__(self, repos: Dict[Tuple[str, str], Dict[str, bytes]]):
        self.routes = {f"/{repo}/resolve/{revision}/{path}": (revision, data)
                       for (repo, revision), files in repos.items() for path, data in files.items()}
        self.answered_commit: Optional[str] = None
        self.etag_override: Optional[str] = None
        self.faults: collections.deque = collections.deque()
        self.cdn = LoopbackServer(self._cdn)
        self.hub = LoopbackServer(self._hub)
        self.blobs = {hashlib.sha256(data).hexdigest(): data for _, data in self.routes.values()}

    def _hub(self, h: http.server.BaseHTTPRequestHandler) -> None:
        if self.faults:
            h.send_error(int(self.faults.popleft()))
            return
        revision, data = self.routes.get(h.path, (None, None))
        if data is None:
            h.send_response(404)
            h.send_header("X-Error-Code", "EntryNotFound")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        sha = hashlib.sha256(data).hexdigest()
        if len(data) > 1_000_000:
            h.send_response(302)
            h.send_header("Location", f"{self.cdn.url}/blobs/{sha}")
            h.send_header("X-Repo-Commit", self.answered_commit or revision)
            h.send_header("X-Linked-Etag", f'"{self.etag_override or sha}"')
            h.send_header("X-Linked-Size", str(len(data)))
            h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        git_blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        send_bytes(h, data, headers={"X-Repo-Commit": self.answered_commit or revision, "ETag": f'"{git_blob}"'})

    def _cdn(self, h: http.server.BaseHTTPRequestHandler) -> None:
        data = self.blobs.get(h.path.removeprefix("/blobs/"))
        if data is None:
            h.send_error(404)
        else:
            send_bytes(h, data)

    def close(self) -> None:
        self.hub.close()
        self.cdn.close()


HUB_FILES = (UNET, "musetalkV15/musetalk.json")


@pytest.fixture
def hub(fixture_files):
    server = FakeHub({(HF_REPO, HF_REVISION): {rel: fixture_files[rel]["data"] for rel in HUB_FILES}})
    yield server
    server.close()


@pytest.fixture
def hf_lock(tmp_path, fixture_files, hub) -> Path:
    files = {rel: fixture_files[rel] for rel in HUB_FILES}
    return write_lock(tmp_path / "lock.json", files,
                      lambda rel: {"type": "hf", "repo": HF_REPO, "revision": HF_REVISION, "path": rel})


def test_hugging_face_files_are_resolved_by_huggingface_hub_and_verified(tmp_path, hub, hf_lock, fixture_files):
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(hf_lock), "--dest", str(dest), env={"HF_ENDPOINT": hub.hub.url})
    assert result.returncode == 0, result.stderr
    for rel in HUB_FILES:
        assert sha256_of(dest / rel) == fixture_files[rel]["sha256"]
    heads = [s for s in hub.hub.seen if s.method == "HEAD"]
    assert {s.path for s in heads} == {f"/{HF_REPO}/resolve/{HF_REVISION}/{rel}" for rel in HUB_FILES}
    assert all("hf_hub/" in s.headers.get("user-agent", s.headers.get("User-Agent", "")) for s in heads)
    # The LFS file came from the CDN address the Hub redirected to; the small one from the Hub itself.
    assert len(hub.cdn.gets(f"/blobs/{fixture_files[UNET]['sha256']}")) == 1
    assert len(hub.hub.gets(f"/{HF_REPO}/resolve/{HF_REVISION}/musetalkV15/musetalk.json")) == 1


def test_hub_errors_are_retried_then_succeed(tmp_path, hub, hf_lock):
    hub.faults.extend(["503", "502"])
    result = run_fetch(tmp_path, "--lock", str(hf_lock), "--dest", str(tmp_path / "models"),
                       "--jobs", "1", env={"HF_ENDPOINT": hub.hub.url})
    assert result.returncode == 0, result.stderr
    assert "HTTP 503" in result.stderr and "HTTP 502" in result.stderr


def test_a_hub_sha256_that_differs_from_the_lock_is_refused_before_downloading(tmp_path, hub, hf_lock, fixture_files):
    hub.etag_override = "0" * 64
    dest = tmp_path / "models"
    result = run_fetch(tmp_path, "--lock", str(hf_lock), "--dest", str(dest), env={"HF_ENDPOINT": hub.hub.url})
    assert result.returncode == 1
    assert "0" * 64 in result.stderr and fixture_files[UNET]["sha256"] in result.stderr
    assert hub.cdn.seen == []
    assert not (dest / UNET).exists()


def test_a_hub_that_answers_another_commit_is_refused(tmp_path, hub, hf_lock):
    hub.answered_commit = "f" * 40
    result = run_fetch(tmp_path, "--lock", str(hf_lock), "--dest", str(tmp_path / "models"),
                       env={"HF_ENDPOINT": hub.hub.url})
    assert result.returncode == 1
    assert f"answered commit {'f' * 40} for the pinned revision {HF_REVISION}" in result.stderr


def test_unknown_components_are_a_usage_error(tmp_path, url_lock):
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(tmp_path / "m"), "--components", "v15,nope")
    assert result.returncode == 2
    assert "unknown component(s) nope" in result.stderr and "choose from" in result.stderr


def test_the_project_lock_is_the_default(tmp_path):
    result = run_fetch(tmp_path, "--dest", str(tmp_path / "empty"), "--verify")
    assert result.returncode == 1
    default = load_lock().select(None)
    assert f"{len(default)} missing, 0 wrong" in result.stdout
    assert "musetalkV15/unet.pth" in result.stdout and "s3fd/s3fd-619a316812.pth" in result.stdout


# --- LatentSync: the project lock's own entries, with the parity fixture's bytes, through the fake Hub ------------

LATENTSYNC = ("latentsync-1.6", "latentsync-1.5")


@pytest.fixture(scope="module")
def latentsync_models() -> Path:
    """A LatentSync parity fixture's models folder (the layout of a LatentSync model folder)."""
    from latentsync_fixtures import fixture_dirs

    folders = fixture_dirs()
    if not folders:
        pytest.skip("no LatentSync parity fixture found")
    return folders[0] / "models"


@pytest.fixture(scope="module")
def edge_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint in LatentSync's format whose float32 values cover float16's edges.

    Random bit patterns (every exponent: subnormals, values past 65504, NaN), the
    rounding ties, signed zeros and infinities; an int64 and a float16 tensor pass
    through uncast.
    """
    torch = pytest.importorskip("torch")
    bits = torch.randint(-2**31, 2**31 - 1, (256, 1024), generator=torch.Generator().manual_seed(0)).to(torch.int32)
    ties = [1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 2.0**-25, 3 * 2.0**-26]
    state_dict = {
        "random_bits": bits.view(torch.float32),
        "edges": torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 1e-10, -1e30, *ties]),
        "steps": torch.arange(6),
        "already_half": torch.linspace(-2, 2, 9).half(),
    }
    path = tmp_path_factory.mktemp("edge") / "latentsync_unet.pt"
    torch.save({"state_dict": state_dict, "global_step": 7}, path)
    return path


def assert_holds_half_of(converted: Dict[str, "torch.Tensor"], checkpoint: Path) -> None:
    """``converted`` has the checkpoint state dict's keys and shapes, with float32 tensors as ``tensor.half()``."""
    import torch

    original = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert set(converted) == set(original)
    for key, tensor in original.items():
        expected = tensor.half() if tensor.dtype == torch.float32 else tensor
        got = converted[key]
        assert got.dtype == expected.dtype and got.shape == expected.shape, key
        if expected.dtype != torch.float16:
            assert torch.equal(got, expected), key
            continue
        # Bit for bit: -0.0, infinities and rounding ties included; a NaN only has to stay NaN.
        nan = torch.isnan(expected)
        assert torch.equal(torch.isnan(got), nan), key
        assert torch.equal(got.view(torch.int16)[~nan], expected.view(torch.int16)[~nan]), key


def test_a_latentsync_checkpoint_is_converted_to_float16_without_torch(tmp_path, latentsync_models, edge_checkpoint):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from builder.pth_to_safetensors import convert

    for checkpoint in (latentsync_models / "latentsync_unet.pt", edge_checkpoint):
        first = convert(checkpoint, tmp_path / "a.safetensors", {}, cast_to="F16")
        again = convert(checkpoint, tmp_path / "b.safetensors", {}, cast_to="F16")
        assert first.sha256 == again.sha256  # the same bytes each time: the recorded hash means something
        assert_holds_half_of(safetensors_torch.load_file(first.path), checkpoint)
    # Without a cast the state dict comes out exactly as stored.
    import torch

    kept = safetensors_torch.load_file(convert(edge_checkpoint, tmp_path / "c.safetensors", {}).path)
    original = torch.load(edge_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(kept[k].view(torch.uint8), v.view(torch.uint8)) for k, v in original.items())


def test_the_converter_refuses_a_training_checkpoint_with_more_than_numbers_beside_its_state_dict(tmp_path):
    torch = pytest.importorskip("torch")
    from builder.pth_to_safetensors import ConversionError, convert

    src = tmp_path / "with_optimizer.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer": {"exp_avg": torch.zeros(2)}}, src)
    with pytest.raises(ConversionError, match=r"more than a state dict .*\(optimizer\)"):
        convert(src, tmp_path / "out.safetensors", {}, cast_to="F16")
    assert not (tmp_path / "out.safetensors").exists()


def _stand_in(rel: str, latentsync_models: Path, edge_checkpoint: Path) -> bytes:
    """The fixture's bytes for a file of the project lock: its namesake in a LatentSync model folder."""
    if rel == "latentsync-1.5/latentsync_unet.pt":
        return edge_checkpoint.read_bytes()  # the two versions' UNets differ, as upstream's do
    folder, name = rel.split("/", 1)
    return (latentsync_models / ("sd-vae-ft-mse/" + name if folder == "sd-vae" else name)).read_bytes()


@pytest.fixture
def latentsync_setup(tmp_path, latentsync_models, edge_checkpoint):
    """The project lock's vae and LatentSync components with the fixture's bytes, and a Hub and mirror serving them."""
    lock = json.loads((ROOT / "weights.lock.json").read_text())
    components = {name: lock["components"][name] for name in ("vae", *LATENTSYNC)}
    repos: Dict[Tuple[str, str], Dict[str, bytes]] = collections.defaultdict(dict)
    mirror = FileMirror()
    for body in components.values():
        for entry in body["files"]:
            data = _stand_in(entry["path"], latentsync_models, edge_checkpoint)
            entry.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
            source = entry["source"]
            if source["type"] == "hf":
                repos[source["repo"], source["revision"]][source["path"]] = data
            else:
                mirror.routes["/mirror/" + source["url"].removeprefix("https://")] = data
    path = tmp_path / "lock.json"
    path.write_text(json.dumps({"format": 1, "default_components": ["vae"], "components": components}))
    hub = FakeHub(repos)
    env = {"HF_ENDPOINT": hub.hub.url, "WEIGHTS_URL_MIRROR": f"{mirror.server.url}/mirror"}
    yield path, hub, mirror, env
    hub.close()
    mirror.server.close()


def test_latentsync_downloads_through_the_hub_shares_files_and_keeps_only_the_fp16_unet(
        tmp_path, latentsync_setup, latentsync_models, edge_checkpoint):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    lock, hub, mirror, env = latentsync_setup
    dest = tmp_path / "models"
    base = ("--lock", str(lock), "--dest", str(dest))
    # MuseTalk's VAE is there first, as in the image's default set.
    first = run_fetch(tmp_path, *base, "--components", "vae", env=env)
    assert first.returncode == 0, first.stderr
    hub_before = len(hub.hub.seen)

    args = (*base, "--components", "vae,latentsync-1.6,latentsync-1.5", "--jobs", "3",
            "--convert-unet", "latentsync-1.6,latentsync-1.5", "--remove-converted-sources")
    result = run_fetch(tmp_path, *args, env=env)
    assert result.returncode == 0, result.stderr
    # Downloaded: the two UNets, one tiny.pt and one mask; linked: the VAE twice over and the other tiny.pt and mask.
    assert "4 downloaded, 2 already present, 6 linked to the same bytes, 2 converted, 0 failed" in result.stdout

    # The VAE came from the Hub once, for sd-vae/; the LatentSync folders asked nothing about it.
    vae = json.loads(lock.read_text())["components"]["vae"]["files"][1]
    assert vae["path"] == "sd-vae/diffusion_pytorch_model.safetensors"
    assert len(hub.cdn.gets(f"/blobs/{vae['sha256']}")) == 1
    assert [s.path for s in hub.hub.seen[hub_before:] if "stabilityai" in s.path] == []
    whisper = [s for s in hub.hub.seen if s.path.endswith("/whisper/tiny.pt")]
    assert [s.method for s in whisper] == ["HEAD", "GET"]  # one version's copy only
    assert sum(len(mirror.server.gets(p)) for p in mirror.routes) == 1

    # One file each, under every path: same inode, as many links as paths.
    shared = {
        ("sd-vae", "latentsync-1.6/sd-vae-ft-mse", "latentsync-1.5/sd-vae-ft-mse"):
            ("config.json", "diffusion_pytorch_model.safetensors"),
        ("latentsync-1.6", "latentsync-1.5"): ("whisper/tiny.pt", "mask.png"),
    }
    for folders, names in shared.items():
        for name in names:
            stats = [os.stat(dest / folder / name) for folder in folders]
            assert len({st.st_ino for st in stats}) == 1 and stats[0].st_nlink == len(folders), name

    # Each version keeps only its UNet's fp16 safetensors, recorded, and it loads as the checkpoint's half().
    record = json.loads((dest / CONVERSIONS_FILE).read_text())
    for name, checkpoint in zip(LATENTSYNC, (latentsync_models / "latentsync_unet.pt", edge_checkpoint)):
        converted = dest / name / "latentsync_unet.safetensors"
        assert not (dest / name / "latentsync_unet.pt").exists()
        assert record[f"{name}/latentsync_unet.safetensors"]["sha256"] == sha256_of(converted)
        assert_holds_half_of(safetensors_torch.load_file(converted), checkpoint)
    assert leftovers(dest) == []
    assert verify_models(dest, lock, ["vae", *LATENTSYNC], check_hashes=True).ok
    assert present_components(dest, lock, LATENTSYNC) == LATENTSYNC

    # Built again (a cache miss on the same folder): nothing is fetched, linked or converted.
    requests = len(hub.hub.seen), len(hub.cdn.seen), len(mirror.server.seen)
    again = run_fetch(tmp_path, *args, env=env)
    assert again.returncode == 0, again.stderr
    assert "0 downloaded, 14 already present, 0 linked to the same bytes, 0 converted, 0 failed" in again.stdout
    assert (len(hub.hub.seen), len(hub.cdn.seen), len(mirror.server.seen)) == requests


def test_files_with_the_same_bytes_fail_together_when_their_one_download_fails(tmp_path, latentsync_setup):
    lock, hub, mirror, env = latentsync_setup
    for route in mirror.routes:
        mirror.faults[route].append("404")
    result = run_fetch(tmp_path, "--lock", str(lock), "--dest", str(tmp_path / "models"),
                       "--components", ",".join(LATENTSYNC), env=env)
    assert result.returncode == 1
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2, result.stderr
    assert any("latentsync-1.6/mask.png" in line and "HTTP 404" in line for line in failed), failed
    assert any(line.startswith("FAILED latentsync-1.5/mask.png: not fetched, as it holds the same bytes as "
                               "latentsync-1.6/mask.png, which failed") for line in failed), failed
    assert sum(len(mirror.server.gets(p)) for p in mirror.routes) == 1


def test_an_unknown_component_to_convert_is_a_usage_error(tmp_path, url_lock):
    result = run_fetch(tmp_path, "--lock", str(url_lock), "--dest", str(tmp_path / "m"), "--convert-unet", "v16")
    assert result.returncode == 2
    assert "unknown component(s) v16" in result.stderr


def test_a_gfpgan_checkpoint_converts_its_params_ema_and_the_lock_names_the_conversion(tmp_path):
    torch = pytest.importorskip("torch")
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from builder.pth_to_safetensors import ConversionError, convert

    ema = {"toRGB.0.weight": torch.randn(3, 4), "noises.noise0": torch.randn(1, 1, 4, 4)}
    src = tmp_path / "GFPGANv1.4.pth"
    # BasicSR's layout: the EMA weights the model is used with, and maybe the non-averaged ones beside them.
    torch.save({"params_ema": ema, "params": {k: v + 1 for k, v in ema.items()}}, src)
    written = safetensors_torch.load_file(convert(src, tmp_path / "out.safetensors", {}).path)
    assert set(written) == set(ema) and all(torch.equal(written[k], v) for k, v in ema.items())

    torch.save({"params_ema": ema, "optimizer": {"exp_avg": torch.zeros(2)}}, src)
    with pytest.raises(ConversionError, match=r"more than a state dict .*\(optimizer\)"):
        convert(src, tmp_path / "refused.safetensors", {})

    entry = load_lock().components["gfpgan"].files[0]
    assert (entry.path, entry.converted_path, entry.converted_dtype) == (
        "gfpgan/GFPGANv1.4.pth", "gfpgan/GFPGANv1.4.safetensors", None)
    assert "gfpgan" not in load_lock().default_components  # optional: the image holds it only when asked
