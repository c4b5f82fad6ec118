"""How the C allocator keeps the memory the networks free, so a job's tensors do not cost page faults.

glibc's malloc gives every block above its mmap threshold (128 KiB, raised
as such blocks are freed, up to 32 MiB) fresh pages from the kernel and hands
them back on free, and trims the top of its heaps whenever 128 KiB lie free
there. A VAE decode allocates and frees tens of MiB of activations per image,
so each image paid page faults on memory just given back. With the threshold
held at 128 KiB (what the worker image set until now) the small decoder took
252 ms and 130k faults per image on a 2-core CPU, against 113 ms and 4k with
this module's setting; the encoder and face parsing lost as much
(``bench.images_per_call``; bench/README.md, *Keeping freed memory*). Raising
both thresholds lets the next image reuse the pages; :func:`return_freed_memory`
gives them back once a job is done, so an idle worker does not sit on them.
Nothing numerical changes.

Only glibc (Linux) has these knobs; elsewhere, and under a preloaded
allocator, both functions do nothing. A process started with glibc's own
malloc variables (``MALLOC_MMAP_THRESHOLD_`` and the like, or
``GLIBC_TUNABLES`` naming ``glibc.malloc``) keeps them: they are the user's
choice, as ``OMP_NUM_THREADS`` is for threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from typing import Mapping, Optional

logger = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
# The largest mmap threshold glibc accepts (half its 64 MiB arena heaps on 64-bit); blocks above it, rare
# (only the real-size networks' largest activations), still come straight from the kernel.
MMAP_THRESHOLD = 32 * 1024 * 1024
# Free memory a heap may keep at its top between frames; a job's working set is well below it.
TRIM_THRESHOLD = 1024 * 1024 * 1024
# One heap for every thread: malloc_trim returns the free top of the main heap only, and each thread
# heap's top would stay resident after a job (57-118 MiB with glibc's arenas against 42 with one, and no
# slower: bench/README.md). The networks allocate a few large blocks per operation, so the lock is cheap.
ARENAS = 1
# glibc's environment variables for these settings (read once, at start).
MALLOC_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                    "MALLOC_ARENA_MAX")


@functools.lru_cache(maxsize=1)
def glibc_malloc() -> Optional[ctypes.CDLL]:
    """glibc, when it is this process's malloc (not off glibc, nor when LD_PRELOAD put another allocator such
    as jemalloc first, where glibc's knobs would tune an allocator nobody calls); else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.gnu_get_libc_version  # noqa: B018 - glibc's own symbol: musl and macOS lack it
        first = ctypes.cast(ctypes.CDLL(None).malloc, ctypes.c_void_p).value
        if first != ctypes.cast(libc.malloc, ctypes.c_void_p).value:
            return None
        libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
        libc.malloc_trim.argtypes = (ctypes.c_size_t,)
    except (OSError, AttributeError, TypeError):
        return None
    return libc


def malloc_set_by_environment(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the process was started with glibc malloc settings of its own (variables or tunables)."""
    return any(name in environ for name in MALLOC_VARIABLES) or "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Lets malloc keep freed blocks of up to :data:`MMAP_THRESHOLD` for reuse instead of returning them
    to the kernel at once, in one heap (see the module's docstring). Process-wide, and for the threads
    started after it; returns whether it took effect (not where glibc is not the malloc, nor where the
    environment set it)."""
    libc = glibc_malloc()
    if libc is None or malloc_set_by_environment():
        return False
    applied = all([libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD), libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                   libc.mallopt(_M_ARENA_MAX, ARENAS)])
    if not applied:
        logger.warning("this C library refused the malloc thresholds; tensors keep costing page faults")
    return applied


def return_freed_memory() -> None:
    """Hands the memory malloc keeps free back to the kernel (after a job, so an idle worker is small)."""
    libc = glibc_malloc()
    if libc is not None:
        libc.malloc_trim(0)
