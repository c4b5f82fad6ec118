"""bench/side_by_side.py against a tiny fake upstream (the real one is not in the repository)."""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import pytest

from bench import side_by_side
from bench.side_by_side import (
    read_upstream_boxes,
    render,
    run_upstream,
    stage_seconds,
    wait_until_idle,
    write_upstream_boxes,
)

# Upstream's module names and the functions inference.py calls, doing tiny work; the script imports names
# with ``from ... import`` as upstream's does, and reads the saved boxes as ``--use_saved_coord`` does.
FAKE_MODULES = {
    "musetalk/__init__.py": "",
    "musetalk/utils/__init__.py": "",
    "musetalk/models/__init__.py": "",
    "musetalk/utils/preprocessing.py": """
        import cv2
        coord_placeholder = (0.0, 0.0, 0.0, 0.0)
        def read_imgs(paths):
            return [cv2.imread(p) for p in paths]
        def get_landmark_and_bbox(paths, shift):
            raise AssertionError("saved boxes were given")
    """,
    "musetalk/utils/audio_processor.py": """
        import torch
        class AudioProcessor:
            def get_audio_feature(self, path):
                return torch.zeros(1), 16000
            def get_whisper_chunk(self, features, n):
                return [torch.zeros(50, 384) for _ in range(n)]
    """,
    "musetalk/models/vae.py": """
        import time, numpy as np
        class VAE:
            def get_latents_for_unet(self, crop):
                time.sleep(0.01)
                return crop
            def decode_latents(self, latents):
                return np.zeros((len(latents), 4, 4, 3), np.uint8)
    """,
    "musetalk/models/unet.py": """
        import torch
        class UNet:
            def __init__(self):
                self.model = torch.nn.Identity()
    """,
    "musetalk/utils/face_parsing.py": """
        class FaceParsing:
            def __call__(self, image):
                return image
    """,
    "musetalk/utils/blending.py": """
        def get_image(frame, face, box, fp):
            fp(frame)
            return frame
    """,
    "scripts/inference.py": """
        import argparse, os, pickle, sys
        import cv2, numpy as np, torch
        from musetalk.utils.blending import get_image
        from musetalk.utils.face_parsing import FaceParsing
        from musetalk.utils.audio_processor import AudioProcessor
        from musetalk.models.vae import VAE
        from musetalk.models.unet import UNet
        from musetalk.utils.preprocessing import read_imgs, coord_placeholder

        parser = argparse.ArgumentParser()
        parser.add_argument("--use_saved_coord", action="store_true")
        parser.add_argument("--batch_size", type=int)
        args, _ = parser.parse_known_args()
        vae, unet, fp, audio = VAE(), UNet(), FaceParsing(), AudioProcessor()
        coords = pickle.load(open("source.pkl", "rb"))
        assert args.use_saved_coord and all(c != coord_placeholder for c in coords)
        features, length = audio.get_audio_feature("inputs/speech.wav")
        chunks = audio.get_whisper_chunk(features, 2 * len(coords))
        os.makedirs("frames", exist_ok=True)
        os.system("true -start_number 0")
        for i in range(len(coords)):
            cv2.imwrite(f"frames/{i:08d}.png", np.zeros((4, 4, 3), np.uint8))
        frames = read_imgs([f"frames/{i:08d}.png" for i in range(len(coords))])
        latents = [vae.get_latents_for_unet(f) for f in frames]
        for start in range(0, len(chunks), args.batch_size):
            out = unet.model(torch.zeros(len(chunks[start:start + args.batch_size]), 8, 32, 32))
            for face in vae.decode_latents(out):
                get_image(face, face, None, fp)
        os.makedirs("results/v15", exist_ok=True)
        # (upstream's command reads PNGs with -f image2: the probe tells its two ffmpeg calls apart by that)
        os.system(f"ffmpeg -v error -y -f lavfi -i color=black:s=16x16:r=5 -frames:v {len(chunks)} "
                  "-c:v mpeg4 results/v15/tmp.mp4 # image2")
        os.system("cp results/v15/tmp.mp4 results/v15/out.mp4")
    """,
}


