"""The job schema: same fields and defaults as MuseTalkOptions, strict types, clear messages."""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
from pathlib import Path

import pytest

from musetalk_worker.errors import ErrorCode, LipSyncError
from musetalk_worker.options import (
    ENGINE_OPTIONS, LIMITS, STREAM_LIMITS, VIDEO_CODECS, LatentSyncOptions, MuseTalkOptions, StreamOptions,
    WorkerSettings,
)
from musetalk_worker.schema import JobInput, StreamSpec, engine_field_names, parse_job

GOOD = {"source": "https://example.com/face.mp4", "audio": "https://example.com/speech.wav"}


def _error(raw) -> str:
    with pytest.raises(LipSyncError) as info:
        parse_job(raw).engine_options()
    assert info.value.code is ErrorCode.INVALID_INPUT
    assert info.value.stage == "validate"
    return info.value.message


def test_engine_fields_match_engine_options():
    # Nothing is deliberately left out: every option of every model (boxes included) is a job field.
    fields = {f.name for cls in ENGINE_OPTIONS.values() for f in dataclasses.fields(cls)}
    assert set(engine_field_names()) == fields


def test_defaults_are_the_engine_defaults():
    job = parse_job(dict(GOOD))
    assert job.engine_options() == MuseTalkOptions()
    assert job.output is None


def test_ranges_come_from_limits():
    for name, (low, high) in LIMITS.items():
        constraints = {type(m).__name__: m for m in JobInput.model_fields[name].metadata}
        assert constraints["Ge"].ge == low and constraints["Le"].le == high, name


def test_full_job_is_accepted():
    raw = dict(GOOD, version="v1", bbox_shift=-7, extra_margin=0, parsing_mode="neck", left_cheek_width=80,
               right_cheek_width=70, batch_size=4, fps=30, fp16=True, crf=23, boxes=[[1, 2, 30, 40]],
               output={"bucket": "results", "prefix": "clips/", "expires_in": 3600,
                       "credentials": {"access_key_id": "AK", "secret_access_key": "SK", "region": "eu-west-1"}})
    job = parse_job(raw)
    options = job.engine_options()
    assert (options.version, options.bbox_shift, options.fps, options.boxes) == ("v1", -7, 30.0, ((1, 2, 30, 40),))
    assert job.output.credentials.secret_access_key.get_secret_value() == "SK"


def test_unknown_key_lists_allowed_keys():
    message = _error(dict(GOOD, face="x.mp4"))
    assert "unknown key 'face'" in message
    assert "allowed keys: source, avatar_id, audio, model, version, bbox_shift" in message and "output" in message


def test_unknown_nested_key_names_its_parent():
    message = _error(dict(GOOD, output={"bucket": "abc", "acl": "public-read"}))
    assert "unknown key 'acl' in 'output'; allowed keys: bucket, key, prefix, expires_in, credentials" in message


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("batch_size", "8", "'batch_size' is '8'; it must be a whole number from 1 to 256"),
        ("batch_size", True, "'batch_size' is True; it must be a whole number from 1 to 256"),
        ("batch_size", 0, "'batch_size' is 0; it must be a whole number from 1 to 256"),
        ("crf", 52, "'crf' is 52; it must be a whole number from 0 to 51"),
        ("bbox_shift", 2.5, "'bbox_shift' is 2.5; it must be a whole number from -100 to 100"),
        ("fps", 0.5, "'fps' is 0.5; it must be a number from 1.0 to 120.0"),
        ("fp16", "yes", "'fp16' is 'yes'; it must be true or false"),
        ("version", "v2", "'version' is 'v2'; model 'musetalk' has the versions v15, v1"),
        ("parsing_mode", "chin", "'parsing_mode' is 'chin'; it must be one of jaw, raw, neck"),
        ("boxes", [[1, 2, 3]], "'boxes' is [[1, 2, 3]]; it must be a list of face boxes"),
        ("boxes", [[5, 5, 1, 1]], "'boxes' is [5, 5, 1, 1]; it must be 0 <= x1 < x2 and 0 <= y1 < y2"),
        ("source", 42, "'source' is 42; it must be a face video or still image given as an https://"),
    ],
)
def test_bad_values_name_field_and_range(field, value, expected):
    assert expected in _error(dict(GOOD, **{field: value}))


