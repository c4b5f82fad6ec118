"""Jobs with a LoRA adapter: the job's ``adapter`` input (data: and HTTP), the engine's adapter cache, the base
staying bit-identical between adapter jobs, every refusal naming ``adapter``, and the CLI's ``--adapter``.

On the parity fixture's random-weight models (CPU), with adapters of random non-zero LoRA tensors
(``adapter_helpers``); every job is one output frame (0.2 s of speech at 5 fps).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
from pathlib import Path

import pytest
import requests
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from adapter_helpers import base_files, make_adapter
from musetalk_worker import __main__ as cli
from musetalk_worker.engines.latentsync.pipeline import LatentSyncPipeline
from musetalk_worker.errors import LipSyncError
from musetalk_worker.options import WorkerSettings
from musetalk_worker.train import adapter as adapters
from musetalk_worker.worker import Worker
from servers import MOTO_KEY_ID, MOTO_SECRET


def _ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", *args], check=True)


def _frames(path: Path) -> bytes:
    """The decoded frames of a video (raw BGR), to compare pictures rather than container bytes."""
    return subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "bgr24", "pipe:1"],
                          capture_output=True, check=True).stdout


def _data_url(data: bytes, kind: str = "application/octet-stream") -> str:
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def speech(media_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    _ffmpeg("-i", str(media_dir / "eng.wav"), "-t", "0.2", str(path))
    return path


@pytest.fixture(scope="module")
def lora(fixture_models, tmp_path_factory) -> Path:
    """An adapter folder for the fixture's UNet (alpha 8 at rank 4: a scale only the header can tell)."""
    folder = tmp_path_factory.mktemp("lora")
    make_adapter(fixture_models, folder)
    return folder


def _settings(fixture_models, scratch: Path) -> WorkerSettings:
    return WorkerSettings(models_dir=fixture_models, device="cpu", landmarks="dlib", temp_dir=scratch,
                          allow_private_urls=True, output_dir=None, max_audio_s=2.0, max_source_s=5.0,
                          weights_lock=None)


@pytest.fixture(scope="module")
def worker(fixture_models, tmp_path_factory) -> Worker:
    loaded = Worker.start(_settings(fixture_models, tmp_path_factory.mktemp("scratch")))
    assert loaded.load_error is None
    return loaded


@pytest.fixture(scope="module")
def job(media_dir, speech) -> dict:
    return {"source": _data_url((media_dir / "monalisa.png").read_bytes(), "image/png"),
            "audio": _data_url(speech.read_bytes(), "audio/wav"), "fps": 5}


def _video(worker: Worker, job: dict, tmp_path: Path, name: str) -> bytes:
    result = worker.run(job, name)
    assert "error" not in result, result
    assert result["frames"] == 1
    path = tmp_path / f"{name}.mp4"
    path.write_bytes(base64.b64decode(result["video_base64"]))
    return _frames(path)


def _failure(result: dict, text: str) -> None:
    assert result.get("error_code") == "invalid_input", result
    assert "adapter" in result["error"] and text in result["error"], result["error"]


def _loaded(worker: Worker) -> int:
    return sum(len(v) for v in worker.engine("musetalk")._adapters.values())


# ----------------------------------------------------------------------------- the adapter file alone

def test_the_tensor_file_alone_describes_the_adapter(lora, fixture_models, tmp_path):
    file = lora / adapters.ADAPTER_FILE
    from_file, from_folder = adapters.read_adapter_info(file), adapters.read_adapter_info(lora)
    assert (from_file.rank, from_file.alpha, tuple(from_file.target_modules)) == (4, 8.0, adapters.TARGET_MODULES)
    assert (from_file.rank, from_file.alpha, from_file.base, from_file.tensors_sha256) == \
        (from_folder.rank, from_folder.alpha, from_folder.base, from_folder.tensors_sha256)
    assert from_file.base == base_files(fixture_models)
    # Without the description in its header a lone file is refused, never guessed from the shapes.
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(LipSyncError, match="adapter: .*does not describe an adapter"):
        adapters.read_adapter_info(bare)


# ----------------------------------------------------------------------------- jobs

