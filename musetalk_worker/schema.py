"""The job input of the serverless worker, validated before any work is done.

``parse_job`` turns RunPod's ``job["input"]`` into a ``JobInput`` or raises one
``invalid_input`` error listing every problem: each names the field and what is
allowed, and an unknown key comes with the list of allowed keys. The engine
options are the fields of the job's model's options class
(:class:`~musetalk_worker.options.MuseTalkOptions` or
:class:`~musetalk_worker.options.LatentSyncOptions`), with its defaults and the
ranges of ``LIMITS``; an option of the other model is refused by name. Types are strict: ``"8"`` is not a
number and ``true`` is not ``1`` (RunPod's own validator lets bools pass as ints).
Credential values never appear in a message.

``adapter`` (``{"url", "sha256"}``, MuseTalk only) names a LoRA adapter file for the
job. ``parse_task`` is the worker's entry: a job with ``"task": "train_adapter"``
is a :class:`TrainAdapterInput` (videos and fit options), any other a lip-sync job.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ErrorCode, LipSyncError
from .options import (
    AVATAR_ID_PATTERN, ENGINE_OPTIONS, LATENTSYNC_VERSIONS, LIMITS, MODELS, PARSING_MODES, RESTORE_REGIONS,
    STREAM_FORMATS, STREAM_LIMITS, VERSIONS, JobOptions, LatentSyncOptions, MuseTalkOptions, ParsingMode,
    RestoreRegion, StreamOptions,
)

_DEFAULTS = MuseTalkOptions()
_LATENTSYNC = LatentSyncOptions()
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer

# Fields that are not engine options; everything else in JobInput is one.
NON_ENGINE_FIELDS = ("source", "avatar_id", "audio", "model", "adapter", "output")
# Each model's versions, and the options each model takes (the fields of its options class).
MODEL_VERSIONS = {"musetalk": VERSIONS, "latentsync": LATENTSYNC_VERSIONS}
_MODEL_FIELDS = {model: {f.name for f in dataclasses.fields(cls)} for model, cls in ENGINE_OPTIONS.items()}
# Engine options that shape the prepared source: a job naming an avatar gets the avatar's.
PREPARATION_FIELDS = ("bbox_shift", "extra_margin", "parsing_mode", "left_cheek_width", "right_cheek_width", "boxes")
_STREAM_DEFAULTS = StreamOptions()

_MEDIA_FORMS = "an https:// or http:// URL, an s3://bucket/key object or a data: URI with base64 content"
_STRICT = ConfigDict(extra="forbid", strict=True, hide_input_in_errors=True)


def _ranged(name: str, limits: dict = LIMITS, defaults: Any = _DEFAULTS) -> Any:
    """A field with the options' default (MuseTalkOptions unless told) and its inclusive range."""
    low, high = limits[name]
    return Field(default=getattr(defaults, name), ge=low, le=high)


class Refusal(ValueError):
    """A validator's complaint that is already a whole sentence for the caller."""


class S3Credentials(BaseModel):
    """Per-job S3 credentials; they are used for this job only and never echoed."""

    model_config = _STRICT

    access_key_id: SecretStr
    secret_access_key: SecretStr
    session_token: Optional[SecretStr] = None
    endpoint_url: Optional[str] = None
    region: Optional[str] = None


class StreamSpec(BaseModel):
    """``output.stream`` as an object: HLS while the video is made (see :class:`StreamOptions`)."""

    model_config = _STRICT

    format: Literal[STREAM_FORMATS] = _STREAM_DEFAULTS.format
    segment_seconds: float = _ranged("segment_seconds", STREAM_LIMITS, _STREAM_DEFAULTS)
    first_segment_seconds: float = _ranged("first_segment_seconds", STREAM_LIMITS, _STREAM_DEFAULTS)
    low_latency_encoder: bool = _STREAM_DEFAULTS.low_latency_encoder


