"""The lip-sync pipeline: models loaded once, one call per job.

A job runs in two streaming passes over the source, so memory stays flat
whatever the length:

1. **Prepare** each source frame (decode -> face box -> crop latents -> blend
   mask) and spill it to a scratch file (:mod:`store`). Only the frames the
   audio needs are decoded, unless an avatar cache is set: then the whole
   source is prepared once and later jobs with the same source skip this pass.
2. **Generate** the output in batches: audio prompts + latents -> UNet -> VAE
   decoder -> blend into the source frame -> ffmpeg, in ping-pong order over the
   source frames until the audio ends.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from . import boxes as box_math
from .audio import AudioEncoder, AudioPrompts
from .avatar_cache import AvatarCache
from .blend import BlendedBatch, FaceBlender, visible_part
from .decode import MediaInfo, iter_video_frames, load_audio, probe_inputs, read_image
from .encode import VideoEncoder, choose_video_codec
from .errors import ErrorCode, LipSyncError
from .faces import FaceAnalyzer, load_face_analyzer
from .generate import FaceGenerator
from .latents import LatentEncoder, crop_face
from .masks import BlendMask, MaskMaker
from .models import (
    FACE_PARSING_WEIGHTS, VAE_DIR, load_audio_encoder, load_face_parser, load_unet, load_vae, speed_up,
)
from .options import Acceleration, EngineOptions
from .overlap import BackgroundConsumer, Prefetcher
from .store import SourceStore
from .timing import StageTimer

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
# Stages reported to the progress callback, in order.
PROGRESS_STAGES = ("decode", "prepare", "generate", "encode")


@dataclasses.dataclass
class LipSyncResult:
    """What a job produced. ``timings`` holds seconds per stage."""

    path: Path
    frames: int
    fps: float
    fps_fraction: str
    duration_s: float
    width: int
    height: int
    source_frames: int
    frames_without_face: int
    timings: Dict[str, float]
    cache_hit: Optional[bool] = None  # None when no avatar cache is set


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple's MPS, then the CPU."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise LipSyncError(ErrorCode.INVALID_INPUT, f"unknown device {device!r}; use auto, cuda, mps or cpu") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise LipSyncError(ErrorCode.INVALID_INPUT, "device 'cuda' was asked for but no CUDA GPU is visible")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise LipSyncError(ErrorCode.INVALID_INPUT, "device 'mps' was asked for but Apple's MPS is not available")
    return chosen




class LipSyncPipeline:
    """MuseTalk from media files to a lip-synced mp4; load once, call per job.

    Build it with :meth:`from_models`. Float16 copies of the UNet and VAE are
    made the first time a job asks for ``fp16`` (or at load with
    ``fp16=True``) and kept, as is the UNet of the other version.
    """

    def __init__(
        self,
        models_dir: Path,
        device: torch.device,
        faces: FaceAnalyzer,
        audio_encoder: AudioEncoder,
        mask_net: torch.nn.Module,
        cache: Optional[AvatarCache] = None,
        acceleration: Acceleration = Acceleration(),
        video_codec: str = "libx264",
    ):
        self.models_dir = Path(models_dir)
        self.device = device
        self.faces = faces
        self.audio_encoder = audio_encoder
        self.mask_net = mask_net
        self.cache = cache
        self.acceleration = acceleration
        self.video_codec = video_codec
        # Per-frame image work of the prepare pass (crops, mask shaping) runs on these threads.
        self._pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="prepare")
        self._vaes: Dict[torch.dtype, torch.nn.Module] = {}
        self._unets: Dict[Tuple[str, torch.dtype], torch.nn.Module] = {}

    @classmethod
    def from_models(
        cls,
        models_dir: Path,
        *,
        device: str = "auto",
        fp16: Optional[bool] = None,
        landmarks: str = "auto",
        versions: Sequence[str] = ("v15",),
        cache_dir: Optional[Path] = None,
        cache_max_bytes: int = 20 * 2**30,
        acceleration: Acceleration = Acceleration(),
        video_encoder: str = "auto",
    ) -> "LipSyncPipeline":
        """Loads every model from ``models_dir`` (standard layout) onto ``device``.

        Args:
            device: ``auto``, ``cuda``, ``mps`` or ``cpu``.
            fp16: also prepare half-precision models now (default: on CUDA only).
            landmarks: face back-end, ``dwpose``, ``dlib`` or ``auto``.
            versions: UNets to load now (others load at their first job).
            cache_dir: avatar cache folder (e.g. on a network volume); None: no cache.
            cache_max_bytes: size bound of the avatar cache.
            acceleration: half dtype, torch.compile and memory format of the UNet and VAE decoder.
            video_encoder: ``auto`` (NVENC where it works, else libx264), ``libx264`` or
                ``h264_nvenc``; chosen now, so a bad choice fails at load, not in a job.
        """
        chosen = resolve_device(device)
        faces = load_face_analyzer(landmarks, models_dir, chosen)
        cache = AvatarCache(cache_dir, cache_max_bytes) if cache_dir is not None else None
        pipe = cls(
            models_dir, chosen, faces, load_audio_encoder(models_dir, chosen), load_face_parser(models_dir, chosen),
            cache, acceleration, choose_video_codec(video_encoder),
        )
        dtypes = [torch.float32]
        if chosen.type == "cuda" if fp16 is None else fp16:
            dtypes.append(pipe._half_dtype())
        for version in versions:
            for dtype in dtypes:
                pipe._unet(version, dtype)
        return pipe

    def warm_up(self, options: EngineOptions = EngineOptions()) -> None:
        """Runs every loaded UNet and VAE decoder once on zeros, so the first job does not pay for
        kernel set-up or, with ``torch.compile``, for compiling at ``options``' batch size."""
        for version, dtype in list(self._unets):
            generator = self._generator(dataclasses.replace(options, version=version, fp16=dtype != torch.float32))
            size = generator.fixed_batch or 1
            generator.decode(generator.predict_latents(torch.zeros(size, 8, 32, 32), torch.zeros(size, 50, 384)))

    def __call__(
        self,
        source: Union[Path, MediaInfo],
        audio: Union[Path, MediaInfo],
        output: Path,
        options: EngineOptions = EngineOptions(),
        *,
        progress: Optional[Progress] = None,
        workdir: Optional[Path] = None,
    ) -> LipSyncResult:
        """Makes ``output`` (mp4): the source's face speaking ``audio``.

        ``source`` and ``audio`` are paths, or what :func:`decode.probe_inputs`
        returned for them (then they are not probed again).

        Raises:
            LipSyncError: bad media, no face in any frame, missing models.
        """
        options = options.resolved()
        report = progress or (lambda stage, done, total: None)
        timer = StageTimer(self.device)
        generator = self._generator(options)

        report("decode", 0, 1)
        with timer("decode"):
            source_info, audio_info = probe_inputs(source, audio)
            samples = load_audio(audio_info)
        fps = source_info.fps if source_info.kind == "video" else Fraction(options.fps).limit_denominator(1001)
        prompts = self.audio_encoder.prompts(samples, fps)
        if len(prompts) == 0:
            raise LipSyncError(
                ErrorCode.INVALID_INPUT,
                f"the audio lasts {len(samples) / 16000:.3f} s, shorter than one video frame; send longer speech.",
                stage="decode",
            )
        height, width = source_info.height, source_info.width
        with tempfile.TemporaryDirectory(prefix="musetalk-", dir=workdir) as scratch:
            store, cache_hit = self._prepared_source(source_info, options, generator, len(prompts), Path(scratch), timer, report)
            try:
                report("generate", 0, len(prompts))
                with VideoEncoder(Path(output), width, height, fps, audio_info.path, options.crf,
                                  self.video_codec) as encoder:
                    self._generate(store, prompts, generator, options, encoder, timer, report)
                    report("encode", 0, 1)
                    with timer("encode"):
                        encoder.close()
            finally:
                store.close(delete=cache_hit is None)
        report("encode", 1, 1)
        timings = timer.totals()
        return LipSyncResult(
            path=Path(output),
            frames=len(prompts),
            fps=float(fps),
            fps_fraction=f"{fps.numerator}/{fps.denominator}",
            duration_s=round(len(samples) / 16000, 3),
            width=width,
            height=height,
            source_frames=len(store),
            frames_without_face=len(store) - store.faces,
            timings=timings,
            cache_hit=cache_hit,
        )

    def _prepared_source(
        self,
        info: MediaInfo,
        options: EngineOptions,
        generator: FaceGenerator,
        needed: int,
        scratch: Path,
        timer: StageTimer,
        report: Progress,
    ) -> Tuple[SourceStore, Optional[bool]]:
        """The prepared source: from the avatar cache, or prepared now (and cached when there is a cache)."""
        if self.cache is None:
            store = SourceStore(scratch, info.height, info.width)
            try:
                self._prepare(info, options, generator.vae, store, needed, timer, report)
            except BaseException:
                store.close()
                raise
            return store, None
        with timer("cache"):
            key = self.cache.key(info.path, self._preparation_settings(options, generator))
            store = self.cache.open(key)
        if store is not None:
            report("prepare", len(store), len(store))
            return store, True
        folder = self.cache.new_entry()
        store = SourceStore(folder, info.height, info.width)
        try:
            self._prepare(info, options, generator.vae, store, None, timer, report)
            with timer("cache"):
                store.save_index()
        except BaseException:
            store.close()
            self.cache.discard(folder)
            raise
        with timer("cache"):
            self.cache.commit(folder, key)
        return store, False

    def _preparation_settings(self, options: EngineOptions, generator: FaceGenerator) -> Dict[str, object]:
        """Everything besides the source's bytes that changes what preparation computes."""
        # Size and modification time identify the VAE and face-parsing weights without hashing gigabytes.
        weights = sorted((self.models_dir / VAE_DIR).iterdir()) + [self.models_dir / FACE_PARSING_WEIGHTS]
        return {
            "faces": self.faces.name,
            "boxes": options.boxes,
            "bbox_shift": options.bbox_shift,
            "extra_margin": options.extra_margin,
            "parsing_mode": options.parsing_mode,
            "cheeks": [options.left_cheek_width, options.right_cheek_width],
            "device": self.device.type,
            "vae_dtype": str(generator.dtype),
            "weights": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in weights],
        }

    def _prepare(
        self,
        info: MediaInfo,
        options: EngineOptions,
        vae: torch.nn.Module,
        store: SourceStore,
        needed: Optional[int],
        timer: StageTimer,
        report: Progress,
    ) -> None:
        """First pass: face box, latents and blend mask of the source frames, into ``store``.

        ``needed`` limits it to the first frames the output uses (None: all).
        """
        if info.kind == "video":
            frames = iter_video_frames(info, max_frames=needed)
            expected = min(needed or info.estimated_frames, info.estimated_frames or needed or 1)
        else:
            frames = iter([read_image(info.path)])
            expected = 1
        masks = MaskMaker(self.mask_net, options.parsing_mode, options.left_cheek_width, options.right_cheek_width,
                          self._pool)
        latent_encoder = LatentEncoder(vae)
        report("prepare", 0, expected)
        decoded = Prefetcher(_batched(timer.timed_iter("decode", frames), options.batch_size), depth=1)
        with decoded:
            for batch in decoded:
                self._prepare_batch(batch, options, latent_encoder, masks, store, timer)
                report("prepare", len(store), max(expected, len(store)))
        if store.faces == 0:
            raise LipSyncError(
                ErrorCode.NO_FACE,
                f"no face was found in any of the {len(store)} source frames used; send a video or image "
                "with one clearly visible, roughly frontal face.",
                stage="prepare",
            )

    def _prepare_batch(
        self,
        batch: List[np.ndarray],
        options: EngineOptions,
        latent_encoder: LatentEncoder,
        masks: MaskMaker,
        store: SourceStore,
        timer: StageTimer,
    ) -> None:
        """Face boxes, latents and blend masks of one batch of source frames, appended to ``store``."""
        with timer("faces"):
            face_boxes = self._face_boxes(batch, len(store), options)
        with_face = [i for i, b in enumerate(face_boxes) if b is not None]
        prepared = {}
        if with_face:
            frames, boxes = [batch[i] for i in with_face], [face_boxes[i] for i in with_face]
            with timer("latents"):
                latents = latent_encoder.encode(list(self._pool.map(crop_face, frames, boxes)))
            with timer("masks"):
                made = masks.make(frames, boxes)
            prepared = dict(zip(with_face, zip(made, latents)))
        for i, frame in enumerate(batch):
            mask, latent = prepared.get(i, (None, None))
            store.add(frame, mask, latent)

    def _face_boxes(self, frames: List[np.ndarray], first: int, options: EngineOptions) -> List[Optional[box_math.Box]]:
        """Face boxes (extra margin applied) of a batch of frames; None where there is no face."""
        height, width = frames[0].shape[:2]
        if options.boxes is not None:
            found = [_given_box(options.boxes, first + i, width, height) for i in range(len(frames))]
        else:
            found = [
                None if d is None else box_math.face_box(d.landmarks, d.detector_box, options.bbox_shift)
                for d in self.faces.detect(frames)
            ]
        result = []
        for box in found:
            if box is not None:
                box = box_math.with_margin(box, options.extra_margin, height)
                x1, y1, x2, y2 = box_math.clip_box(box, width, height)
                # A box with no pixels inside the frame cannot be cropped: treat as no face.
                box = box if x2 > x1 and y2 > y1 else None
            result.append(box)
        return result

    def _generate(
        self,
        store: SourceStore,
        prompts: AudioPrompts,
        generator: FaceGenerator,
        options: EngineOptions,
        encoder: VideoEncoder,
        timer: StageTimer,
        report: Progress,
    ) -> None:
        """Second pass: generate every output frame in order.

        Three threads overlap: one reads the next batches from the store, this
        one queues the UNet, VAE decoder and blending on the device, and one
        pastes the blended regions into their frames and feeds the encoder.
        """
        total = len(prompts)
        blender = FaceBlender(self.device)
        with Prefetcher(_read_batches(store, total, options.batch_size, timer)) as batches, \
                BackgroundConsumer(_frame_writer(store, encoder, timer)) as writer:
            for batch in batches:
                blended = None
                if batch.with_face:
                    with timer("audio"):
                        audio = prompts[batch.start : batch.start + len(batch.sources)][batch.with_face]
                    with timer.device("unet"):
                        predicted = generator.predict_latents(batch.latents, audio)
                    with timer.device("vae_decode"):
                        faces = generator.decode(predicted)
                    with timer.device("blend"):
                        blended = blender.blend(batch.pixels, faces, batch.masks, store.width, store.height)
                writer.put(batch, blended)
                report("generate", batch.start + len(batch.sources), total)

    def _generator(self, options: EngineOptions) -> FaceGenerator:
        dtype = self._half_dtype() if options.fp16 else torch.float32
        fixed_batch = options.batch_size if self.acceleration.compile != "off" else None
        return FaceGenerator(self._unet(options.version, dtype), self._vae(dtype), fixed_batch)

    def _half_dtype(self) -> torch.dtype:
        if self.device.type == "cpu":
            raise LipSyncError(
                ErrorCode.INVALID_INPUT,
                "fp16 needs a GPU (CUDA or MPS); this worker runs on the CPU. Set fp16 to false.",
                stage="validate",
            )
        return getattr(torch, self.acceleration.half_dtype)

    def _vae(self, dtype: torch.dtype) -> torch.nn.Module:
        if dtype not in self._vaes:
            vae = load_vae(self.models_dir, self.device, dtype)
            speed_up(vae.decoder, self.acceleration)
            self._vaes[dtype] = vae
        return self._vaes[dtype]

    def _unet(self, version: str, dtype: torch.dtype) -> torch.nn.Module:
        if (version, dtype) not in self._unets:
            unet = load_unet(self.models_dir, version, self.device, dtype)
            self._unets[(version, dtype)] = speed_up(unet, self.acceleration)
            self._vae(dtype)
        return self._unets[(version, dtype)]


