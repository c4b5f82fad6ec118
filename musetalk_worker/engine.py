"""The one interface between the worker (and the CLI, the benchmarks) and the lip-sync engines.

Each model family lives in ``engines/<name>/`` and offers a class with
``from_config(EngineConfig)``; :func:`load_engine` finds it by the job's
``model`` name, importing it only then (torch and the model code are heavy).
A loaded engine runs any number of jobs: ``engine(source, audio, output,
options, ...)`` returns a :class:`LipSyncResult`.
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path
from typing import Callable, Dict, Optional, Protocol, Union

from .allocator import keep_freed_memory
from .decode import MediaInfo
from .device import fit_cpu_threads
from .encode import HlsOutput
from .options import ENGINE_OPTIONS, EngineConfig, JobOptions

Progress = Callable[[str, int, int], None]

# model name -> "module:class" of its engine, relative to this package.
_ENGINES = {
    "musetalk": "engines.musetalk.pipeline:MuseTalkPipeline",
    "latentsync": "engines.latentsync.pipeline:LatentSyncPipeline",
}
assert set(_ENGINES) == set(ENGINE_OPTIONS), "every model needs an engine and an options class"


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
    model: str = "musetalk"
    version: str = ""
    cache_hit: Optional[bool] = None  # None when no avatar cache is set
    avatar_id: Optional[str] = None  # the prepared source's id in the avatar cache (None without one)


class Engine(Protocol):
    """A model family loaded once; each call is one job."""

    def warm_up(self) -> None:
        """Runs the loaded networks once, so the first job pays no kernel set-up (nothing where a first
        call has none: :func:`.device.warm_up_pays`)."""

    def __call__(self, source: Union[Path, MediaInfo, None], audio: Union[Path, MediaInfo], output: Path,
                 options: JobOptions, *, avatar_id: Optional[str] = None, progress: Optional[Progress] = None,
                 workdir: Optional[Path] = None, hls: Optional[HlsOutput] = None,
                 adapter: Optional[Path] = None) -> LipSyncResult:
        """Makes ``output`` (mp4): the source's face speaking ``audio``, as ``options`` (the model's) say.

        ``adapter``: a LoRA adapter (folder or ``adapter.safetensors``) active for this job only; an
        engine that takes none raises ``invalid_input`` naming ``adapter``.
        """


def load_engine(model: str, config: EngineConfig) -> Engine:
    """Loads the engine of ``model`` (``musetalk`` or ``latentsync``) as ``config`` says, first fitting the
    process to the machine: torch's CPU threads to the usable CPUs, malloc to keep the memory the networks
    free for their next image (:mod:`.allocator`).

    Raises:
        KeyError: an unknown model (the job schema refuses those before).
        LipSyncError: missing models or libraries, named.
    """
    fit_cpu_threads()
    keep_freed_memory()
    module, _, name = _ENGINES[model].partition(":")
    return getattr(importlib.import_module(f".{module}", __package__), name).from_config(config)