class OutputSpec(BaseModel):
    """Where the result goes; unset fields fall back to the worker's settings."""

    model_config = _STRICT

    bucket: Optional[str] = Field(default=None, min_length=3, max_length=63)
    key: Optional[str] = Field(default=None, min_length=1, max_length=1024)
    prefix: Optional[str] = Field(default=None, max_length=900)
    expires_in: Optional[int] = Field(default=None, ge=1, le=MAX_PRESIGN_SECONDS)
    credentials: Optional[S3Credentials] = None
    stream: Optional[StreamSpec] = None

    @field_validator("stream", mode="before")
    @classmethod
    def _stream_flag(cls, value: Any) -> Any:
        # ``true`` asks for the defaults, ``false`` for no stream.
        if value is True:
            return {}
        return None if value is False else value

    @model_validator(mode="after")
    def _key_or_prefix(self) -> "OutputSpec":
        if self.key is not None and self.prefix is not None:
            raise Refusal(
                "'output' has both 'key' and 'prefix': give one (an exact key, or a prefix for a generated key)."
            )
        return self

    def stream_options(self) -> Optional[StreamOptions]:
        """What ``stream`` asks for, or None for no stream."""
        return None if self.stream is None else StreamOptions(**self.stream.model_dump())


class AdapterSpec(BaseModel):
    """``adapter``: a LoRA adapter file (``adapter.safetensors``, self-describing) and its SHA-256."""

    model_config = _STRICT

    url: str = Field(min_length=1)
    sha256: str = Field(pattern=r"^[0-9a-fA-F]{64}$")

    @field_validator("sha256")
    @classmethod
    def _lower(cls, value: str) -> str:
        return value.lower()


class JobInput(BaseModel):
    """One lip-sync job: the two media inputs, the engine options and the output."""

    model_config = _STRICT

    source: Optional[str] = Field(default=None, min_length=1)
    avatar_id: Optional[str] = Field(default=None, pattern=AVATAR_ID_PATTERN)
    audio: str = Field(min_length=1)
    model: Literal[MODELS] = "musetalk"
    # The model's own default when absent; checked against the model in _per_model.
    version: Optional[str] = None
    bbox_shift: int = _ranged("bbox_shift")
    extra_margin: Optional[int] = _ranged("extra_margin")
    parsing_mode: Optional[ParsingMode] = _DEFAULTS.parsing_mode
    left_cheek_width: int = _ranged("left_cheek_width")
    right_cheek_width: int = _ranged("right_cheek_width")
    batch_size: int = _ranged("batch_size")
    fps: float = _ranged("fps")
    fp16: bool = _DEFAULTS.fp16
    crf: int = _ranged("crf")
    boxes: Optional[list[Annotated[list[int], Field(min_length=4, max_length=4)]]] = Field(
        default=None, min_length=1
    )
    steps: int = _ranged("steps", defaults=_LATENTSYNC)
    guidance: float = _ranged("guidance", defaults=_LATENTSYNC)
    seed: int = _ranged("seed", defaults=_LATENTSYNC)
    deepcache: bool = _LATENTSYNC.deepcache
    restore: bool = _DEFAULTS.restore
    restore_weight: float = _ranged("restore_weight")
    restore_region: RestoreRegion = _DEFAULTS.restore_region
    adapter: Optional[AdapterSpec] = None
    output: Optional[OutputSpec] = None

    @model_validator(mode="after")
    def _per_model(self) -> "JobInput":
        foreign = [name for name in engine_field_names() if name in self.model_fields_set
                   and name not in _MODEL_FIELDS[self.model]]
        if foreign:
            names = ", ".join(f"'{name}'" for name in foreign)
            owners = sorted({m for m, fields in _MODEL_FIELDS.items() for name in foreign if name in fields})
            raise Refusal(f"{names} {'are not options' if len(foreign) > 1 else 'is not an option'} of model "
                          f"'{self.model}' (only of {', '.join(repr(m) for m in owners) or 'no model'}). Leave "
                          f"{'them' if len(foreign) > 1 else 'it'} out, or set 'model' to the model meant.")
        versions = MODEL_VERSIONS[self.model]
        if self.version is not None and self.version not in versions:
            raise Refusal(f"'version' is {self.version!r}; model '{self.model}' has the versions "
                          f"{', '.join(versions)} (default {versions[0]}).")
        if self.model != "musetalk" and self.adapter is not None:
            raise Refusal(f"'adapter' works with model 'musetalk' only (LoRA adapters are fitted on MuseTalk's "
                          f"UNet); leave it out for model '{self.model}'.")
        return self

    @model_validator(mode="after")
    def _source_or_avatar(self) -> "JobInput":
        if self.source is None and self.avatar_id is None:
            raise Refusal(f"'source' is required: {_ALLOWED['source']} (or 'avatar_id': {_ALLOWED['avatar_id']}).")
        if self.source is not None and self.avatar_id is not None:
            raise Refusal("'source' and 'avatar_id' were both given: give one, the source to prepare or the id of "
                          "one prepared before.")
        shaping = [name for name in PREPARATION_FIELDS if name in self.model_fields_set]
        if self.avatar_id is not None and shaping:
            names = ", ".join(f"'{name}'" for name in shaping)
            raise Refusal(f"{names} cannot change with 'avatar_id': the avatar was prepared with its own. Leave "
                          f"{'them' if len(shaping) > 1 else 'it'} out, or send the 'source' to prepare it anew.")
        return self

    def engine_options(self) -> JobOptions:
        """The options object of the job's model (which checks what the schema cannot, e.g. box geometry)."""
        cls = ENGINE_OPTIONS[self.model]
        values = {name: getattr(self, name) for name in _MODEL_FIELDS[self.model] if name != "version"}
        return cls(**values) if self.version is None else cls(version=self.version, **values)