@dataclasses.dataclass
class _Batch:
    """What the generate pass needs from the store for one batch of output frames."""

    start: int  # first output frame
    sources: List[int]  # source frame of each output frame
    with_face: List[int]  # positions in the batch whose source frame has a face
    latents: Optional[torch.Tensor]  # [len(with_face), 8, 32, 32]
    masks: List[BlendMask]  # per position with a face
    pixels: List[np.ndarray]  # per position with a face: the source's pixels in the mask's visible box


def _read_batches(store: SourceStore, total: int, batch_size: int, timer: StageTimer) -> Iterator[_Batch]:
    """The batches of ``total`` output frames, in ping-pong order over the source frames."""
    for start in range(0, total, batch_size):
        with timer("read"):
            sources = [_ping_pong(i, len(store)) for i in range(start, min(start + batch_size, total))]
            with_face = [k for k, j in enumerate(sources) if store.box(j) is not None]
            masks = [store.mask(sources[k]) for k in with_face]
            pixels = [
                store.pixels(sources[k], visible_part(mask.box, store.width, store.height))
                for k, mask in zip(with_face, masks)
            ]
            latents = torch.stack([store.latent(sources[k]) for k in with_face]) if with_face else None
        yield _Batch(start, sources, with_face, latents, masks, pixels)


