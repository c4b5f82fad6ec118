"""The lip-sync pipeline: models loaded once, one call per job.

A job runs in two streaming passes over the source, so memory stays flat
whatever the length:

1. **Prepare** each source frame (decode -> face box -> crop latents -> blend
   mask) and spill it to a scratch file (:mod:`store`). Only the frames the
   audio needs are decoded, unless an avatar cache is set: then the whole
   source is prepared once and later jobs with the same source skip this pass.
2. **Generate** the output in batches: audio prompts + latents -> UNet -> VAE
   decoder -> blend into the source frame (with ``restore``: GFPGAN on the
   composited face, aligned by the source frame's smoothed landmarks) ->
   ffmpeg, in ping-pong order over the source frames until the audio ends.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import tempfile
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ...avatar_cache import AvatarCache, open_avatar
from ...decode import MediaInfo, load_audio, probe_inputs
from ...device import half_dtype, resolve_device, usable_cpus, warm_up_pays
from ...encode import HlsOutput, VideoEncoder, choose_video_codec
from ...engine import LipSyncResult, Progress
from ...errors import ErrorCode, LipSyncError
from ...faces import FaceAnalyzer, load_face_analyzer
from ...options import Acceleration, EngineConfig, MuseTalkOptions
from ...overlap import BackgroundConsumer, Prefetcher
from ...restoration.align import SMOOTH_RADIUS, AlignmentTrack, context_window
from ...restoration.network import FaceRestorer, installed_restorer, missing_weights
from ...restoration.warp import Placement
from ...timing import StageTimer
from .audio import AudioEncoder, AudioPrompts
from .blend import BlendedBatch, FaceBlender, visible_part
from .generate import FaceGenerator
from .masks import BlendMask
from .models import (
    FACE_PARSING_WEIGHTS, UNET_CONFIG, UNET_FILES, VAE_DIR, load_audio_encoder, load_face_parser, load_unet, load_vae,
    speed_up,
)
from .prepare import Preparation, Prepared
from .store import SourceStore

logger = logging.getLogger(__name__)

# Stages reported to the progress callback, in order.
PROGRESS_STAGES = ("decode", "prepare", "generate", "encode")
# LoRA adapters kept loaded on each UNet (by the tensor file's SHA-256), least recently used dropped first.
ADAPTER_CACHE_SIZE = 4
# SHA-256 of base weight files by (path, size, mtime): hashed once per process.
_BASE_HASHES: Dict[Tuple[str, int, int], str] = {}


class MuseTalkPipeline:
    """MuseTalk from media files to a lip-synced mp4; load once, call per job.

    Build it with :meth:`from_models`. Float16 copies of the UNet and VAE are
    made the first time a job asks for ``fp16`` (or at load with
    ``fp16=True``) and kept, as is the UNet of the other version.
    ``restorer`` is GFPGAN, loaded when the models folder has its weights
    (None: jobs asking for ``restore`` are refused).
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
        restorer: Optional[FaceRestorer] = None,
    ):
        self.models_dir = Path(models_dir)
        self.restorer = restorer
        self.device = device
        self.faces = faces
        self.audio_encoder = audio_encoder
        self.mask_net = mask_net
        self.cache = cache
        self.acceleration = acceleration
        self.video_codec = video_codec
        # Per-frame image work of the prepare pass (crops, mask shaping) runs on these threads.
        self._pool = ThreadPoolExecutor(max_workers=min(8, usable_cpus()), thread_name_prefix="prepare")
        self._vaes: Dict[torch.dtype, torch.nn.Module] = {}
        self._unets: Dict[Tuple[str, torch.dtype], torch.nn.Module] = {}
        # Per UNet: adapter SHA-256 -> the name it is loaded under, oldest use first.
        self._adapters: Dict[Tuple[str, torch.dtype], "collections.OrderedDict[str, str]"] = {}

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
    ) -> "MuseTalkPipeline":
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
        restorer = installed_restorer(models_dir, chosen, acceleration.restore_dtype, acceleration.restore_batch)
        pipe = cls(
            models_dir, chosen, faces, load_audio_encoder(models_dir, chosen), load_face_parser(models_dir, chosen),
            cache, acceleration, choose_video_codec(video_encoder), restorer,
        )
        dtypes = [torch.float32]
        if chosen.type == "cuda" if fp16 is None else fp16:
            dtypes.append(pipe._half_dtype())
        for version in versions:
            for dtype in dtypes:
                pipe._unet(version, dtype)
        return pipe

    @classmethod
    def from_config(cls, config: EngineConfig) -> "MuseTalkPipeline":
        """Loads the engine as a deployment's :class:`EngineConfig` says (the engine interface's entry)."""
        return cls.from_models(
            config.models_dir, device=config.device, fp16=config.fp16, landmarks=config.landmarks,
            versions=config.versions or ("v15",), cache_dir=config.cache_dir, cache_max_bytes=config.cache_max_bytes,
            acceleration=config.acceleration, video_encoder=config.video_encoder,
        )

    def warm_up(self, options: MuseTalkOptions = MuseTalkOptions()) -> None:
        """Runs every loaded UNet and VAE decoder, and GFPGAN when loaded, once on zeros, so the first job
        does not pay for kernel set-up or, with ``torch.compile``, for compiling at ``options``' batch size.

        Nothing runs where no first call pays set-up (eager on the CPU: :func:`device.warm_up_pays`).
        """
        if not warm_up_pays(self.device, compiled=self.acceleration.compile != "off"):
            return
        for version, dtype in list(self._unets):
            generator = self._generator(dataclasses.replace(options, version=version, fp16=dtype != torch.float32))
            size = generator.fixed_batch or 1
            generator.decode(generator.predict_latents(torch.zeros(size, 8, 32, 32), torch.zeros(size, 50, 384)))
        if self.restorer is not None:
            self.restorer.warm_up()

    def __call__(
        self,
        source: Union[Path, MediaInfo, None],
        audio: Union[Path, MediaInfo],
        output: Path,
        options: MuseTalkOptions = MuseTalkOptions(),
        *,
        avatar_id: Optional[str] = None,
        progress: Optional[Progress] = None,
        workdir: Optional[Path] = None,
        hls: Optional[HlsOutput] = None,
        adapter: Optional[Path] = None,
    ) -> LipSyncResult:
        """Makes ``output`` (mp4): the source's face speaking ``audio``.

        ``source`` and ``audio`` are paths, or what :func:`decode.probe_inputs`
        returned for them (then they are not probed again). Instead of
        ``source``, ``avatar_id`` (a result's ``avatar_id``) takes the prepared
        source from the avatar cache: nothing of the source is decoded or
        prepared again, and the options that shape preparation (face boxes,
        margins, masks) are those it was prepared with. With ``hls`` the same
        encode also writes HLS segments as the frames are made. ``adapter``
        (a LoRA folder or its ``adapter.safetensors``, :mod:`..train.adapter`)
        is active on the UNet for this job only; without one the plain base runs.

        Raises:
            LipSyncError: bad media, no face in any frame, missing models, an
                avatar id the cache does not hold; ``invalid_input`` naming
                ``adapter``: a broken adapter, one for other base weights, or
                an adapter on a ``torch.compile``'d UNet.
        """
        options = options.resolved()
        if options.restore and self.restorer is None:
            raise missing_weights(self.models_dir)
        report = progress or (lambda stage, done, total: None)
        timer = StageTimer(self.device)
        generator = self._generator(options)
        self._activate_adapter(options, generator, adapter)

        report("decode", 0, 1)
        with timer("decode"):
            source_info, audio_info = probe_inputs(source, audio)
            samples = load_audio(audio_info)
        avatar = self._avatar(avatar_id) if source_info is None else None
        try:
            kind = avatar.meta["kind"] if avatar is not None else source_info.kind
            if kind == "video":
                fps = Fraction(avatar.meta["fps"]) if avatar is not None else source_info.fps
            else:
                fps = Fraction(options.fps).limit_denominator(1001)
            prompts = self.audio_encoder.prompts(samples, fps)
            if len(prompts) == 0:
                raise LipSyncError(
                    ErrorCode.INVALID_INPUT,
                    f"the audio lasts {len(samples) / 16000:.3f} s, shorter than one video frame; send longer "
                    "speech.",
                    stage="decode",
                )
        except BaseException:
            if avatar is not None:  # from here on _source closes it
                avatar.close(delete=False)
            raise
        with tempfile.TemporaryDirectory(prefix="musetalk-", dir=workdir) as scratch, \
                self._source(source_info, avatar, options, generator, len(prompts), Path(scratch), timer,
                             report) as (prepared, key):
            store = prepared.store
            if options.restore and isinstance(prepared, Prepared):
                _check_alignable(store)
            report("generate", 0, len(prompts))
            with VideoEncoder(Path(output), store.width, store.height, fps, audio_info.path, options.crf,
                              self.video_codec, hls=hls) as encoder:
                self._generate(prepared, prompts, generator, options, encoder, timer, report)
                # The rest of the source (for the cache) and the no-face check, before the file is finished.
                prepared.finish()
                report("encode", 0, 1)
                with timer("encode"):
                    encoder.close()
        report("encode", 1, 1)
        timings = timer.totals()
        return LipSyncResult(
            path=Path(output),
            frames=len(prompts),
            fps=float(fps),
            fps_fraction=f"{fps.numerator}/{fps.denominator}",
            duration_s=round(len(samples) / 16000, 3),
            width=store.width,
            height=store.height,
            source_frames=len(store),
            frames_without_face=len(store) - store.faces,
            timings=timings,
            model="musetalk",
            version=options.version,
            cache_hit=None if self.cache is None else isinstance(prepared, Prepared),
            avatar_id=key,
        )

    def _avatar(self, avatar_id: Optional[str]) -> SourceStore:
        """The prepared source saved as ``avatar_id`` (:func:`open_avatar` says what it refuses)."""
        return open_avatar(self.cache, avatar_id, SourceStore.open, "musetalk")

    @contextlib.contextmanager
    def _source(
        self,
        info: Optional[MediaInfo],
        avatar: Optional[SourceStore],
        options: MuseTalkOptions,
        generator: FaceGenerator,
        needed: int,
        scratch: Path,
        timer: StageTimer,
        report: Progress,
    ) -> Iterator[Tuple[Union[Preparation, Prepared], Optional[str]]]:
        """The job's prepared source and its avatar id (None without a cache).

        ``avatar`` is an opened cache entry (a job given an avatar id); else the
        source is looked up in the cache, and on a miss prepared as the
        generate pass asks. With a cache the whole source is prepared and the
        entry committed when the block ends without an error.
        """
        if self.cache is None:
            store = SourceStore(scratch, info.height, info.width)
            # Restoration smooths each frame's alignment over the frames after it too: prepare those, so
            # the video is the same as from a fully prepared (cached) source.
            limit = needed + SMOOTH_RADIUS if options.restore else needed
            try:
                with self._preparation(info, options, generator, store, limit, timer, report) as preparation:
                    yield preparation, None
            finally:
                store.close()
            return
        if avatar is None:
            with timer("cache"):
                key = self.cache.key(info.path, self._preparation_settings(options, generator))
                avatar = self.cache.open(key, SourceStore.open)
        if avatar is not None:
            report("prepare", len(avatar), len(avatar))
            try:
                yield Prepared(avatar), avatar.folder.name
            finally:
                avatar.close(delete=False)
            return
        with self.cache.making(key, "musetalk") as folder:
            store = SourceStore(folder, info.height, info.width)
            # What a job given this avatar's id needs to know of the source it no longer sends.
            store.meta = {"kind": info.kind, "fps": str(info.fps)}
            try:
                with self._preparation(info, options, generator, store, None, timer, report) as preparation:
                    yield preparation, key
                    preparation.finish()
                with timer("cache"):
                    store.save_index()
            finally:
                store.close(delete=False)

    def _preparation(self, info: MediaInfo, options: MuseTalkOptions, generator: FaceGenerator, store: SourceStore,
                     limit: Optional[int], timer: StageTimer, report: Progress) -> Preparation:
        return Preparation(info, options, self.faces, generator.vae, self.mask_net, self._pool, store, limit,
                           timer, report)

    def _preparation_settings(self, options: MuseTalkOptions, generator: FaceGenerator) -> Dict[str, object]:
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
    def _generate(
        self,
        source: Union[Preparation, Prepared],
        prompts: AudioPrompts,
        generator: FaceGenerator,
        options: MuseTalkOptions,
        encoder: VideoEncoder,
        timer: StageTimer,
        report: Progress,
    ) -> None:
        """Second pass: generate every output frame in order.

        Three threads overlap: one prepares the source frames the next batches
        need and reads them from the store, this one queues the UNet, VAE
        decoder and blending on the device, and one pastes the blended regions
        into their frames and feeds the encoder.
        """
        total = len(prompts)
        store = source.store
        blender = FaceBlender(self.device)
        # A weight of 0 takes nothing of the restored face: skip the network, same frames as restore off.
        track = None
        if options.restore and options.restore_weight > 0:
            track = AlignmentTrack(store.points, lambda: len(store))
        with Prefetcher(_read_batches(source, total, options.batch_size, timer, track)) as batches, \
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
                        composite = blender.composite(batch.pixels, faces, batch.masks, store.width, store.height)
                    if batch.placements is not None:
                        with timer.device("restore"):
                            composite = blender.restore(composite, batch.windows, batch.placements, self.restorer,
                                                        options.restore_weight, options.restore_region)
                    with timer.device("blend"):
                        blended = blender.finish(composite)
                writer.put(batch, blended)
                report("generate", batch.start + len(batch.sources), total)

    def _generator(self, options: MuseTalkOptions) -> FaceGenerator:
        dtype = self._half_dtype() if options.fp16 else torch.float32
        fixed_batch = options.batch_size if self.acceleration.compile != "off" else None
        return FaceGenerator(self._unet(options.version, dtype), self.vae(dtype), fixed_batch)

    def _activate_adapter(self, options: MuseTalkOptions, generator: FaceGenerator, adapter: Optional[Path]) -> None:
        """Makes ``adapter`` the active LoRA of the job's UNet (loading it, or taking it from the cache), or
        turns every loaded adapter off (``adapter`` None: the UNet then computes as the plain base)."""
        from ...train import adapter as adapters

        key = (options.version, generator.dtype)
        unet = self._unets[key]
        loaded = self._adapters.setdefault(key, collections.OrderedDict())
        if adapter is None:
            adapters.use_adapter(unet, None)
            return
        if self.acceleration.compile != "off":
            raise LipSyncError(
                ErrorCode.INVALID_INPUT,
                f"'adapter' cannot be used on this worker: its UNet is compiled with torch.compile "
                f"(MUSETALK_COMPILE={self.acceleration.compile}), and switching LoRA layers would recompile it "
                "for every job. Send the job to a worker without torch.compile, or leave 'adapter' out.",
                stage="load",
            )
        digest = adapters.sha256_file(adapters.adapter_file(adapter))
        if digest in loaded:
            loaded.move_to_end(digest)
            adapters.use_adapter(unet, loaded[digest])
            return
        adapters.use_adapter(unet, None)
        info = adapters.load_adapter(unet, adapter, name=f"job_{digest[:16]}", base=self._base_hashes(options.version))
        loaded[digest] = info.name
        while len(loaded) > ADAPTER_CACHE_SIZE:
            _, oldest = loaded.popitem(last=False)
            adapters.unload_adapter(unet, oldest)
        adapters.use_adapter(unet, info.name)
        logger.info("adapter %s loaded on the %s UNet (rank %d, alpha %g; %d kept)", digest[:12], options.version,
                    info.rank, info.alpha, len(loaded))

    def _base_hashes(self, version: str) -> Dict[str, str]:
        """SHA-256 of the UNet files of ``version`` (config and the weights loaded), by models-folder path,
        as a fit records them; each file is hashed once per process.

        A UNet the downloader converted (``unet.pth`` -> ``unet.safetensors``, recorded beside the weights
        with both hashes) takes the recorded hash when the size matches, and also answers for the file it
        was converted from, so an adapter fitted on either form of the same weights is checked against it.
        """
        from ...train.adapter import sha256_file
        from ...weights import LockError, read_conversions

        folder, candidates = UNET_FILES[version]
        weights = [c for c in candidates if (self.models_dir / folder / c).exists()][:1]
        try:
            conversions = read_conversions(self.models_dir)
        except LockError:
            conversions = {}
        hashes = {}
        for name in [UNET_CONFIG, *weights]:
            relative, path = f"{folder}/{name}", self.models_dir / folder / name
            stat = path.stat()
            key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
            converted = conversions.get(relative)
            if converted is not None and converted.size == stat.st_size:
                _BASE_HASHES.setdefault(key, converted.sha256)
                hashes.setdefault(converted.source_path, converted.source_sha256)
            if key not in _BASE_HASHES:
                _BASE_HASHES[key] = sha256_file(path)
            hashes[relative] = _BASE_HASHES[key]
        return hashes

    def _half_dtype(self) -> torch.dtype:
        return half_dtype(self.device, self.acceleration.half_dtype)

    def vae(self, dtype: torch.dtype) -> torch.nn.Module:
        """The autoencoder in ``dtype`` (loaded, and sped up as the deployment says, on first use)."""
        if dtype not in self._vaes:
            vae = load_vae(self.models_dir, self.device, dtype)
            speed_up(vae.decoder, self.acceleration)
            self._vaes[dtype] = vae
        return self._vaes[dtype]

    def _unet(self, version: str, dtype: torch.dtype) -> torch.nn.Module:
        if (version, dtype) not in self._unets:
            unet = load_unet(self.models_dir, version, self.device, dtype)
            self._unets[(version, dtype)] = speed_up(unet, self.acceleration)
            self.vae(dtype)
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
    # With restoration, per position with a face: its alignment, and the source's pixels in its window.
    placements: Optional[List[Placement]] = None
    windows: Optional[List[np.ndarray]] = None


