"""Every setting of the engines and the worker, in one place.

``MuseTalkOptions`` and ``LatentSyncOptions`` are what one job may choose for
each model (``ENGINE_OPTIONS`` maps a job's ``model`` to its class);
``LIMITS`` documents the ranges the worker's input schema enforces, so the CLI,
the handler and the engines agree. MuseTalk's defaults that depend on the
version (extra margin, parsing mode) are left as ``None`` and filled in by
:meth:`MuseTalkOptions.resolved`. ``EngineConfig`` is what an engine is loaded
with (the deployment's choices); ``WorkerSettings`` the worker's environment.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Dict, Literal, Mapping, Optional, Sequence, Tuple, Union

from .errors import ErrorCode, LipSyncError

Version = Literal["v15", "v1"]
ParsingMode = Literal["jaw", "raw", "neck"]
Box = Tuple[int, int, int, int]

MODELS: Tuple[str, ...] = ("musetalk", "latentsync")
VERSIONS: Tuple[str, ...] = ("v15", "v1")
LATENTSYNC_VERSIONS: Tuple[str, ...] = ("1.6", "1.5")
# An avatar id as the avatar cache makes them (40 hex digits: 160 bits).
AVATAR_ID_PATTERN = r"^[0-9a-f]{40}$"
PARSING_MODES: Tuple[str, ...] = ("jaw", "raw", "neck")
# Where restored pixels go: the whole blend mask, or only its mouth.
RESTORE_REGIONS: Tuple[str, ...] = ("face", "mouth")
RestoreRegion = Literal["face", "mouth"]

# Inclusive ranges for the numeric options: (min, max).
LIMITS = {
    "bbox_shift": (-100, 100),
    "extra_margin": (0, 100),
    "left_cheek_width": (0, 256),
    "right_cheek_width": (0, 256),
    "batch_size": (1, 256),
    "fps": (1.0, 120.0),
    "crf": (0, 51),
    "steps": (1, 100),
    "guidance": (1.0, 5.0),
    "seed": (0, 2**63 - 1),
    "restore_weight": (0.0, 1.0),
}

# Per version: (extra_margin, parsing_mode) used when the job does not choose.
_VERSION_DEFAULTS = {"v15": (10, "jaw"), "v1": (0, "raw")}


@dataclasses.dataclass(frozen=True)
class MuseTalkOptions:
    """What one lip-sync job may choose.

    Attributes:
        version: ``v15`` (MuseTalk 1.5, default) or ``v1`` (MuseTalk 1.0).
        bbox_shift: moves the top of the face box down (positive) or up
            (negative) in pixels; MuseTalk 1.5 was trained with 0.
        extra_margin: pixels added below the chin; default 10 for v15, 0 for v1.
        parsing_mode: blend mask shape, ``jaw`` (v15 default), ``raw`` (v1
            default) or ``neck``.
        left_cheek_width, right_cheek_width: cheek bands of the ``jaw`` mask.
        batch_size: frames per UNet/VAE batch.
        fps: frame rate of the video made from a still image (ignored for videos).
        fp16: compute the UNet and VAE in half precision: the deployment's half dtype on a GPU,
            bfloat16 on a CPU that has it in hardware (AMX or AVX512-BF16; refused on others).
        crf: video quality, lower is better (18 is visually lossless): libx264's
            CRF, or NVENC's constant-quality level on the same scale.
        boxes: precomputed face boxes (x1, y1, x2, y2), one per source frame or
            a single box for every frame; skips face detection.
        restore: run GFPGAN v1.4 on the generated face (needs the ``gfpgan``
            weights and landmarks, so not with ``boxes``).
        restore_weight: how much of the restored face to take, 0 (none: the
            frames of ``restore`` false) to 1.
        restore_region: ``face`` (the whole blend mask) or ``mouth`` (only
            around the mouth).
    """

    version: Version = "v15"
    bbox_shift: int = 0
    extra_margin: Optional[int] = None
    parsing_mode: Optional[ParsingMode] = None
    left_cheek_width: int = 90
    right_cheek_width: int = 90
    batch_size: int = 8
    fps: float = 25.0
    fp16: bool = False
    crf: int = 18
    boxes: Optional[Sequence[Box]] = None
    restore: bool = False
    restore_weight: float = 0.7
    restore_region: RestoreRegion = "face"

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            _invalid("version", self.version, f"one of {', '.join(VERSIONS)}")
        _check_restore_region(self)
        if self.restore and self.boxes is not None:
            raise LipSyncError(
                ErrorCode.INVALID_INPUT,
                "'restore' cannot be used with 'boxes': aligning the face for restoration needs the landmarks "
                "that face detection finds. Leave out 'boxes', or set 'restore' to false.",
                stage="validate",
            )
        if self.parsing_mode is not None and self.parsing_mode not in PARSING_MODES:
            _invalid("parsing_mode", self.parsing_mode, f"one of {', '.join(PARSING_MODES)}")
        _check_ranges(self)
        if self.boxes is not None:
            object.__setattr__(self, "boxes", tuple(_check_box(b) for b in self.boxes))
            if not self.boxes:
                _invalid("boxes", "[]", "at least one box [x1, y1, x2, y2]")

    def resolved(self) -> "MuseTalkOptions":
        """Returns a copy with the version-dependent defaults filled in."""
        margin, mode = _VERSION_DEFAULTS[self.version]
        return dataclasses.replace(
            self,
            extra_margin=margin if self.extra_margin is None else int(self.extra_margin),
            parsing_mode=mode if self.parsing_mode is None else self.parsing_mode,
        )


@dataclasses.dataclass(frozen=True)
class LatentSyncOptions:
    """What one LatentSync job may choose (upstream's defaults; see ``../docs/latentsync.md`` of the project).

    Attributes:
        version: ``1.6`` (512x512 faces, default) or ``1.5`` (256x256).
        steps: DDIM steps (20).
        guidance: classifier-free guidance scale; 1.0 turns guidance off
            (half the UNet work), higher follows the audio more closely and may
            jitter (1.5).
        seed: seeds the initial noise and the VAE samples; the same seed and
            inputs give the same video (1247, upstream's).
        deepcache: reuse the UNet's deep features on two of every three steps
            (DeepCache, interval 3), about 2.5x faster for a small change (true).
        fp16: compute the networks in half precision, as for MuseTalk (:func:`..device.half_dtype`).
        crf: video quality, as for MuseTalk.
        restore, restore_weight, restore_region: GFPGAN face restoration, as
            for MuseTalk (``face`` is the whole aligned face LatentSync pastes
            back, ``mouth`` only around the mouth).
    """

    version: str = "1.6"
    steps: int = 20
    guidance: float = 1.5
    seed: int = 1247
    deepcache: bool = True
    fp16: bool = False
    crf: int = 18
    restore: bool = False
    restore_weight: float = 0.7
    restore_region: RestoreRegion = "face"

    def __post_init__(self) -> None:
        _check_restore_region(self)
        if self.version not in LATENTSYNC_VERSIONS:
            _invalid("version", self.version, f"one of {', '.join(LATENTSYNC_VERSIONS)} for model 'latentsync'")
        _check_ranges(self)

    def resolved(self) -> "LatentSyncOptions":
        """The options as they are (nothing depends on the version); for symmetry with MuseTalk's."""
        return self


JobOptions = Union[MuseTalkOptions, LatentSyncOptions]
# A job's ``model`` -> the class of its options.
ENGINE_OPTIONS: Dict[str, type] = {"musetalk": MuseTalkOptions, "latentsync": LatentSyncOptions}


def _check_restore_region(options: object) -> None:
    if options.restore_region not in RESTORE_REGIONS:
        _invalid("restore_region", options.restore_region, f"one of {', '.join(RESTORE_REGIONS)}")


def _check_ranges(options: object) -> None:
    """Applies ``LIMITS`` to the numeric fields ``options`` has."""
    for field in dataclasses.fields(options):
        if field.name not in LIMITS:
            continue
        low, high = LIMITS[field.name]
        value = getattr(options, field.name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _invalid(field.name, value, f"a number from {low} to {high}")
        if isinstance(low, int) and not float(value).is_integer():
            _invalid(field.name, value, f"a whole number from {low} to {high}")
        if not low <= value <= high:
            _invalid(field.name, value, f"from {low} to {high}")


def _check_box(box: Sequence[int]) -> Box:
    values = list(box)
    if len(values) != 4 or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
        _invalid("boxes", box, "boxes of four whole numbers [x1, y1, x2, y2]")
    x1, y1, x2, y2 = values
    if x1 < 0 or y1 < 0 or x2 <= x1 or y2 <= y1:
        _invalid("boxes", box, "0 <= x1 < x2 and 0 <= y1 < y2")
    return (x1, y1, x2, y2)


def _invalid(name: str, value: object, allowed: str) -> None:
    raise LipSyncError(
        ErrorCode.INVALID_INPUT, f"'{name}' is {value!r}; it must be {allowed}.", stage="validate"
    )


STREAM_FORMATS: Tuple[str, ...] = ("hls",)
# Inclusive ranges of the stream options: (min, max).
STREAM_LIMITS = {"segment_seconds": (0.5, 4.0), "first_segment_seconds": (0.0, 4.0)}


@dataclasses.dataclass(frozen=True)
class StreamOptions:
    """How a job's video is also published while it is made (``output.stream``).

    Attributes:
        format: ``hls`` (fMP4 segments and an EVENT playlist), the only one.
        segment_seconds: length of every segment after the first; also the
            keyframe interval.
        first_segment_seconds: length of the first segment (shorter means the
            first video arrives sooner); 0 means ``segment_seconds``.
        low_latency_encoder: encode without look-ahead (x264 ``zerolatency``),
            so a segment is finished as soon as its last frame arrives, for
            somewhat larger files.
    """

    format: str = "hls"
    segment_seconds: float = 1.0
    first_segment_seconds: float = 0.5
    low_latency_encoder: bool = True

    @property
    def first_seconds(self) -> float:
        """The first segment's length, with 0 meaning ``segment_seconds``."""
        return self.first_segment_seconds or self.segment_seconds


HALF_DTYPES: Tuple[str, ...] = ("float16", "bfloat16")
RESTORE_DTYPES: Tuple[str, ...] = ("float32", "bfloat16")
VIDEO_CODECS: Tuple[str, ...] = ("auto", "libx264", "h264_nvenc")
COMPILE_MODES: Tuple[str, ...] = ("off", "default", "reduce-overhead", "max-autotune")


@dataclasses.dataclass(frozen=True)
class Acceleration:
    """How the engine runs the UNet and VAE decoder on a GPU: a deployment's choice, measured with bench/speed.py.

    Attributes:
        half_dtype: what a job's ``fp16`` computes in, ``float16`` (default) or
            ``bfloat16``.
        compile: ``torch.compile`` mode for the UNet and the VAE decoder:
            ``off`` (default), ``default``, ``reduce-overhead`` (CUDA graphs) or
            ``max-autotune``. Batches are then padded to the job's batch size,
            so each batch size compiles once (at warm-up for the default size,
            at its first job for others).
        channels_last: keep the UNet and VAE decoder in channels-last memory
            format (CUDA only; ignored on other devices).
        restore_dtype: what face restoration (GFPGAN) computes in, ``float32``
            (default) or ``bfloat16``; never float16, whatever a job's ``fp16``.
        restore_batch: faces per GFPGAN forward (about 0.7 GiB of activations
            per face in float32).
    """

    half_dtype: str = "float16"
    compile: str = "off"
    channels_last: bool = False
    restore_dtype: str = "float32"
    restore_batch: int = 8

    def __post_init__(self) -> None:
        if self.half_dtype not in HALF_DTYPES:
            raise ValueError(f"half_dtype {self.half_dtype!r}: use one of {', '.join(HALF_DTYPES)}")
        if self.compile not in COMPILE_MODES:
            raise ValueError(f"compile {self.compile!r}: use one of {', '.join(COMPILE_MODES)}")
        if self.restore_dtype not in RESTORE_DTYPES:
            raise ValueError(f"restore_dtype {self.restore_dtype!r}: use one of {', '.join(RESTORE_DTYPES)} "
                             "(GFPGAN breaks in float16)")
        if self.restore_batch < 1:
            raise ValueError(f"restore_batch {self.restore_batch!r}: use a positive whole number")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What an engine is loaded with: the deployment's choices, the same for every job.

    Attributes:
        models_dir: the models folder (standard layout; for LatentSync also a
            LatentSync model folder itself).
        device: ``auto``, ``cuda``, ``mps`` or ``cpu``.
        landmarks: face back-end, ``dwpose``, ``dlib`` or ``auto``.
        versions: the model's versions to load now (others load at their first job).
        fp16: also prepare half-precision models now (None: on CUDA only).
        cache_dir: avatar cache folder (None: no cache); cache_max_bytes its bound.
        acceleration: half dtype, torch.compile and memory format.
        video_encoder: ``auto``, ``libx264`` or ``h264_nvenc``.
    """

    models_dir: Path
    device: str = "auto"
    landmarks: str = "auto"
    versions: Tuple[str, ...] = ()
    fp16: Optional[bool] = None
    cache_dir: Optional[Path] = None
    cache_max_bytes: int = 20 * 10**9
    acceleration: Acceleration = Acceleration()
    video_encoder: str = "auto"


# --------------------------------------------------------------------------- #
# Worker settings: what the deployment (not the job) decides, from environment
# variables. Each field's variable and default is listed in ``WorkerSettings``.
# --------------------------------------------------------------------------- #

_PROJECT_ROOT = Path(__file__).resolve().parents[1]
_MIB = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class WorkerSettings:
    """Limits, paths and storage of the serverless worker (see ``from_env``).

    Attributes (environment variable, default):
        models_dir: ``MUSETALK_MODELS_DIR``, ``<project>/models``.
        device: ``MUSETALK_DEVICE``, ``auto`` (``cuda``, ``cpu`` or ``auto``);
            anything but ``cpu`` means a GPU is expected.
        landmarks: ``MUSETALK_LANDMARKS``, ``auto`` (``dwpose``, ``dlib``).
        video_encoder: ``MUSETALK_VIDEO_ENCODER``, ``auto`` (``libx264``,
            ``h264_nvenc``): ``auto`` uses NVENC where a trial encode works.
        max_audio_s: ``MUSETALK_MAX_AUDIO_SECONDS``, 300.
        max_source_s: ``MUSETALK_MAX_SOURCE_SECONDS``, 300 (videos).
        max_source_width / max_source_height: ``MUSETALK_MAX_SOURCE_WIDTH`` /
            ``MUSETALK_MAX_SOURCE_HEIGHT``, 3840 each (4K in either orientation).
        max_download_bytes: ``MUSETALK_MAX_DOWNLOAD_BYTES``, 1 GiB per input.
        max_inline_input_bytes: ``MUSETALK_MAX_INLINE_INPUT_BYTES``, 3 MiB decoded
            per ``data:`` input (two such inputs in base64 stay under RunPod's
            10 MB ``/run`` body).
        max_inline_result_bytes: ``MUSETALK_MAX_INLINE_RESULT_BYTES``, 7,000,000:
            the largest video returned as base64 when no bucket is configured
            (9.3 MB once encoded, under the 10 MB result limit).
        download_timeout_s: ``MUSETALK_DOWNLOAD_TIMEOUT_SECONDS``, 60 (per read).
        download_attempts: ``MUSETALK_DOWNLOAD_ATTEMPTS``, 3.
        allow_private_urls: ``MUSETALK_ALLOW_PRIVATE_URLS``, false: fetch URLs
            and job-given S3 endpoints on private, loopback and link-local
            addresses (self-hosted storage, tests).
        local_input_dir: ``MUSETALK_LOCAL_INPUT_DIR``, unset: when set, jobs may
            name files inside this folder instead of URLs (local runs).
        output_dir: ``MUSETALK_OUTPUT_DIR``; defaults to ``<project>/outputs`` on
            local runs (no ``RUNPOD_WEBHOOK_GET_JOB``), unset on RunPod: where a
            result goes when no bucket is configured.
        temp_dir: ``MUSETALK_TEMP_DIR``, the system temp folder: each job's
            scratch folder is made (and removed) inside it.
        bucket_endpoint_url, bucket_access_key_id, bucket_secret_access_key:
            ``BUCKET_ENDPOINT_URL``, ``BUCKET_ACCESS_KEY_ID``,
            ``BUCKET_SECRET_ACCESS_KEY`` (RunPod's convention), unset.
        bucket_name: ``BUCKET_NAME``, unset; bucket_region: ``BUCKET_REGION``.
        output_prefix: ``MUSETALK_OUTPUT_PREFIX``, ``musetalk/``.
        presign_expiry_s: ``MUSETALK_PRESIGN_SECONDS``, 604800 (7 days, S3's maximum).
        weights_lock: ``MUSETALK_WEIGHTS_LOCK``, the project's ``weights.lock.json``:
            the models folder is checked against it at start (sizes); ``none``
            skips the check (for a models folder of other files, e.g. tests).
        verify_weight_hashes: ``MUSETALK_VERIFY_WEIGHT_HASHES``, false: also
            hash every weight file at start (seconds per GB).
        avatar_cache_dir: ``MUSETALK_AVATAR_CACHE_DIR``, unset (no cache): where
            prepared sources are kept for later jobs (a network volume works).
        avatar_cache_bytes: ``MUSETALK_AVATAR_CACHE_GB``, 20 (GB): the cache's bound.
        acceleration: :class:`Acceleration` from ``MUSETALK_HALF_DTYPE`` (float16),
            ``MUSETALK_COMPILE`` (off), ``MUSETALK_CHANNELS_LAST`` (false),
            ``MUSETALK_RESTORE_DTYPE`` (float32; or bfloat16) and
            ``MUSETALK_RESTORE_BATCH`` (8).
        preload_models: ``MUSETALK_PRELOAD_MODELS``, ``musetalk``: the models
            (comma-separated, of ``MODELS``) loaded and warmed up at start and
            required by the fitness check; any other loads at its first job.
    """

    models_dir: Path = _PROJECT_ROOT / "models"
    device: str = "auto"
    landmarks: str = "auto"
    video_encoder: str = "auto"
    max_audio_s: float = 300.0
    max_source_s: float = 300.0
    max_source_width: int = 3840
    max_source_height: int = 3840
    max_download_bytes: int = 1024 * _MIB
    max_inline_input_bytes: int = 3 * _MIB
    max_inline_result_bytes: int = 7_000_000
    download_timeout_s: float = 60.0
    download_attempts: int = 3
    allow_private_urls: bool = False
    local_input_dir: Optional[Path] = None
    output_dir: Optional[Path] = None
    temp_dir: Path = Path(tempfile.gettempdir())
    bucket_endpoint_url: Optional[str] = None
    # Secrets stay out of repr() so a logged settings object leaks nothing.
    bucket_access_key_id: Optional[str] = dataclasses.field(default=None, repr=False)
    bucket_secret_access_key: Optional[str] = dataclasses.field(default=None, repr=False)
    bucket_name: Optional[str] = None
    bucket_region: Optional[str] = None
    output_prefix: str = "musetalk/"
    presign_expiry_s: int = 7 * 24 * 3600
    weights_lock: Optional[Path] = _PROJECT_ROOT / "weights.lock.json"
    verify_weight_hashes: bool = False
    avatar_cache_dir: Optional[Path] = None
    avatar_cache_bytes: int = 20 * 10**9
    acceleration: Acceleration = Acceleration()
    preload_models: Tuple[str, ...] = ("musetalk",)

    def engine_config(self) -> EngineConfig:
        """What every engine is loaded with on this worker (each loads the versions it needs)."""
        return EngineConfig(
            models_dir=self.models_dir, device=self.device, landmarks=self.landmarks,
            cache_dir=self.avatar_cache_dir, cache_max_bytes=self.avatar_cache_bytes,
            acceleration=self.acceleration, video_encoder=self.video_encoder,
        )

    @classmethod
    def from_env(cls, environ: Optional[Mapping[str, str]] = None) -> "WorkerSettings":
        """Reads the settings from ``environ`` (default ``os.environ``).

        Raises:
            ValueError: a variable is set to something that is not valid for it,
                naming the variable.
        """
        env = _Env(os.environ if environ is None else environ)
        local_run = env.text("RUNPOD_WEBHOOK_GET_JOB") is None
        return cls(
            models_dir=env.path("MUSETALK_MODELS_DIR") or cls.models_dir,
            device=env.choice("MUSETALK_DEVICE", ("auto", "cuda", "cpu"), cls.device),
            landmarks=env.choice("MUSETALK_LANDMARKS", ("auto", "dwpose", "dlib"), cls.landmarks),
            video_encoder=env.choice("MUSETALK_VIDEO_ENCODER", VIDEO_CODECS, cls.video_encoder),
            max_audio_s=env.number("MUSETALK_MAX_AUDIO_SECONDS", cls.max_audio_s),
            max_source_s=env.number("MUSETALK_MAX_SOURCE_SECONDS", cls.max_source_s),
            max_source_width=int(env.number("MUSETALK_MAX_SOURCE_WIDTH", cls.max_source_width)),
            max_source_height=int(env.number("MUSETALK_MAX_SOURCE_HEIGHT", cls.max_source_height)),
            max_download_bytes=int(env.number("MUSETALK_MAX_DOWNLOAD_BYTES", cls.max_download_bytes)),
            max_inline_input_bytes=int(env.number("MUSETALK_MAX_INLINE_INPUT_BYTES", cls.max_inline_input_bytes)),
            max_inline_result_bytes=int(env.number("MUSETALK_MAX_INLINE_RESULT_BYTES", cls.max_inline_result_bytes)),
            download_timeout_s=env.number("MUSETALK_DOWNLOAD_TIMEOUT_SECONDS", cls.download_timeout_s),
            download_attempts=int(env.number("MUSETALK_DOWNLOAD_ATTEMPTS", cls.download_attempts)),
            allow_private_urls=env.flag("MUSETALK_ALLOW_PRIVATE_URLS"),
            local_input_dir=env.path("MUSETALK_LOCAL_INPUT_DIR"),
            output_dir=env.path("MUSETALK_OUTPUT_DIR") or (_PROJECT_ROOT / "outputs" if local_run else None),
            temp_dir=env.path("MUSETALK_TEMP_DIR") or cls.temp_dir,
            bucket_endpoint_url=env.text("BUCKET_ENDPOINT_URL"),
            bucket_access_key_id=env.text("BUCKET_ACCESS_KEY_ID"),
            bucket_secret_access_key=env.text("BUCKET_SECRET_ACCESS_KEY"),
            bucket_name=env.text("BUCKET_NAME"),
            bucket_region=env.text("BUCKET_REGION"),
            output_prefix=env.text("MUSETALK_OUTPUT_PREFIX") or cls.output_prefix,
            presign_expiry_s=int(env.number("MUSETALK_PRESIGN_SECONDS", cls.presign_expiry_s, high=7 * 24 * 3600)),
            weights_lock=(None if (env.text("MUSETALK_WEIGHTS_LOCK") or "").lower() == "none"
                          else env.path("MUSETALK_WEIGHTS_LOCK") or cls.weights_lock),
            verify_weight_hashes=env.flag("MUSETALK_VERIFY_WEIGHT_HASHES"),
            avatar_cache_dir=env.path("MUSETALK_AVATAR_CACHE_DIR"),
            avatar_cache_bytes=int(env.number("MUSETALK_AVATAR_CACHE_GB", cls.avatar_cache_bytes / 10**9) * 10**9),
            acceleration=Acceleration(
                half_dtype=env.choice("MUSETALK_HALF_DTYPE", HALF_DTYPES, Acceleration.half_dtype),
                compile=env.choice("MUSETALK_COMPILE", COMPILE_MODES, Acceleration.compile),
                channels_last=env.flag("MUSETALK_CHANNELS_LAST"),
                restore_dtype=env.choice("MUSETALK_RESTORE_DTYPE", RESTORE_DTYPES, Acceleration.restore_dtype),
                restore_batch=int(env.number("MUSETALK_RESTORE_BATCH", Acceleration.restore_batch)),
            ),
            preload_models=env.choices("MUSETALK_PRELOAD_MODELS", MODELS, cls.preload_models),
        )


class _Env:
    """Typed reads of environment variables; a bad value names its variable."""

    def __init__(self, environ: Mapping[str, str]):
        self._environ = environ

    def text(self, name: str) -> Optional[str]:
        value = self._environ.get(name, "").strip()
        return value or None

    def path(self, name: str) -> Optional[Path]:
        value = self.text(name)
        return Path(value).expanduser().resolve() if value else None

    def flag(self, name: str) -> bool:
        value = (self.text(name) or "false").lower()
        if value not in ("1", "true", "yes", "0", "false", "no"):
            raise ValueError(f"{name}={value!r}: use true or false")
        return value in ("1", "true", "yes")

    def choice(self, name: str, allowed: Sequence[str], default: str) -> str:
        value = (self.text(name) or default).lower()
        if value not in allowed:
            raise ValueError(f"{name}={value!r}: use one of {', '.join(allowed)}")
        return value

    def choices(self, name: str, allowed: Sequence[str], default: Tuple[str, ...]) -> Tuple[str, ...]:
        raw = self.text(name)
        if raw is None:
            return default
        values = tuple(dict.fromkeys(v.strip().lower() for v in raw.split(",") if v.strip()))
        unknown = [v for v in values if v not in allowed]
        if unknown:
            raise ValueError(f"{name}={raw!r}: use a comma-separated list of {', '.join(allowed)}")
        return values

    def number(self, name: str, default: float, high: Optional[float] = None) -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            value = -1.0
        if value <= 0 or (high is not None and value > high):
            bound = f" up to {high:g}" if high is not None else ""
            raise ValueError(f"{name}={raw!r}: use a positive number{bound}")
        return value