def test_jobs_with_and_without_an_adapter_alternate_and_the_base_stays_bit_identical(
        worker, job, lora, fixture_models, http_server, tmp_path):
    data = (lora / adapters.ADAPTER_FILE).read_bytes()
    inline = dict(job, adapter={"url": _data_url(data), "sha256": _sha(data)})
    served = dict(job, adapter={"url": http_server.add("/lora/adapter.safetensors", data), "sha256": _sha(data).upper()})

    with_inline = _video(worker, inline, tmp_path, "inline")
    loaded = _loaded(worker)
    plain_after = _video(worker, job, tmp_path, "plain1")
    with_served = _video(worker, served, tmp_path, "served")
    plain_again = _video(worker, job, tmp_path, "plain2")
    assert http_server.hits["/lora/adapter.safetensors"] == 1
    assert _loaded(worker) == loaded  # the second adapter job took it from the cache

    fresh = Worker.start(_settings(fixture_models, tmp_path / "fresh-scratch"))
    (tmp_path / "fresh-scratch").mkdir(exist_ok=True)
    base = _video(fresh, job, tmp_path, "fresh")
    assert plain_after == base and plain_again == base
    assert with_inline == with_served and with_inline != base


def test_the_cache_keeps_a_few_adapters_and_drops_the_least_recently_used(worker, job, fixture_models, tmp_path,
                                                                          monkeypatch):
    from musetalk_worker.engines.musetalk import pipeline

    monkeypatch.setattr(pipeline, "ADAPTER_CACHE_SIZE", 2)
    engine = worker.engine("musetalk")
    digests = []
    for seed in (11, 12, 13):
        data = make_adapter(fixture_models, tmp_path / f"lora{seed}", seed=seed).read_bytes()
        digests.append(_sha(data))
        _video(worker, dict(job, adapter={"url": _data_url(data), "sha256": digests[-1]}), tmp_path, f"s{seed}")
    kept = [d for cache in engine._adapters.values() for d in cache]
    assert kept == digests[1:]
    unet = next(iter(engine._unets.values()))
    assert set(unet.peft_config) == {f"job_{d[:16]}" for d in digests[1:]}


