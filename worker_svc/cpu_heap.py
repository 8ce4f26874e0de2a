"""The CPU worker keeps the memory its steps free, instead of handing it back to the kernel.

A prefill step's activations are megabytes each (a 2,048-token chunk's gate/up product of the
small test model is 11.5 MB in bfloat16). glibc serves blocks that large with ``mmap`` and
returns them with ``munmap`` on free, trims the top of its heaps, and gives each thread that
allocates (the compute thread, OpenMP's) an arena of 64 MiB heaps that are unmapped once empty,
so the next step gets fresh pages and faults on every one of them: 50,000-166,000 page faults per
64 x 256 prefill, 15 % of its time (docs/BENCHMARKS.md). vLLM's CPU worker preloads tcmalloc for
the same reason; here three ``mallopt`` settings do it: one arena (the main heap, which grows
without a cap), blocks up to 32 MiB (glibc's largest mmap threshold) from it, and no trimming
below 1 GiB of free space. The worker's steady footprint is its largest step's working set, which
it needs again at the next such step anyway. Call it before the threads start: a thread keeps
the arena it first allocated from.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

log = logging.getLogger("worker.heap")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Set glibc's thresholds for this process (once); False where libc is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = libc.mallopt if libc is not None else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        log.info("no mallopt (not glibc): freed step memory goes back to the kernel")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    settings = ((M_ARENA_MAX, 1), (M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return all([bool(mallopt(param, value)) for param, value in settings])
