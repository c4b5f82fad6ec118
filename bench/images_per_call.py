"""How many images per call the engine's networks run fastest with, on one device.

The engine feeds the VAE's encoder and decoder and BiSeNet face parsing
:func:`musetalk_worker.device.images_per_call` images per call (one on the
CPU, the whole batch elsewhere) and the UNet whole batches. This measures the
per-image time of each network at several call sizes, on the same random
inputs, so that choice can be checked on a new machine (an Apple Mac, a
different CPU)::

    python -m bench.images_per_call --device cpu --sizes 1 2 8
    python -m bench.images_per_call --models ~/.cache/musetalk-worker/bench-models --sizes 1 4 --repeats 1

Each figure is the fastest of ``--repeats`` timed passes over ``max(sizes)``
images after one untimed pass. Default models: the parity fixture's small ones.

Beside the times, each network's arithmetic per image (counted by
``torch.utils.flop_counter`` in the untimed pass) and the rate it reaches,
against a large dense matrix product in the network's dtype on the same device:
how near a network already is to what the device's arithmetic can give.

Malloc is set as the engine sets it (:func:`musetalk_worker.allocator.keep_freed_memory`),
and each network's minor page faults per image, at its fastest size, show what
that saves: start with glibc's variables (``MALLOC_MMAP_THRESHOLD_=131072``)
to see the faults the setting spares.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from . import FIXTURE_MODELS, describe_machine, engine_version, machine, parse_args


@dataclasses.dataclass
class Measured:
    """Milliseconds per image by network and images per call, each network's GFLOP per image and its dtype,
    and the minor page faults per image of the timed passes, by network and images per call."""

    ms_per_image: Dict[str, Dict[int, float]]
    gflop_per_image: Dict[str, float]
    dtypes: Dict[str, str]
    faults_per_image: Dict[str, Dict[int, float]] = dataclasses.field(default_factory=dict)


def _per_image(run: Callable[[], None], count: int, repeats: int,
               sync: Callable[[], None]) -> Tuple[float, float, float]:
    """(ms per image, GFLOP per image, page faults per image): the fastest timed pass, the arithmetic of the
    untimed first one, and the minor page faults of the timed ones (the whole process's: nothing else runs)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    sync()
    best = float("inf")
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        sync()
        best = min(best, time.perf_counter() - started)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    return 1000 * best / count, counter.get_total_flops() / count / 1e9, faults / (repeats * count)


def gemm_gflops(device_name: str, dtype_name: str, size: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of one ``size``-square matrix product in ``dtype_name``: the fastest of ``repeats``, after two."""
    import torch

    from musetalk_worker.device import resolve_device

    device = resolve_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator).to(device, getattr(torch, dtype_name)) for _ in range(2))
    for _ in range(2):
        torch.mm(a, b)
    sync()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


def measure(models: Path, device_name: str, sizes: List[int], repeats: int,
            dtype_name: str = "float32") -> Measured:
    """Milliseconds per image of each network at each call size, and its GFLOP per image.

    Each runs through the engine's own class (inputs laid out as a job lays
    them out), with its images-per-call setting replaced by the size tried.
    ``dtype_name`` is the UNet's and VAE's (face parsing is always float32, as in a job).
    """
    import numpy as np
    import torch
    from PIL import Image

    from musetalk_worker.device import resolve_device
    from musetalk_worker.engines.musetalk.generate import FaceGenerator
    from musetalk_worker.engines.musetalk.latents import LatentEncoder
    from musetalk_worker.engines.musetalk.masks import MaskMaker
    from musetalk_worker.engines.musetalk.models import load_face_parser, load_unet, load_vae

    device = resolve_device(device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    count = max(sizes)
    rng = np.random.default_rng(0)
    generator = torch.Generator().manual_seed(0)
    dtype = getattr(torch, dtype_name)
    vae = load_vae(models, device, dtype)
    encoder = LatentEncoder(vae)
    faces = FaceGenerator(load_unet(models, "v15", device, dtype), vae)
    parser = MaskMaker(load_face_parser(models, device))
    crops = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(count)]
    squares = [Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8)) for _ in range(count)]
    latents = torch.randn(count, 4, 32, 32, generator=generator)
    references = torch.randn(count, 8, 32, 32, generator=generator)
    prompts = torch.randn(count, 50, 384, generator=generator)

    def unet_in_calls(size: int) -> None:
        for start in range(0, count, size):
            faces.predict_latents(references[start : start + size], prompts[start : start + size])

    # name: (run one pass at a call size, images in a pass); the engine's classes take the size as a setting.
    networks: Dict[str, Tuple[Callable[[int], object], int]] = {
        # Two images per crop (masked and whole).
        "VAE encode (per image)": (lambda size: _with(encoder, "images_per_call", size, encoder.encode, crops),
                                   2 * count),
        "VAE decode": (lambda size: _with(faces, "decodes_per_call", size, faces.decode, latents), count),
        "face parsing (512x512)": (lambda size: _with(parser, "images_per_call", size, parser.parse, squares), count),
        "UNet": (unet_in_calls, count),
    }
    measured = Measured({}, {}, {})
    for name, (run, items) in networks.items():
        measured.dtypes[name] = "float32" if name.startswith("face parsing") else dtype_name
        timed = {size: _per_image(lambda: run(size), items, repeats, sync) for size in sizes}
        measured.ms_per_image[name] = {size: ms for size, (ms, _, _) in timed.items()}
        measured.faults_per_image[name] = {size: faults for size, (_, _, faults) in timed.items()}
        # The arithmetic per image does not depend on the call size.
        measured.gflop_per_image[name] = timed[sizes[0]][1]
    return measured


def _with(owner: object, setting: str, size: int, call: Callable, inputs) -> object:
    setattr(owner, setting, size)
    return call(inputs)


def render(measured: Measured, sizes: List[int], gemm: Dict[str, float]) -> str:
    """A markdown table: one row per network, one column per call size (the fastest in bold), then the network's
    GFLOP per image and the rate of its fastest size, also as a share of the matrix product's GFLOP/s in the
    network's dtype (``gemm``: {dtype: GFLOP/s}), and the page faults per image at that size."""
    lines = ["| ms per image | " + " | ".join(f"{s} per call" for s in sizes)
             + " | GFLOP per image | GFLOP/s (fastest) | of the matrix product | page faults per image (fastest) |",
             "| --- | " + " | ".join("---:" for _ in sizes) + " | ---: | ---: | ---: | ---: |"]
    for name, row in measured.ms_per_image.items():
        size = min(row, key=row.get)
        cells = [f"**{row[s]:.1f}**" if s == size else f"{row[s]:.1f}" for s in sizes]
        gflop = measured.gflop_per_image[name]
        rate = gflop / (row[size] / 1000)
        share = rate / gemm[measured.dtypes[name]]
        faults = measured.faults_per_image.get(name, {}).get(size)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {gflop:.2f} | {rate:.0f} | {share:.0%} | "
                     + ("—" if faults is None else f"{faults:.0f}") + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=Path, default=FIXTURE_MODELS, help="models folder (standard layout)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 8], help="images per call to try")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes; the fastest counts")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default torch's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the UNet's and VAE's dtype (a job's fp16 is bfloat16 on the CPU)")
    args = parse_args(parser, argv)
    from musetalk_worker.allocator import keep_freed_memory, malloc_set_by_environment

    kept = keep_freed_memory()  # as load_engine sets it for every engine
    malloc = ("freed memory kept (the engine's setting)" if kept
              else "the environment's settings" if malloc_set_by_environment() else "the C library's defaults")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    sizes = sorted(set(args.sizes))
    info = machine()
    measured = measure(args.models, args.device, sizes, args.repeats, args.dtype)
    gemm = {dtype: gemm_gflops(args.device, dtype) for dtype in sorted(set(measured.dtypes.values()))}
    import torch

    print(f"{describe_machine(info)}; device {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads, {args.dtype}; malloc: {malloc}; models {args.models}; "
          f"engine {engine_version()}\n")
    print(render(measured, sizes, gemm))
    rates = ", ".join(f"{rate:.0f} GFLOP/s in {dtype}" for dtype, rate in gemm.items())
    print(f"\nmatrix product (4096x4096 @ 4096x4096) on this device: {rates} (face parsing is float32, as in a job)")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "models": str(args.models), "device": args.device,
                                         "dtype": args.dtype, "figures": measured.ms_per_image,
                                         "gflop_per_image": measured.gflop_per_image, "dtypes": measured.dtypes,
                                         "faults_per_image": measured.faults_per_image, "malloc": malloc,
                                         "gemm_gflops": gemm},
                                        indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
