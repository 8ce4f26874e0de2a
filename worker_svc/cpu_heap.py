"""The CPU worker's memory: kept when its steps free it, and on huge pages.

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

The KV cache, the weights and a step's activations are walked with 4 KiB pages otherwise: a
decode step of 64 sequences reads ~300 MB of K/V in 16 KiB blocks scattered over the cache, and
each new page is a TLB miss and a page walk. torch's CPU allocator puts buffers of 2 MiB and more
on transparent huge pages when ``THP_MEM_ALLOC_ENABLE=1`` (2 MiB-aligned, ``madvise``); the
worker sets it unless the environment already does (measured on 2 Zen 3 cores, float32, 64 x 256
prompts: prefill 6.35 -> 5.64 s, a decode step of 64 50.9 -> 44.8 ms; docs/BENCHMARKS.md). torch
reads it once, at its first such allocation, so it is set before the weights load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
from pathlib import Path

log = logging.getLogger("worker.heap")

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest (HEAP_MAX_SIZE / 2 on 64-bit)
TRIM_THRESHOLD = 1 << 30
HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"  # torch's switch: buffers >= 2 MiB on transparent huge pages
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def prepare_process() -> None:
    """Both settings, before the weights load and before any thread starts (idempotent)."""
    keep_freed_memory()
    use_huge_pages()


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


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise or never); "" where unknown."""
    try:
        text = THP_MODE.read_text()
    except OSError:
        return ""
    chosen = [w for w in text.split() if w.startswith("[")]
    return chosen[0].strip("[]") if chosen else ""


@functools.cache
def use_huge_pages() -> bool:
    """Ask torch for huge pages (unless ``THP_MEM_ALLOC_ENABLE`` is set already, e.g. to 0);
    whether large buffers will get them."""
    os.environ.setdefault(HUGE_PAGES, "1")
    mode = thp_mode()
    enabled = os.environ[HUGE_PAGES] == "1" and mode in ("always", "madvise")
    log.info("large buffers on huge pages: %s (%s=%s, kernel mode %s)", "yes" if enabled else "no",
             HUGE_PAGES, os.environ[HUGE_PAGES], mode or "unknown")
    return enabled


def huge_page_bytes() -> int:
    """Anonymous memory of this process on huge pages, in bytes (0 where unknown)."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(ln.split()[1]) << 10 for ln in lines if ln.startswith("AnonHugePages:"))