def test_missing_inputs_say_what_to_send():
    message = _error({"audio": GOOD["audio"]})
    assert "'source' is required: a face video or still image given as an https:// or http:// URL, " \
           "an s3://bucket/key object or a data: URI" in message


def test_every_problem_is_reported_at_once():
    message = _error({"source": "a", "audio": "b", "crf": -1, "fps": "fast", "colour": 1})
    for part in ("unknown key 'colour'", "'crf' is -1", "'fps' is 'fast'"):
        assert part in message


def test_key_and_prefix_are_exclusive():
    assert "has both 'key' and 'prefix'" in _error(dict(GOOD, output={"key": "a.mp4", "prefix": "b/"}))


def test_presign_lifetime_is_bounded():
    assert "'output.expires_in' is 604801; it must be a whole number of seconds from 1 to 604800" in _error(
        dict(GOOD, output={"expires_in": 604801})
    )


def test_credentials_are_never_echoed():
    secret = "wJalrXUtnFEMI-not-a-real-key"
    raw = dict(GOOD, output={"credentials": {"access_key_id": 12345, "secret_access_key": secret, "bogus": secret}})
    message = _error(raw)
    assert "'output.credentials.access_key_id' is not a string (value hidden)" in message
    assert "unknown key 'bogus' in 'output.credentials'" in message
    assert secret not in message and "12345" not in message
    job = parse_job(dict(GOOD, output={"credentials": {"access_key_id": "AKIA-X", "secret_access_key": secret}}))
    assert secret not in repr(job) and secret not in str(job.model_dump())


def test_input_must_be_an_object():
    assert "must be a JSON object with the keys source, avatar_id, audio" in _error(["source", "audio"])


def test_long_values_are_cut_short_in_messages():
    message = _error(dict(GOOD, parsing_mode="x" * 5000))
    assert len(message) < 400


# ----------------------------------------------------------------------------- the job examples shipped in the repo

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_jobs_are_valid():
    jobs = [json.loads((ROOT / "test_input.json").read_text())["input"]]
    jobs += [t["input"] for t in json.loads((ROOT / ".runpod" / "tests.json").read_text())["tests"]]
    for job in jobs:
        parse_job(job).engine_options()


