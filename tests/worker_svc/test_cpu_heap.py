"""The CPU worker keeps the memory its steps free: a step's activations come back from the heap
at the next step, not as fresh pages that fault in one by one. Its KV cache and other large
buffers are on transparent huge pages."""

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


# A CPU worker's runner as the worker builds it, with a 64 MiB KV cache; prints the cache's bytes
# and the process's anonymous memory on huge pages.
RUNNER = """
import sys
from pagewire.config import WorkerConfig
from worker_svc import cpu_heap
from worker_svc.server import build_runner
cfg = WorkerConfig(model=sys.argv[1], device="cpu", dtype="float32", kv_cache_gb=1 / 16, threads=1)
runner, _ = build_runner(cfg)
print(sum(2 * k.numel() * k.element_size() for k, _ in runner.kv_caches), cpu_heap.huge_page_bytes())
"""


def kv_and_huge_bytes(model: Path, **env: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", RUNNER, str(model)], capture_output=True,
                         text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), **env}, check=True,
                         timeout=120)
    kv, huge = out.stdout.split()
    return int(kv), int(huge)


def test_the_kv_cache_is_on_huge_pages_unless_the_environment_says_no(tiny_model: Path) -> None:
    mode = cpu_heap.thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode or 'unknown'} on this machine")
    kv, huge = kv_and_huge_bytes(tiny_model)
    # Most of it: a fault falls back to small pages where the kernel finds no free 2 MiB at once.
    assert kv >= 60 << 20 and huge >= kv // 2, (kv, huge)
    if mode == "madvise":  # only buffers that ask get them: the setting's doing, and its off switch
        assert kv_and_huge_bytes(tiny_model, THP_MEM_ALLOC_ENABLE="0")[1] < kv // 8


def test_the_mode_is_read_from_the_kernels_setting(tmp_path: Path, monkeypatch) -> None:
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(cpu_heap, "THP_MODE", setting)
    assert cpu_heap.thp_mode() == "madvise"
    monkeypatch.setattr(cpu_heap, "THP_MODE", tmp_path / "absent")
    assert cpu_heap.thp_mode() == ""
