"""Per-stage timing of upstream MuseTalk's ``scripts/inference.py``, from outside its files.

:mod:`bench.side_by_side` copies this file, as ``sitecustomize.py``, into a
folder it puts first on the upstream process's ``PYTHONPATH``. Python imports
``sitecustomize`` at start-up, before the script; this module then installs an
import hook that, as each upstream module finishes importing, replaces some of
its functions with timed wrappers (the files themselves are never changed).
Wrapping happens before ``scripts/inference.py`` runs its ``from ... import``
lines, so the names it imports are the wrapped ones.

At exit it writes a JSON report to ``$SIDE_BY_SIDE_REPORT``: seconds and
calls/items per stage, the wall-clock instant it was imported
(``started``), the instant loading ended (``loaded``: the first call of
``AudioProcessor.get_audio_feature``, when the first task starts) and the end.

Only the standard library is imported here (the upstream Python need not have
this project installed); torch is used only once upstream has imported it.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import json
import os
import sys
import time

STARTED = time.time()
REPORT_ENV = "SIDE_BY_SIDE_REPORT"

# stage -> seconds; stage -> items (frames) processed; stage -> calls.
seconds: dict = {}
items: dict = {}
calls: dict = {}
marks: dict = {"started": STARTED}
_depth: dict = {}


def _synchronize() -> None:
    """Waits for queued CUDA work, so device stages are timed whole (a no-op before torch or on the CPU)."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def add(stage: str, elapsed: float, count: int = 1) -> None:
    seconds[stage] = seconds.get(stage, 0.0) + elapsed
    items[stage] = items.get(stage, 0) + count
    calls[stage] = calls.get(stage, 0) + 1


def timed(stage: str, count=None, sync: bool = False):
    """A decorator adding a call's wall time to ``stage``; ``count(args, kwargs, result)`` gives its items.

    A stage entered again from inside itself (recursion) is counted once.
    """

    def wrap(function):
        if getattr(function, "_side_by_side", None):
            return function

        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if _depth.get(stage):
                return function(*args, **kwargs)
            _depth[stage] = 1
            if sync:
                _synchronize()
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
                if sync:
                    _synchronize()
            finally:
                _depth[stage] = 0
            add(stage, time.perf_counter() - start, 1 if count is None else count(args, kwargs, result))
            return result

        wrapper._side_by_side = True
        return wrapper

    return wrap


def _mark_loaded(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        marks.setdefault("loaded", time.time())
        return function(*args, **kwargs)

    return wrapper


def _patch_method(cls, name: str, decorator) -> None:
    if cls is not None and hasattr(cls, name):
        setattr(cls, name, decorator(getattr(cls, name)))


def _patch_preprocessing(module) -> None:
    # Its import builds DWPose and S3FD: that is loading, and is inside the load time anyway.
    for name, stage in (("read_imgs", "read"), ("get_landmark_and_bbox", "faces")):
        if hasattr(module, name):
            setattr(module, name, timed(stage, count=lambda a, k, r: len(a[0]) if a else 1)(getattr(module, name)))


def _patch_audio_processor(module) -> None:
    cls = getattr(module, "AudioProcessor", None)
    _patch_method(cls, "get_audio_feature", lambda f: _mark_loaded(timed("audio", count=lambda a, k, r: 0)(f)))
    _patch_method(cls, "get_whisper_chunk", timed("audio", count=lambda a, k, r: len(r), sync=True))


def _patch_vae(module) -> None:
    cls = getattr(module, "VAE", None)
    # One call per source frame (both encodes of its crop).
    _patch_method(cls, "get_latents_for_unet", timed("latents", sync=True))
    _patch_method(cls, "decode_latents", timed("vae_decode", count=lambda a, k, r: len(r), sync=True))


def _patch_unet(module) -> None:
    cls = getattr(module, "UNet", None)
    if cls is None:
        return
    original = cls.__init__

    @functools.wraps(original)
    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        model = getattr(self, "model", None)
        if model is not None and hasattr(model, "register_forward_pre_hook"):
            _time_module(model, "unet")

    cls.__init__ = init


def _time_module(model, stage: str) -> None:
    """Times every forward of ``model`` with hooks (upstream calls ``unet.model(...)`` directly)."""
    started = []

    def before(module, inputs):
        _synchronize()
        started.append(time.perf_counter())

    def after(module, inputs, output):
        _synchronize()
        batch = inputs[0].shape[0] if inputs and hasattr(inputs[0], "shape") else 1
        add(stage, time.perf_counter() - started.pop(), batch)

    model.register_forward_pre_hook(before)
    model.register_forward_hook(after)


def _patch_blending(module) -> None:
    if hasattr(module, "get_image"):
        module.get_image = timed("blend_total")(module.get_image)
    # The per-frame PNG writes of the padding loop (``cv2.imwrite`` is looked up on the module at each call).
    cv2 = sys.modules.get("cv2")
    if cv2 is not None and not getattr(cv2.imwrite, "_side_by_side", False):
        cv2.imwrite = timed("write_png")(cv2.imwrite)


def _patch_face_parsing(module) -> None:
    _patch_method(getattr(module, "FaceParsing", None), "__call__", timed("masks"))


def _classify_command(command: str) -> str:
    if "-start_number" in command:
        return "ffmpeg_decode"
    if "image2" in command:
        return "ffmpeg_encode"
    return "ffmpeg_mux"


def _patch_os_system() -> None:
    original = os.system

    @functools.wraps(original)
    def system(command):
        start = time.perf_counter()
        try:
            return original(command)
        finally:
            add(_classify_command(str(command)), time.perf_counter() - start)

    os.system = system


PATCHES = {
    "musetalk.utils.preprocessing": _patch_preprocessing,
    "musetalk.utils.audio_processor": _patch_audio_processor,
    "musetalk.models.vae": _patch_vae,
    "musetalk.models.unet": _patch_unet,
    "musetalk.utils.blending": _patch_blending,
    "musetalk.utils.face_parsing": _patch_face_parsing,
}


class _PatchingFinder(importlib.abc.MetaPathFinder):
    """Finds the modules named in PATCHES with the other finders and patches each right after it runs."""

    def find_spec(self, name, path, target=None):
        if name not in PATCHES:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _PatchingLoader(spec.loader, PATCHES[name])
                return spec
        return None


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader, patch):
        self._loader = loader
        self._patch = patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)


def report() -> dict:
    """What was measured so far."""
    return {"marks": {**marks, "ended": time.time()}, "seconds": seconds, "items": items, "calls": calls}


def _write_report() -> None:
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "w") as handle:
            json.dump(report(), handle)


def install() -> None:
    """Installs the import hook, the ``os.system`` wrapper and the report at exit (once)."""
    if any(isinstance(f, _PatchingFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _PatchingFinder())
    _patch_os_system()
    atexit.register(_write_report)


if os.environ.get(REPORT_ENV):
    install()