# A training job's bounds: a serverless job runs in one process, on one GPU.
MAX_TRAIN_VIDEOS = 32
TRAIN_LIMITS = {"steps": (1, 20_000), "rank": (1, 128), "batch": (1, 64), "seed": (0, 2**31 - 1)}


class TrainAdapterInput(BaseModel):
    """``"task": "train_adapter"``: prepare the videos, fit a LoRA (:func:`..train.fit.fit`), upload it."""

    model_config = _STRICT

    task: Literal["train_adapter"]
    videos: list[Annotated[str, Field(min_length=1)]] = Field(min_length=1, max_length=MAX_TRAIN_VIDEOS)
    version: Literal[VERSIONS] = "v15"
    steps: int = Field(ge=TRAIN_LIMITS["steps"][0], le=TRAIN_LIMITS["steps"][1])
    rank: int = Field(default=16, ge=TRAIN_LIMITS["rank"][0], le=TRAIN_LIMITS["rank"][1])
    alpha: Optional[float] = Field(default=None, gt=0, le=4096)
    lr: Optional[float] = Field(default=None, gt=0, le=1)
    batch: int = Field(default=4, ge=TRAIN_LIMITS["batch"][0], le=TRAIN_LIMITS["batch"][1])
    holdout: float = Field(default=0.2, gt=0, lt=1)
    eval_every: Optional[int] = Field(default=None, ge=1, le=TRAIN_LIMITS["steps"][1])
    seed: int = Field(default=0, ge=TRAIN_LIMITS["seed"][0], le=TRAIN_LIMITS["seed"][1])
    output: Optional[OutputSpec] = None

    @model_validator(mode="after")
    def _no_stream(self) -> "TrainAdapterInput":
        if self.output is not None and self.output.stream is not None:
            raise Refusal("'output.stream' is for lip-sync jobs; a training job uploads one adapter file.")
        return self

    def fit_options(self):
        """The :class:`~musetalk_worker.train.fit.FitOptions` this job asks for."""
        from .train.fit import FitOptions

        return FitOptions(steps=self.steps, rank=self.rank, alpha=self.alpha, lr=self.lr, batch=self.batch,
                          holdout=self.holdout, eval_every=self.eval_every, seed=self.seed, version=self.version)