@pytest.fixture
def fake_upstream(tmp_path: Path) -> Path:
    root = tmp_path / "MuseTalk"
    for name, text in FAKE_MODULES.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_boxes_are_written_in_upstreams_format(tmp_path):
    boxes = [(10, 20, 110, 140), (12, 21, 111, 142)]
    path = write_upstream_boxes(tmp_path / "source.pkl", boxes)
    with open(path, "rb") as handle:
        loaded = pickle.load(handle)
    # A list of one tuple of Python ints per frame, as get_landmark_and_bbox pickles it.
    assert loaded == boxes and all(type(b) is tuple and all(type(v) is int for v in b) for b in loaded)
    assert loaded[0] != (0.0, 0.0, 0.0, 0.0)
    assert read_upstream_boxes(path) == boxes


def test_boxes_are_found_once_then_read_from_their_file(tmp_path, monkeypatch):
    from bench.media import make_video

    video = make_video(tmp_path / "face.mp4", width=256, height=320, seconds=1, fps=4)
    kept = tmp_path / "boxes.json"
    found = side_by_side.saved_boxes(kept, video)  # dlib on the real frames, then written
    assert len(found) == 4 and all(0 <= x1 < x2 <= 256 and 0 <= y1 < y2 <= 320 for x1, y1, x2, y2 in found)
    assert json.loads(kept.read_text()) == [list(box) for box in found]

    def no_detection(*args, **kwargs):
        raise AssertionError("the boxes were kept: no face detection")

    monkeypatch.setattr(side_by_side, "find_boxes", no_detection)
    assert side_by_side.saved_boxes(kept, video) == found


@pytest.mark.parametrize("boxes, says", [
    ([[0, 0, 10, 10]] * 3, "holds 3 boxes but"),
    ([[0, 0, 10, 10]] * 3 + [[200, 0, 300, 10]], "is not a box inside the 256x320 frame"),
    ([[0, 0, 10, 10]] * 3 + [[5, 5, 5, 9]], "is not a box inside"),
    ([[0, 0, 10, 10]] * 3 + [[1, 2, 3]], "is not a box inside"),
    ({"x": 1}, "does not hold a JSON list"),
])
def test_kept_boxes_that_do_not_fit_the_media_are_refused(tmp_path, boxes, says):
    from bench.media import make_video

    video = make_video(tmp_path / "face.mp4", width=256, height=320, seconds=1, fps=4)
    kept = tmp_path / "boxes.json"
    kept.write_text(json.dumps(boxes))
    with pytest.raises(SystemExit, match=says):
        side_by_side.saved_boxes(kept, video)


def test_upstream_finds_the_probe_its_code_and_then_the_inherited_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PYTHONPATH", "/kit/site")
    env = side_by_side.upstream_env(tmp_path / "probe", tmp_path / "run", tmp_path / "r.json", "cpu", 2)
    assert env["PYTHONPATH"].split(":") == [str(tmp_path / "probe"), str(tmp_path / "run"), "/kit/site"]
    monkeypatch.delenv("PYTHONPATH")
    env = side_by_side.upstream_env(tmp_path / "probe", tmp_path / "run", tmp_path / "r.json", "cpu", 2)
    assert env["PYTHONPATH"].split(":") == [str(tmp_path / "probe"), str(tmp_path / "run")]


def test_upstream_runs_in_its_own_half_precision_only_when_asked():
    assert "--use_float16" not in side_by_side.upstream_argv("python", 8)
    assert side_by_side.upstream_argv("python", 8, half=True)[-1] == "--use_float16"


def test_upstream_stages_are_timed_from_outside(fake_upstream, tmp_path):
    work = tmp_path / "work"
    video, audio = tmp_path / "source.mp4", tmp_path / "speech.wav"
    video.write_bytes(b"video")
    audio.write_bytes(b"audio")
    boxes = [(0, 0, 4, 4)] * 3
    (tmp_path / "models").mkdir()
    run_dir = side_by_side.prepare_upstream(fake_upstream, tmp_path / "models", work, video, audio, boxes)
    before = {p: p.read_text() for p in fake_upstream.rglob("*.py")}
    run = run_upstream(sys.executable, run_dir, work / "probe", batch_size=4, device="cpu", threads=1,
                       timeout_s=120)
    # Upstream's own files are never changed; the run used the copy.
    assert {p: p.read_text() for p in fake_upstream.rglob("*.py")} == before
    stages, items = run["stages"], run["items"]
    assert items["latents"] == 3 and stages["latents"] >= 0.03
    assert items["unet"] == 6 and items["vae_decode"] == 6  # batches of 4 + 2 output frames
    assert items["blend_total"] == 6 and items["masks"] == 6
    assert items["write_png"] == 3 and items["read"] == 3
    assert {"ffmpeg_decode", "ffmpeg_encode", "ffmpeg_mux", "audio"} <= set(stages)
    assert "faces" not in stages  # the saved boxes were used
    assert run["source_frames"] == 3 and run["frames"] == 6
    assert 0 < run["load_s"] < run["wall_s"] and run["after_load_s"] > 0