def test_a_wrong_hash_a_corrupted_file_and_other_base_weights_are_invalid_input(
        worker, job, lora, fixture_models, tmp_path):
    data = (lora / adapters.ADAPTER_FILE).read_bytes()
    _failure(worker.run(dict(job, adapter={"url": _data_url(data), "sha256": "0" * 64}), "wrong"),
             "not the job's")
    corrupted = bytearray(data)
    corrupted[100:140] = b"\xff" * 40  # inside the JSON header
    corrupted = bytes(corrupted)
    _failure(worker.run(dict(job, adapter={"url": _data_url(corrupted), "sha256": _sha(corrupted)}), "corrupt"),
             "not a readable safetensors file")
    truncated = data[: len(data) // 2]
    _failure(worker.run(dict(job, adapter={"url": _data_url(truncated), "sha256": _sha(truncated)}), "cut"),
             "adapter")
    other = make_adapter(fixture_models, tmp_path / "other",
                         base={**base_files(fixture_models), "musetalkV15/unet.pth": "1" * 64}).read_bytes()
    _failure(worker.run(dict(job, adapter={"url": _data_url(other), "sha256": _sha(other)}), "other"),
             "other base weights")
    v1 = make_adapter(fixture_models, tmp_path / "v1",
                      base={"musetalk/musetalk.json": "2" * 64, "musetalk/pytorch_model.bin": "3" * 64}).read_bytes()
    _failure(worker.run(dict(job, adapter={"url": _data_url(v1), "sha256": _sha(v1)}), "v1"), "other base weights")
    _failure(worker.run(dict(job, adapter={"url": "ftp://example.com/a", "sha256": "0" * 64}), "scheme"),
             "unsupported scheme")
    # Tensors of other shapes under the right description: refused, and nothing of it stays on the UNet.
    with safe_open(str(lora / adapters.ADAPTER_FILE), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tensors[first] = torch.zeros(tensors[first].shape[0] + 1, *tensors[first].shape[1:])
    save_file(tensors, str(tmp_path / "misfit.safetensors"), metadata=header)
    misfit = (tmp_path / "misfit.safetensors").read_bytes()
    _failure(worker.run(dict(job, adapter={"url": _data_url(misfit), "sha256": _sha(misfit)}), "misfit"),
             "does not fit this UNet")
    unets = worker.engine("musetalk")._unets.values()
    assert not any(f"job_{_sha(misfit)[:16]}" in getattr(u, "peft_config", {}) for u in unets)
    assert list(worker.settings.temp_dir.iterdir()) == []


def test_an_adapter_with_model_latentsync_is_refused(worker, job, lora, tmp_path):
    data = (lora / adapters.ADAPTER_FILE).read_bytes()
    latentsync = {k: v for k, v in job.items() if k != "fps"}
    result = worker.run(dict(latentsync, model="latentsync", adapter={"url": _data_url(data), "sha256": _sha(data)}),
                        "ls")
    _failure(result, "model 'musetalk' only")
    assert result["stage"] == "validate"
    # The engine refuses too, before it looks at anything else.
    with pytest.raises(LipSyncError, match="'adapter' works with model 'musetalk' only") as error:
        LatentSyncPipeline.__call__(object(), tmp_path / "s.mp4", tmp_path / "a.wav", tmp_path / "o.mp4",
                                    adapter=lora)
    assert error.value.code.value == "invalid_input"


def test_a_compiled_unet_refuses_adapters(worker, job, lora, monkeypatch):
    engine = worker.engine("musetalk")
    monkeypatch.setattr(engine, "acceleration", dataclasses.replace(engine.acceleration, compile="default"))
    data = (lora / adapters.ADAPTER_FILE).read_bytes()
    _failure(worker.run(dict(job, adapter={"url": _data_url(data), "sha256": _sha(data)}), "compiled"),
             "torch.compile")


# ----------------------------------------------------------------------------- the CLI

def test_cli_adapter_takes_a_folder_or_the_file(worker, job, lora, media_dir, speech, fixture_models, tmp_path,
                                                capsys):
    data = (lora / adapters.ADAPTER_FILE).read_bytes()
    expected = _video(worker, dict(job, adapter={"url": _data_url(data), "sha256": _sha(data)}), tmp_path, "job")
    common = ["--source", str(media_dir / "monalisa.png"), "--audio", str(speech), "--models", str(fixture_models),
              "--device", "cpu", "--landmarks", "dlib", "--fps", "5"]
    for name, path in (("folder", lora), ("file", lora / adapters.ADAPTER_FILE)):
        out = tmp_path / f"cli-{name}.mp4"
        assert cli.main([*common, "--out", str(out), "--adapter", str(path)]) == 0, capsys.readouterr().err
        assert _frames(out) == expected, name
    assert cli.main([*common[:-2], "--out", str(tmp_path / "x.mp4"), "--model", "latentsync", "--adapter",
                     str(lora)]) == 2
    assert "'adapter' works with model 'musetalk' only" in capsys.readouterr().err
    assert cli.main([*common, "--out", str(tmp_path / "y.mp4"), "--adapter", str(tmp_path / "missing")]) == 2
    assert "adapter:" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the training job

@pytest.fixture(scope="module")
def talking(media_dir, tmp_path_factory) -> Path:
    """0.6 s of the face video with speech, at a third of its size."""
    path = tmp_path_factory.mktemp("talking") / "talk.mp4"
    _ffmpeg("-i", str(media_dir / "yongen.mp4"), "-i", str(media_dir / "eng.wav"), "-map", "0:v", "-map", "1:a",
            "-t", "0.6", "-vf", "scale=234:-2", "-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", str(path))
    return path


def test_a_training_job_reports_each_evaluation_and_uploads_an_adapter_a_job_can_use(
        worker, job, talking, http_server, moto_s3, tmp_path):
    moto_s3.bucket("adapters")
    output = {"bucket": "adapters", "prefix": "lora/", "credentials": {
        "access_key_id": MOTO_KEY_ID, "secret_access_key": MOTO_SECRET, "endpoint_url": moto_s3.endpoint,
        "region": "us-east-1"}}
    updates = []
    train = {"task": "train_adapter", "videos": [http_server.add("/talk.mp4", talking.read_bytes())],
             "steps": 2, "rank": 2, "batch": 1, "lr": 0.05, "eval_every": 1, "output": output}
    result = worker.run(train, "train-1", updates.append)
    assert "error" not in result, result
    assert [u["step"] for u in updates if u.get("stage") == "train" and "step" in u] == [0, 1, 2]
    assert all("mouth_l1" in u["eval"] for u in updates if "step" in u)
    assert (result["delivery"], result["key"]) == ("s3", "lora/train-1.safetensors")
    assert result["steps"] == 2 and result["clips"] == 1 and result["frames"] > 0
    assert set(result["eval"]) == {"before", "after"} and (result["rank"], result["alpha"]) == (2, 2.0)
    data = requests.get(result["adapter_url"], timeout=30).content
    assert _sha(data) == result["adapter_sha256"] and len(data) == result["size_bytes"]
    assert adapters.read_adapter_info(_write(tmp_path / "trained.safetensors", data)).rank == 2
    assert list(worker.settings.temp_dir.iterdir()) == []

    # The uploaded adapter by its s3:// address (the job's credentials) and inline give the same video.
    plain = _video(worker, job, tmp_path, "plain")
    tuned = _video(worker, dict(job, adapter={"url": _data_url(data), "sha256": result["adapter_sha256"]}), tmp_path,
                   "tuned")
    assert tuned != plain
    from_s3 = worker.run(dict(job, output=output, adapter={"url": "s3://adapters/lora/train-1.safetensors",
                                                           "sha256": result["adapter_sha256"]}), "from-s3")
    assert "error" not in from_s3, from_s3
    video = _write(tmp_path / "from-s3.mp4", requests.get(from_s3["video_url"], timeout=30).content)
    assert _frames(video) == tuned


def test_an_adapter_is_delivered_inline_or_to_the_output_folder(lora, tmp_path):
    from musetalk_worker.upload import DeliveryPlan
    from musetalk_worker.training_job import deliver_adapter

    settings = WorkerSettings(models_dir=tmp_path, output_dir=None)
    data = (lora / adapters.ADAPTER_FILE).read_bytes()
    inline = deliver_adapter(_write(tmp_path / "a.safetensors", data), DeliveryPlan(kind="inline"), settings)
    assert inline["delivery"] == "inline" and base64.b64decode(inline["adapter_base64"]) == data
    target = tmp_path / "out" / "job.safetensors"
    local = deliver_adapter(_write(tmp_path / "b.safetensors", data), DeliveryPlan(kind="local_file",
                                                                                     local_path=target), settings)
    assert local == {"delivery": "local_file", "adapter_path": str(target)} and target.read_bytes() == data
    small = dataclasses.replace(settings, max_inline_result_bytes=10)
    with pytest.raises(LipSyncError, match="the adapter is .* MB, more than"):
        deliver_adapter(_write(tmp_path / "c.safetensors", data), DeliveryPlan(kind="inline"), small)


def test_a_bad_training_job_is_refused_before_any_work(worker, job):
    result = worker.run({"task": "train_adapter", "videos": [], "steps": 0, "stream": 1}, "bad")
    assert result["error_code"] == "invalid_input" and result["stage"] == "validate"
    for text in ("unknown key 'stream'", "'videos' is []", "'steps' is 0; it must be a whole number from 1"):
        assert text in result["error"], result["error"]
    result = worker.run({"task": "train_adapter", "videos": [job["audio"]], "steps": 1}, "audio-only")
    assert (result["error_code"], result["stage"]) == ("unsupported_media", "probe"), result
    assert "'videos.0' is audio without a picture" in result["error"]
    assert worker.run({**job, "task": "paint"}, "x")["error"].startswith("Invalid job input: 'task' is 'paint'")
    assert "error" not in worker.run({**job, "task": "lipsync"}, "lipsync")


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_converted_unet_answers_for_the_file_it_was_converted_from(fixture_models, tmp_path):
    from types import SimpleNamespace

    from musetalk_worker.engines.musetalk.pipeline import MuseTalkPipeline
    from musetalk_worker.weights import CONVERSIONS_FILE

    folder = tmp_path / "models" / "musetalkV15"
    folder.mkdir(parents=True)
    (folder / "musetalk.json").write_bytes((fixture_models / "musetalkV15" / "musetalk.json").read_bytes())
    (folder / "unet.safetensors").write_bytes(b"converted")
    (tmp_path / "models" / CONVERSIONS_FILE).write_text(json.dumps({"musetalkV15/unet.safetensors": {
        "size": 9, "sha256": "c" * 64, "source_path": "musetalkV15/unet.pth", "source_sha256": "d" * 64}}))
    hashes = MuseTalkPipeline._base_hashes(SimpleNamespace(models_dir=tmp_path / "models"), "v15")
    assert hashes == {"musetalkV15/musetalk.json": adapters.sha256_file(folder / "musetalk.json"),
                      "musetalkV15/unet.safetensors": "c" * 64, "musetalkV15/unet.pth": "d" * 64}