def _frame_writer(store: SourceStore, encoder: VideoEncoder, timer: StageTimer) -> Callable:
    """What the writing thread does with each batch: paste the blended regions into their frames, encode."""

    def write(batch: _Batch, blended: Optional[BlendedBatch]) -> None:
        position = {k: i for i, k in enumerate(batch.with_face)}
        for k, j in enumerate(batch.sources):
            with timer("read"):
                frame = store.frame(j)
            if k in position:
                # The first paste of a batch also waits for the device's copy to arrive.
                with timer("paste"):
                    frame = blended.paste(position[k], frame)
            with timer("encode"):
                encoder.write(frame)

    return write


def _given_box(boxes: Sequence[box_math.Box], index: int, width: int, height: int) -> box_math.Box:
    if len(boxes) == 1:
        box = boxes[0]
    elif index < len(boxes):
        box = boxes[index]
    else:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"'boxes' has {len(boxes)} entries but the source has more frames; give one box per frame or a single box.",
            stage="prepare",
        )
    x1, y1, x2, y2 = box
    if x2 > width or y2 > height:
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            f"box {list(box)} reaches outside the {width}x{height} source; boxes must lie inside the frame.",
            stage="prepare",
        )
    return tuple(box)


def _ping_pong(index: int, count: int) -> int:
    """Source frame of output frame ``index``: forwards, then backwards, and again."""
    k = index % (2 * count)
    return k if k < count else 2 * count - 1 - k


def _batched(items: Iterable, size: int) -> Iterator[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