def test_upstream_failure_is_reported(fake_upstream, tmp_path):
    (fake_upstream / "scripts" / "inference.py").write_text("print('Error occurred during processing: boom')\n")
    (tmp_path / "models").mkdir()
    for name in ("source.mp4", "speech.wav"):
        (tmp_path / name).write_bytes(b"x")
    run_dir = side_by_side.prepare_upstream(fake_upstream, tmp_path / "models", tmp_path / "work",
                                            tmp_path / "source.mp4", tmp_path / "speech.wav", [(0, 0, 4, 4)])
    # Upstream prints its exceptions and exits 0: the missing video is what tells.
    with pytest.raises(RuntimeError, match="output missing"):
        run_upstream(sys.executable, run_dir, tmp_path / "work" / "probe", 4, "cpu", 1, 60)


def _run(side, wall, stages, busy=0.0):
    return {"side": side, "wall_s": wall, "load_s": 2.0, "after_load_s": wall - 2.0, "stages": stages,
            "frames": 10, "source_frames": 10, "busy_before": busy, "load_after": [0.5, 0.4, 0.3]}


HEADER = {k: k for k in ("machine", "device", "upstream", "engine", "models", "media", "boxes", "runs")}


def test_table_medians_and_ratios():
    upstream = [_run("upstream", w, {"latents": 6.0, "blend_total": 3.0, "masks": 2.0}) for w in (20.0, 22.0, 30.0)]
    ours = [_run("engine", w, {"latents": 3.0, "blend": 0.25, "paste": 0.25}) for w in (10.0, 11.0, 9.0)]
    text = render({**HEADER, "under_load": False}, upstream, ours)
    assert "| wall (process start to exit) | 22.00 | 10.00 | 2.20x |" in text
    assert "| latents: VAE encode | 6.00 | 3.00 | 2.00x |" in text
    # Upstream's blend excludes the face parsing inside get_image; ours is blend + paste.
    assert "| blend (upstream: get_image less parsing) | 1.00 | 0.50 | 2.00x |" in text
    assert "| 1 | 20.00 | 10.00 | 2.00x |" in text and "TAKEN UNDER LOAD" not in text
    assert "TAKEN UNDER LOAD" in render({**HEADER, "under_load": True}, upstream, ours)
    assert stage_seconds(upstream[0], ("blend_total", "-masks")) == 1.0
    assert stage_seconds(upstream[0], ("unet",)) is None


ALONE = {"VAE encode (per image)": 50.0, "UNet": 20.0, "VAE decode": 100.0, "face parsing (512x512)": 200.0}


def test_the_networks_alone_are_counted_on_the_images_the_job_ran():
    upstream = [_run("upstream", 20.0, {"latents": 2.0, "unet": 1.0, "vae_decode": 2.0, "masks": 1.0})]
    ours = [_run("engine", 10.0, {"latents": 9.0, "masks": 9.0})]  # overlapped: not what the table uses
    text = render({**HEADER, "under_load": False}, upstream, ours, ALONE)
    # 10 source frames, two images each at 50 ms; 10 output frames.
    assert "| VAE encode | 2.00 | 1.00 | 2.00x |" in text
    assert "| UNet | 1.00 | 0.20 | 5.00x |" in text and "| VAE decode | 2.00 | 1.00 | 2.00x |" in text
    assert "| face parsing (BiSeNet) | 1.00 | 2.00 | 0.50x |" in text
    cached = render({**HEADER, "under_load": False}, upstream, [_run("engine", 5.0, {})], ALONE)
    assert "| VAE encode | 2.00 | not run | — |" in cached
    assert "network alone" not in render({**HEADER, "under_load": False}, upstream, ours)