TASKS = ("lipsync", "train_adapter")


def parse_task(raw: Any) -> "JobInput | TrainAdapterInput":
    """Validates a job of any task: ``"task": "train_adapter"`` is a training job, no ``task`` (or
    ``"lipsync"``) a lip-sync job (:func:`parse_job`).

    Raises:
        LipSyncError(invalid_input): every problem found, one sentence each.
    """
    task = raw.get("task") if isinstance(raw, dict) else None
    if task is None or task == "lipsync":
        return parse_job({k: v for k, v in raw.items() if k != "task"} if isinstance(raw, dict) else raw)
    if task != "train_adapter":
        raise _invalid([f"'task' is {_shown('task', raw)}; it must be one of {', '.join(TASKS)} (default lipsync)."])
    try:
        return TrainAdapterInput.model_validate(raw)
    except ValidationError as err:
        raise _invalid(_messages(err, raw, TrainAdapterInput, _TRAIN_ALLOWED)) from None


def engine_field_names() -> tuple[str, ...]:
    """Names of the JobInput fields that are engine options."""
    return tuple(name for name in JobInput.model_fields if name not in NON_ENGINE_FIELDS)


def parse_job(raw: Any) -> JobInput:
    """Validates RunPod's ``job["input"]``.

    Raises:
        LipSyncError(invalid_input): every problem found, one sentence each.
    """
    if not isinstance(raw, dict):
        raise _invalid([f"the job input must be a JSON object with the keys {_keys(JobInput)}"])
    try:
        job = JobInput.model_validate(raw)
    except ValidationError as err:
        raise _invalid(_messages(err, raw)) from None
    return job


# --------------------------------------------------------------------------- #
# Turning pydantic's errors into sentences that name the field and what is allowed.
# --------------------------------------------------------------------------- #

def _whole(name: str) -> str:
    low, high = LIMITS[name]
    return f"a whole number from {low} to {high}"


_ALLOWED = {
    "source": f"a face video or still image given as {_MEDIA_FORMS}",
    "avatar_id": "the avatar_id of an earlier job's result (40 hexadecimal digits)",
    "audio": f"speech audio (or a video with sound) given as {_MEDIA_FORMS}",
    "model": f"one of {', '.join(MODELS)}",
    "adapter": "an object with 'url' (the adapter.safetensors file as " + _MEDIA_FORMS + ") and 'sha256'",
    "adapter.url": f"the adapter.safetensors file as {_MEDIA_FORMS}",
    "adapter.sha256": "the SHA-256 of the adapter file (64 hexadecimal digits)",
    "version": "; ".join(f"for model {m}: {', '.join(v)}" for m, v in MODEL_VERSIONS.items()),
    "guidance": "a number from {} to {} (1.0: no guidance)".format(*LIMITS["guidance"]),
    "deepcache": "true or false",
    "restore": "true or false",
    "restore_weight": "a number from {} to {} (0: no change)".format(*LIMITS["restore_weight"]),
    "restore_region": f"one of {', '.join(RESTORE_REGIONS)}",
    "parsing_mode": f"one of {', '.join(PARSING_MODES)}, or null for the version's default",
    "fps": "a number from {} to {}".format(*LIMITS["fps"]),
    "fp16": "true or false",
    "boxes": "a list of face boxes [x1, y1, x2, y2] in whole pixels, one per source frame or a single one",
    "output": "an object with bucket, key or prefix, expires_in and credentials",
    "output.bucket": "an S3 bucket name (3 to 63 characters)",
    "output.key": "an object key (1 to 1024 characters)",
    "output.prefix": "a key prefix (up to 900 characters)",
    "output.expires_in": f"a whole number of seconds from 1 to {MAX_PRESIGN_SECONDS} (7 days)",
    "output.credentials": "an object with access_key_id, secret_access_key and optionally "
    "session_token, endpoint_url, region",
    "output.stream": "true, false, or an object with format, segment_seconds, first_segment_seconds and "
    "low_latency_encoder",
    "output.stream.format": f"one of {', '.join(STREAM_FORMATS)}",
    "output.stream.low_latency_encoder": "true or false",
    **{f"output.stream.{name}": f"a number of seconds from {low} to {high}"
       for name, (low, high) in STREAM_LIMITS.items()},
    **{name: _whole(name) for name, (low, _) in LIMITS.items() if isinstance(low, int)},
}
_SECRET_PARENT = "output.credentials"
# A training job's fields (the output ones are shared).
_TRAIN_ALLOWED = {
    **{k: v for k, v in _ALLOWED.items() if k.startswith("output")},
    "task": f"one of {', '.join(TASKS)}",
    "videos": f"a list of 1 to {MAX_TRAIN_VIDEOS} talking-face videos with their speech, each given as {_MEDIA_FORMS}",
    "version": f"one of {', '.join(VERSIONS)}",
    "alpha": "a number above 0 and up to 4096, or null for the rank",
    "lr": "a number above 0 and up to 1, or null for the default (1e-4)",
    "holdout": "a number between 0 and 1 (exclusive): the share of each clip's tail held out for evaluation",
    "eval_every": "a whole number of steps, or null for a fifth of the steps",
    **{name: f"a whole number from {low} to {high}" for name, (low, high) in TRAIN_LIMITS.items()},
}


