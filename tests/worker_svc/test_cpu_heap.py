"""The CPU worker keeps the memory its steps free: a step's activations come back from the heap
at the next step, not as fresh pages that fault in one by one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker_svc import cpu_heap

REPO = Path(__file__).resolve().parents[2]

# Steps as the compute thread runs them (a thread of its own, started after the heap settings):
# each holds a prefill chunk's activations of the small test model at once (its projections'
# outputs, 512/2,816/1,408 wide, bfloat16; 44 MiB at 2,048 rows) and frees them all. Chunk
# sizes vary as a server's do. The heap grows while its free space is too fragmented for the
# largest step (measured: to 1.2-3.3x the working set within 9 steps), then stops. Prints the
# page faults of the 18 steps after 18 steps of settling.
STEPS = """
import resource, sys, threading
import torch
from worker_svc import cpu_heap
if sys.argv[1] == "worker":
    assert cpu_heap.keep_freed_memory()
ROWS = (2048, 2048, 2048, 1024, 2048, 512, 2048, 1536, 2048, 2048)
faults = []
def step(rows):
    outs = [torch.ones(rows, n, dtype=torch.bfloat16) for n in (512, 2816, 1408, 512, 2816, 512)]
    return sum(float(o[-1, -1]) for o in outs)
def run():
    for i in range(36):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step(ROWS[i % len(ROWS)])
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=run)
thread.start()
thread.join()
print(*faults[18:])
"""


def faults(heap: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", STEPS, heap], capture_output=True, text=True,
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"},
                         check=True, timeout=120)
    return [int(n) for n in out.stdout.split()]


def test_steps_reuse_the_memory_the_last_ones_freed() -> None:
    if not cpu_heap.keep_freed_memory():
        pytest.skip("libc is not glibc")
    worker = faults("worker")
    assert sum(worker) < 100, worker
    # The same steps under glibc's own thresholds: it hands most 2,048-row steps' memory back to
    # the kernel, so they fault it in anew (measured: 5,633 pages per such step, 73,229 over
    # these 18, on every run). Shows that the assertion above is the settings' doing.
    assert sum(faults("glibc")) > 10_000