def test_networks_alone_runs_the_per_call_benchmark(fixture_models):
    """The real child (bench.images_per_call on the fixture's small models): a figure per network."""
    figures = side_by_side.networks_alone(fixture_models, "cpu", 2, 2, timeout_s=600)
    assert set(figures) == set(ALONE) and all(v > 0 for v in figures.values())


def test_busy_machine_waits_then_refuses(monkeypatch):
    samples = iter([1.5, 1.2, 0.1])
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: next(samples))
    monkeypatch.setattr(side_by_side.time, "sleep", lambda s: None)
    assert wait_until_idle(0.3, wait_s=1000, sample_s=0) == (True, 0.1)
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: 1.5)
    assert wait_until_idle(0.3, wait_s=0, sample_s=0) == (False, 1.5)


def test_busy_cores_reads_proc_stat():
    if not Path("/proc/stat").exists():
        pytest.skip("no /proc/stat")
    assert 0.0 <= side_by_side.busy_cores(0.2) <= (side_by_side.os.cpu_count() or 1) + 0.01


@pytest.fixture
def stubbed_main(monkeypatch, tmp_path):
    """main() with the media, boxes, upstream copy and both sides' runs stubbed out; returns the runs made."""
    made = []
    monkeypatch.setattr(side_by_side, "_media", lambda args, folder: (tmp_path / "v.mp4", tmp_path / "a.wav"))
    monkeypatch.setattr(side_by_side, "find_boxes", lambda video, models=None: [(0, 0, 4, 4)])
    monkeypatch.setattr(side_by_side, "prepare_upstream", lambda *a: tmp_path)
    monkeypatch.setattr(side_by_side, "run_upstream",
                        lambda *a, half=False: made.append("upstream half" if half else "upstream")
                        or _run("upstream", 20.0, {"unet": 1.0}))
    monkeypatch.setattr(side_by_side, "run_ours", lambda *a: made.append("engine") or _run("engine", 10.0, {}))
    monkeypatch.setattr(side_by_side, "_python_versions", lambda python: "Python x")
    monkeypatch.setattr(side_by_side, "networks_alone", lambda *a: made.append("alone") or ALONE)
    return made


def test_main_refuses_to_time_a_busy_machine(stubbed_main, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: 1.8)
    code = side_by_side.main(["--upstream", str(tmp_path), "--runs", "2", "--wait-idle", "0", "--idle-sample", "0"])
    assert code == side_by_side.REFUSED_BUSY and stubbed_main == []
    assert "Side by side" not in capsys.readouterr().out