def _messages(err: ValidationError, raw: dict, root: type[BaseModel] = None,
              allowed: Optional[dict] = None) -> list[str]:
    allowed = _ALLOWED if allowed is None else allowed
    messages: list[str] = []
    unknown: dict[str, list[str]] = {}
    for item in err.errors(include_input=False):
        path = ".".join(str(part) for part in item["loc"] if isinstance(part, str))
        kind = item["type"]
        if kind == "extra_forbidden":
            parent, _, key = path.rpartition(".")
            unknown.setdefault(parent, []).append(key)
        elif kind == "missing":
            messages.append(f"'{path}' is required: {_allowed_for(path, allowed)}.")
        elif kind == "value_error" and isinstance(item.get("ctx", {}).get("error"), Refusal):
            messages.append(str(item["ctx"]["error"]))
        else:
            messages.append(f"'{path}' is {_shown(path, raw)}; it must be {_allowed_for(path, allowed)}.")
    for parent, keys in unknown.items():
        model = _model_at(parent) if parent or root is None else root
        where = f" in '{parent}'" if parent else ""
        names = ", ".join(f"'{k}'" for k in keys)
        messages.insert(0, f"unknown key{'s' if len(keys) > 1 else ''} {names}{where}; allowed keys: {_keys(model)}.")
    return messages


def _allowed_for(path: str, allowed: Optional[dict] = None) -> str:
    allowed = _ALLOWED if allowed is None else allowed
    top = path.split(".")[0]
    if path.startswith(_SECRET_PARENT + "."):
        return "a string"
    return allowed.get(path) or allowed.get(top, "a valid value")


def _shown(path: str, raw: dict) -> str:
    """The bad value for a message: secrets hidden, long values cut short."""
    if path.startswith(_SECRET_PARENT + "."):
        return "not a string (value hidden)"
    value: Any = raw
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_at(path: str) -> type[BaseModel]:
    return {"": JobInput, "adapter": AdapterSpec, "output": OutputSpec, "output.credentials": S3Credentials,
            "output.stream": StreamSpec}.get(path, JobInput)


def _keys(model: type[BaseModel]) -> str:
    return ", ".join(model.model_fields)


def _invalid(messages: list[str]) -> LipSyncError:
    return LipSyncError(ErrorCode.INVALID_INPUT, "Invalid job input: " + " ".join(messages), stage="validate")