def _read_batches(source: Union[Preparation, Prepared], total: int, batch_size: int, timer: StageTimer,
                  track: Optional[AlignmentTrack] = None) -> Iterator[_Batch]:
    """The batches of ``total`` output frames, in ping-pong order over the source frames.

    Each batch first has its source frames prepared: output frame ``i`` is
    source frame ``i`` until the source is used up, so the store holding
    ``i + 1`` frames (or the whole source) is all a batch needs; with
    restoration (``track``), ``SMOOTH_RADIUS`` frames more, which the
    smoothing of the alignment looks at.
    """
    store = source.store
    for start in range(0, total, batch_size):
        end = min(start + batch_size, total)
        source.ensure(end + (SMOOTH_RADIUS if track is not None else 0))
        with timer("read"):
            sources = [_ping_pong(i, len(store)) for i in range(start, end)]
            with_face = [k for k, j in enumerate(sources) if store.box(j) is not None]
            masks = [store.mask(sources[k]) for k in with_face]
            regions = [visible_part(mask.box, store.width, store.height) for mask in masks]
            latents = torch.stack([store.latent(sources[k]) for k in with_face]) if with_face else None
            placements = windows = None
            if track is None:
                pixels = [store.pixels(sources[k], region) for k, region in zip(with_face, regions)]
            else:
                placements, windows, pixels = [], [], []
                for k, region in zip(with_face, regions):
                    matrix = track.matrix(sources[k])
                    window = context_window(matrix, region, store.width, store.height)
                    # The box lies inside the window: one read gives both.
                    windows.append(store.pixels(sources[k], window))
                    (x1, y1, x2, y2), (wx, wy) = region, window[:2]
                    pixels.append(windows[-1][y1 - wy : y2 - wy, x1 - wx : x2 - wx])
                    placements.append(Placement(matrix, window, region))
        yield _Batch(start, sources, with_face, latents, masks, pixels, placements, windows)


def _check_alignable(store: SourceStore) -> None:
    """Refuses restoration of a prepared avatar whose faces have no landmarks (it was prepared with boxes).

    Raises:
        LipSyncError(invalid_input): a frame with a face has no alignment points.
    """
    if any(store.box(j) is not None and store.points(j) is None for j in range(len(store))):
        raise LipSyncError(
            ErrorCode.INVALID_INPUT,
            "'restore' cannot be used with this 'avatar_id': it was prepared from given 'boxes', without the "
            "landmarks that aligning the face needs. Send the 'source' without 'boxes', or set 'restore' to false.",
            stage="validate",
        )


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


def _ping_pong(index: int, count: int) -> int:
    """Source frame of output frame ``index``: forwards, then backwards, and again."""
    k = index % (2 * count)
    return k if k < count else 2 * count - 1 - k