def test_main_interleaves_and_marks_a_busy_table(stubbed_main, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: 1.8)
    code = side_by_side.main(["--upstream", str(tmp_path), "--runs", "2", "--wait-idle", "0", "--idle-sample", "0",
                              "--allow-busy", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    assert code == 0 and stubbed_main == ["upstream", "engine", "upstream", "engine", "alone"]
    assert "TAKEN UNDER LOAD" in out and "| wall (process start to exit) | 20.00 | 10.00 | 2.00x |" in out
    assert (tmp_path / "out.json").is_file()


def test_main_times_an_idle_machine_unmarked(stubbed_main, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: 0.05)
    assert side_by_side.main(["--upstream", str(tmp_path), "--runs", "1", "--idle-sample", "0"]) == 0
    assert "TAKEN UNDER LOAD" not in capsys.readouterr().out


@pytest.mark.parametrize("device, upstream", [("cuda", "upstream half"), ("cpu", "upstream")])
def test_fp16_gives_upstream_its_half_precision_on_cuda_only(stubbed_main, monkeypatch, tmp_path, capsys, device,
                                                              upstream):
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: 0.05)
    assert side_by_side.main(["--upstream", str(tmp_path), "--runs", "1", "--idle-sample", "0", "--fp16",
                              "--device", device]) == 0
    assert stubbed_main == [upstream, "engine"]  # no float32 networks-alone table beside a half-precision job
    out = capsys.readouterr().out
    assert ("both sides in half precision" in out) == (device == "cuda")


def test_the_engine_loads_the_face_back_end_asked_for(stubbed_main, monkeypatch, tmp_path):
    configs = []
    monkeypatch.setattr(side_by_side, "busy_cores", lambda s: 0.05)
    monkeypatch.setattr(side_by_side, "run_ours", lambda config, *a: configs.append(config) or _run("engine", 10, {}))
    for landmarks in ("dwpose", None):
        extra = ["--landmarks", landmarks] if landmarks else []
        assert side_by_side.main(["--upstream", str(tmp_path), "--runs", "1", "--idle-sample", "0"] + extra) == 0
    assert [c["landmarks"] for c in configs] == ["dwpose", "dlib"]


def test_boxes_only_writes_the_file_and_times_nothing(stubbed_main, monkeypatch, tmp_path):
    monkeypatch.setattr(side_by_side, "saved_boxes", lambda path, video, models=None: [path.write_text("[]")][:0])
    assert side_by_side.main(["--boxes-only", "--boxes", str(tmp_path / "b.json")]) == 0
    assert (tmp_path / "b.json").is_file() and stubbed_main == []
    with pytest.raises(SystemExit):
        side_by_side.main(["--boxes-only"])  # needs --boxes


def test_a_portable_checkpoint_keeps_the_tensors_and_drops_numpy_from_its_metadata(tmp_path):
    """Upstream's pins (numpy 1.23) cannot unpickle numpy 2 arrays; the copy holds lists in their place."""
    import numpy as np
    import torch

    original = tmp_path / "pose.pth"
    weights = {"w": torch.arange(6.0).reshape(2, 3)}
    torch.save({"state_dict": weights, "meta": {"dataset_meta": {"sigmas": np.array([0.5, 0.25]),
                                                                 "pairs": [(0, 1)], "name": "coco"}}}, original)
    portable = side_by_side._portable_checkpoint(original)
    assert portable != original and side_by_side._portable_checkpoint(original) == portable
    # Loadable without unpickling any numpy object.
    loaded = torch.load(portable, weights_only=True)
    assert torch.equal(loaded["state_dict"]["w"], weights["w"])
    assert loaded["meta"]["dataset_meta"] == {"sigmas": [0.5, 0.25], "pairs": [(0, 1)], "name": "coco"}


def test_upstream_gets_its_detectors_without_touching_a_models_folder_with_dwpose(fake_upstream, tmp_path,
                                                                                monkeypatch):
    """A models folder built ``--with-dwpose`` (as on the lent GPU) has its own ``dwpose/``: it stays as it was."""
    import torch

    from bench import random_models
    from musetalk_worker.faces import DWPOSE_WEIGHTS, S3FD_WEIGHTS

    def small_checkpoint(name):
        def write(dest, seed):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            torch.save({"state_dict": {"w": torch.full((2,), float(seed))}, "meta": {}}, dest / name)
        return write

    # The real-size random S3FD and DWPose take 200 MB; their size is not what is tested here.
    monkeypatch.setattr(random_models, "_write_s3fd", small_checkpoint(S3FD_WEIGHTS))
    monkeypatch.setattr(random_models, "_write_dwpose", small_checkpoint(DWPOSE_WEIGHTS))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (fake_upstream / "musetalk" / "utils" / "preprocessing.py").write_text("model = init_model(config, ckpt)\n")
    sfd = fake_upstream / "musetalk" / "utils" / "face_detection" / "detection" / "sfd"
    sfd.mkdir(parents=True)
    models = tmp_path / "models"
    (models / "dwpose").mkdir(parents=True)
    (models / DWPOSE_WEIGHTS).write_bytes(b"the engine's DWPose")
    video, audio = tmp_path / "source.mp4", tmp_path / "speech.wav"
    video.write_bytes(b"video")
    audio.write_bytes(b"audio")

    run_dir = side_by_side.prepare_upstream(fake_upstream, models, tmp_path / "work", video, audio, [(0, 0, 4, 4)])
    assert sorted(p.name for p in (models / "dwpose").iterdir()) == [DWPOSE_WEIGHTS.name]
    assert (models / DWPOSE_WEIGHTS).read_bytes() == b"the engine's DWPose"
    linked = run_dir / "models" / "dwpose" / DWPOSE_WEIGHTS.name
    assert not linked.parent.is_symlink() and linked.resolve().name == "dw-ll_ucoco_384.portable.pth"
    assert torch.load(linked, weights_only=True)["state_dict"]["w"].tolist() == [0.0, 0.0]
    assert (run_dir / "musetalk" / "utils" / "face_detection" / "detection" / "sfd" / "s3fd.pth").resolve().is_file()
