"""The one thread that runs the worker's torch work on the CPU.

torch's CPU build parallelises with OpenMP (libgomp), which gives every thread that opens a
parallel region its own team of worker threads. Once a process holds more OpenMP threads than
the machine has cores, libgomp stops spinning between regions (100 spins instead of ~3 ms) and
parks its workers, so every parallel region of a step pays futex wake-ups. A worker that loaded
its model on one thread and ran steps on others (``asyncio.to_thread`` picks any idle thread of
the pool) had two or more teams: its bfloat16 decode steps were 15 % (batch 1) to 28 % (batch
64) slower than the same steps run on the loading thread (docs/BENCHMARKS.md). So loading,
packing and every CPU step run here, on one long-lived thread with one team.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


@functools.cache
def executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(1, thread_name_prefix="compute")


async def run(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the compute thread, awaited from the event loop."""
    return await asyncio.get_running_loop().run_in_executor(executor(), fn, *args)


def call(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the compute thread, from synchronous code (benchmarks, tests)."""
    return executor().submit(fn, *args).result()