def test_hub_json_follows_the_hub_format():
    hub = json.loads((ROOT / ".runpod" / "hub.json").read_text())
    assert {"title", "description", "type", "category", "config"} <= set(hub)
    assert hub["type"] == "serverless" and hub["category"] in ("audio", "embedding", "language", "video", "image")
    config = hub["config"]
    assert config["runsOn"] == "GPU" and config["gpuCount"] == 1
    # The image's torch wheels are built for CUDA 13.0: older host drivers would show no GPU.
    cuda = re.search(r"ARG CUDA_VERSION=(\d+\.\d+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert all(float(v) >= float(cuda) for v in config["allowedCudaVersions"])
    reads = inspect.getsource(WorkerSettings.from_env)
    for item in config["env"]:
        assert f'"{item["key"]}"' in reads, f"{item['key']} is not a setting the worker reads"
        assert {"name", "type", "description", "default"} <= set(item["input"])


def test_worker_settings_from_environment(tmp_path):
    settings = WorkerSettings.from_env({
        "MUSETALK_MAX_AUDIO_SECONDS": "90", "MUSETALK_MAX_DOWNLOAD_BYTES": "1000",
        "MUSETALK_ALLOW_PRIVATE_URLS": "true",
        "MUSETALK_LOCAL_INPUT_DIR": str(tmp_path), "BUCKET_NAME": "results", "BUCKET_SECRET_ACCESS_KEY": "s3cr3t-value",
        "MUSETALK_DEVICE": "CPU", "RUNPOD_WEBHOOK_GET_JOB": "https://api.runpod.ai/v2/e/job-take/$RUNPOD_POD_ID",
        "MUSETALK_VIDEO_ENCODER": "H264_NVENC",
    })
    assert settings.video_encoder == "h264_nvenc"
    assert (settings.max_audio_s, settings.max_download_bytes, settings.allow_private_urls) == (90.0, 1000, True)
    assert (settings.local_input_dir, settings.bucket_name, settings.device) == (tmp_path, "results", "cpu")
    assert settings.output_dir is None  # on RunPod: no local output folder
    assert "s3cr3t-value" not in repr(settings)
    local = WorkerSettings.from_env({})
    assert local.output_dir == ROOT / "outputs" and local.models_dir == ROOT / "models"
    assert local.video_encoder == "auto"
    # Every value the encoder knows is a valid setting.
    parsed = [WorkerSettings.from_env({"MUSETALK_VIDEO_ENCODER": c}).video_encoder for c in VIDEO_CODECS]
    assert parsed == list(VIDEO_CODECS)
    assert local == dataclasses.replace(WorkerSettings(), output_dir=ROOT / "outputs")
    for name, value in [("MUSETALK_MAX_AUDIO_SECONDS", "-5"), ("MUSETALK_DEVICE", "gpu"),
                        ("MUSETALK_ALLOW_PRIVATE_URLS", "maybe"), ("MUSETALK_PRESIGN_SECONDS", "604801"),
                        ("MUSETALK_VIDEO_ENCODER", "nvenc")]:
        with pytest.raises(ValueError, match=name):
            WorkerSettings.from_env({name: value})


@pytest.mark.parametrize("stream, expected", [
    (True, StreamOptions()),
    (False, None),
    ({"segment_seconds": 2, "first_segment_seconds": 0, "low_latency_encoder": False},
     StreamOptions(segment_seconds=2.0, first_segment_seconds=0.0, low_latency_encoder=False)),
])
def test_output_stream_is_a_flag_or_an_object(stream, expected):
    job = parse_job(dict(GOOD, output={"bucket": "results", "stream": stream}))
    assert job.output.stream_options() == expected


@pytest.mark.parametrize("stream, expected", [
    ("yes", "'output.stream' is 'yes'; it must be true, false, or an object with format, segment_seconds"),
    ({"segment_seconds": 0.1}, "'output.stream.segment_seconds' is 0.1; it must be a number of seconds from 0.5 to 4"),
    ({"format": "dash"}, "'output.stream.format' is 'dash'; it must be one of hls"),
    ({"latency": 1}, "unknown key 'latency' in 'output.stream'; allowed keys: format, segment_seconds"),
])
def test_bad_stream_options_name_the_field(stream, expected):
    assert expected in _error(dict(GOOD, output={"bucket": "results", "stream": stream}))


def test_stream_limits_come_from_the_options():
    for name, (low, high) in STREAM_LIMITS.items():
        constraints = {type(m).__name__: m for m in StreamSpec.model_fields[name].metadata}
        assert constraints["Ge"].ge == low and constraints["Le"].le == high, name
    assert {f.name for f in dataclasses.fields(StreamOptions)} == set(StreamSpec.model_fields)


def test_restore_options_are_checked_and_refused_where_they_cannot_work():
    base = {"source": "https://example.com/a.mp4", "audio": "https://example.com/a.wav"}
    job = parse_job({**base, "restore": True, "restore_weight": 1, "restore_region": "mouth"})
    assert job.engine_options() == MuseTalkOptions(restore=True, restore_weight=1.0, restore_region="mouth")
    assert parse_job(base).engine_options().restore is False
    assert "'restore_weight' is 1.2; it must be a number from 0.0 to 1.0" in _error({**base, "restore_weight": 1.2})
    assert "'restore_region' is 'eyes'; it must be one of face, mouth" in _error({**base, "restore_region": "eyes"})
    assert "'restore' is 'yes'; it must be true or false" in _error({**base, "restore": "yes"})
    # LatentSync takes them too.
    ls = parse_job({**base, "model": "latentsync", "restore": True, "restore_region": "mouth"}).engine_options()
    assert ls == LatentSyncOptions(restore=True, restore_region="mouth")
    assert "'restore' cannot be used with 'boxes'" in _error({**base, "restore": True, "boxes": [[0, 0, 10, 10]]})


def test_restore_dtype_and_batch_come_from_the_environment():
    settings = WorkerSettings.from_env({"MUSETALK_RESTORE_DTYPE": "bfloat16", "MUSETALK_RESTORE_BATCH": "4"})
    assert (settings.acceleration.restore_dtype, settings.acceleration.restore_batch) == ("bfloat16", 4)
    assert WorkerSettings.from_env({}).acceleration.restore_dtype == "float32"
    with pytest.raises(ValueError, match="MUSETALK_RESTORE_DTYPE"):
        WorkerSettings.from_env({"MUSETALK_RESTORE_DTYPE": "float16"})


def test_adapter_is_a_url_and_its_sha256_for_musetalk_only():
    digest = "AB" * 32
    job = parse_job(dict(GOOD, adapter={"url": "https://example.com/a.safetensors", "sha256": digest}))
    assert job.adapter.sha256 == digest.lower() and "adapter" not in engine_field_names()
    assert job.engine_options() == MuseTalkOptions()
    assert "'adapter.sha256' is 'abc'; it must be the SHA-256" in _error(dict(GOOD, adapter={"url": "x", "sha256": "abc"}))
    assert "'adapter.sha256' is required" in _error(dict(GOOD, adapter={"url": "x"}))
    assert "'adapter' is 'x'; it must be an object with 'url'" in _error(dict(GOOD, adapter="x"))
    assert "unknown key 'name' in 'adapter'; allowed keys: url, sha256" in _error(
        dict(GOOD, adapter={"url": "x", "sha256": digest, "name": "n"}))
    message = _error(dict(GOOD, model="latentsync", adapter={"url": "x", "sha256": digest}))
    assert "'adapter' works with model 'musetalk' only" in message


def test_a_training_task_is_its_own_schema():
    from musetalk_worker.schema import TrainAdapterInput, parse_task

    job = parse_task({"task": "train_adapter", "videos": ["https://example.com/a.mp4"], "steps": 300, "rank": 8,
                      "alpha": 16.0, "output": {"bucket": "adapters"}})
    assert isinstance(job, TrainAdapterInput)
    options = job.fit_options()
    assert (options.steps, options.rank, options.alpha, options.batch, options.full) == (300, 8, 16.0, 4, False)
    assert parse_task(dict(GOOD)) == parse_job(dict(GOOD)) == parse_task(dict(GOOD, task="lipsync"))
    with pytest.raises(LipSyncError) as error:
        parse_task({"task": "train_adapter", "videos": ["x"] * 33, "steps": 1, "rank": 0, "fps": 5})
    message = error.value.message
    assert "unknown key 'fps'; allowed keys: task, videos, version, steps, rank" in message
    assert "'videos' is" in message and "a list of 1 to 32" in message
    assert "'rank' is 0; it must be a whole number from 1 to 128" in message
    with pytest.raises(LipSyncError, match="'output.stream' is for lip-sync jobs"):
        parse_task({"task": "train_adapter", "videos": ["x"], "steps": 1, "output": {"bucket": "bkt", "stream": True}})
    with pytest.raises(LipSyncError, match="'task' is 'paint'; it must be one of lipsync, train_adapter"):
        parse_task(dict(GOOD, task="paint"))
    # A lip-sync job's own parser knows no task (the CLI and the local HTTP API run lip-sync only).
    assert "unknown key 'task'" in _error(dict(GOOD, task="train_adapter"))
