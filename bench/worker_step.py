"""Worker decode step time against the device's own time for the same step, with and without CUDA
graphs, in the worker's process (no scheduler, no gRPC): what the worker's host work costs.

    python bench/worker_step.py --shape qwen2.5-0.5b --batches 1,8,64,256
    python bench/worker_step.py --shape llama-3.1-8b --batches 1 --steps 128 --bound
    python bench/worker_step.py --device cpu --graphs off --packed on,off --rounds 3   # CPU bf16
    python bench/worker_step.py --device cpu --graphs off --elementwise on,off --rounds 5 \
        --model ~/.cache/pagewire/models/small-seed0 --batches 1,16,64 --prompt-len 256 --threads 2

For each batch size: the batch's prompts are prefilled, then ``--steps`` decode steps are run the
way the scheduler sends them (two in flight, each decode feeding the token the step before it
sampled) through the worker's own step loop. Reported per step:

- ``prefill_ms``: the batch's prefill, ``--prefill-chunk`` prompt tokens per step (after a
  first batch of other prompts: warm, but with lengths it has not seen with ``--prompt-jitter``);
- ``wall_ms``: wall time per step in that loop (launch of step N+1 overlapping step N);
- ``serial_ms``: wall time per step when each step is launched and awaited before the next;
- ``device_ms``: the summed kernel time of a step (torch profiler, CUDA only);
- ``host_share``: 1 - device_ms / wall_ms, the time the device sat idle waiting for the host.

``--packed on,off`` compares the CPU's pre-packed bfloat16 projections with plain ``F.linear``;
``--elementwise on,off`` the CPU's compiled RMSNorm/RoPE/SiLU (kernels/cpu_elementwise.py)
with their torch definitions; ``--layers on,off`` a CPU decode step's layers in one C call
(kernels/cpu_decode_layers.py) with the Python layers calling the same kernels one by one; ``--rounds N`` repeats every variant N times, alternating, and the
table gives medians and ranges. ``--model DIR`` runs a model directory (its real weights) instead
of a dummy-weight ``--shape``.

``--bound`` adds the memory-bandwidth bound of a decode step: weight bytes plus the K/V bytes it
reads, over the device-to-device copy bandwidth measured in the same run (bytes read + written).
Writes JSON (``--out``); prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import torch
from model_shapes import SHAPES, parse_override, write_shape

from kernels import cpu_decode_layers, cpu_elementwise
from pagewire.config import WorkerConfig
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc import compute_thread
from worker_svc.runner import ModelRunner
from worker_svc.server import build_runner
from worker_svc.step_pipeline import StepPipeline

BLOCK = 16
GREEDY = common_pb2.SamplingParams(temperature=0.0, ignore_eos=True)


def copy_bandwidth(device: torch.device, gib: float = 4.0) -> float:
    """Device-to-device copy, bytes read + written per second (median of 20)."""
    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.int16, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for _ in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * n * 2 / statistics.median(times[3:])


class Batch:
    """B sequences of one prompt length, with their block tables, driven as the scheduler does."""

    def __init__(self, batch: int, prompt_len: int, vocab: int, seed: int, jitter: float = 0.0) -> None:
        rng = np.random.default_rng(seed)
        lens = rng.integers(int(prompt_len * (1 - jitter)), prompt_len + 1, size=batch)
        self.prompts = [rng.integers(0, vocab, size=n).tolist() for n in lens]
        self.fed = [len(p) for p in self.prompts]
        self.blocks: list[list[int]] = []
        self.next_block = 0
        self.step_id = 0
        for p in self.prompts:
            n = -(-len(p) // BLOCK)
            self.blocks.append(list(range(self.next_block, self.next_block + n)))
            self.next_block += n

    def prefills(self, chunk_tokens: int) -> list[worker_pb2.Step]:
        steps, step, used = [], None, chunk_tokens
        for i, prompt in enumerate(self.prompts):
            if used + len(prompt) > chunk_tokens:
                self.step_id += 1
                step, used = worker_pb2.Step(step_id=self.step_id), 0
                steps.append(step)
            s = step.seqs.add(seq_id=i + 1, start_pos=0, token_ids=prompt, block_ids=self.blocks[i],
                              sample=True, new=True, prompt_len=len(prompt))
            s.sampling.CopyFrom(GREEDY)
            used += len(prompt)
        return steps

    def decodes(self, count: int) -> list[worker_pb2.Step]:
        steps = []
        for k in range(count):
            self.step_id += 1
            step = worker_pb2.Step(step_id=self.step_id)
            d = step.decodes
            for i in range(len(self.prompts)):
                new = -1
                if self.fed[i] // BLOCK >= len(self.blocks[i]):
                    new = self.next_block
                    self.blocks[i].append(new)
                    self.next_block += 1
                d.seq_ids.append(i + 1)
                d.positions.append(self.fed[i])
                d.new_block_ids.append(new)
                d.output_indices.append(k + 1)
                self.fed[i] += 1
            steps.append(step)
        return steps


def run_loop(runner: ModelRunner, steps: list[worker_pb2.Step]) -> float:
    """Seconds for ``steps`` through the worker's step loop, two in flight."""
    async def feed() -> AsyncIterator[worker_pb2.Step]:
        for s in steps:
            yield s

    async def go() -> None:
        async for _ in StepPipeline(runner).run(feed()):
            pass

    start = time.perf_counter()
    asyncio.run(go())
    return time.perf_counter() - start


def device_seconds(runner: ModelRunner, steps: list[worker_pb2.Step]) -> tuple[float, list] | None:
    """Summed kernel time of ``steps`` (CUDA only), and the kernels that took the most of it
    (name, microseconds per step, launches per step)."""
    if runner.device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_loop(runner, steps)
        torch.cuda.synchronize()
    kernels = sorted(prof.key_averages(), key=lambda e: -e.self_device_time_total)
    top = [(e.key[:80], e.self_device_time_total / len(steps), e.count / len(steps))
           for e in kernels[:12]]
    return sum(e.self_device_time_total for e in kernels) / 1e6, top


def measure(runner: ModelRunner, batch: int, args: argparse.Namespace, vocab: int) -> dict:
    """Prefill the batch's prompts (after a first batch of other prompts, so the worker is warm
    but this batch's lengths are new to it, as in serving), then time its decode steps."""
    runner.reset()
    warm = Batch(batch, args.prompt_len, vocab, seed=10_000 + batch, jitter=args.prompt_jitter)
    for step in warm.prefills(args.prefill_chunk):
        compute_thread.call(runner.execute, step)
    runner.reset()
    b = Batch(batch, args.prompt_len, vocab, seed=batch, jitter=args.prompt_jitter)
    t0 = time.perf_counter()
    for step in b.prefills(args.prefill_chunk):
        compute_thread.call(runner.execute, step)
    prefill_s = time.perf_counter() - t0
    run_loop(runner, b.decodes(8))  # warm-up: allocator, autotuning, lazy init
    steps = args.steps
    serial = []
    for step in b.decodes(steps):
        t0 = time.perf_counter()
        compute_thread.call(runner.execute, step)
        serial.append(time.perf_counter() - t0)
    wall = run_loop(runner, b.decodes(steps)) / steps
    dev = device_seconds(runner, b.decodes(steps))
    out = {"batch": batch, "wall_ms": wall * 1e3, "serial_ms": statistics.median(serial) * 1e3,
           "tok_s": batch / wall, "prefill_ms": prefill_s * 1e3}
    if dev is not None:
        out["device_ms"] = dev[0] / steps * 1e3
        out["host_share"] = 1 - out["device_ms"] / out["wall_ms"]
        out["top_kernels"] = dev[1]
    out["context"] = b.fed[0]
    return out


def bound(runner: ModelRunner, context: int, bandwidth: float) -> dict:
    model = runner.model
    seen, weight_bytes = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            weight_bytes += p.numel() * p.element_size()
    k = runner.kv_caches[0][0]
    kv_bytes = 2 * len(runner.kv_caches) * context * k.shape[2] * k.shape[3] * k.element_size()
    step_s = (weight_bytes + kv_bytes) / bandwidth
    return {"weight_gb": weight_bytes / 1e9, "kv_gb": kv_bytes / 1e9, "bound_ms": step_s * 1e3,
            "bound_tok_s": 1 / step_s}


VARIANT = ("graphs", "packed", "elementwise", "layers")


def variant(run: dict) -> tuple[str, ...]:
    return tuple(run.get(k, "on") for k in VARIANT)


def use_kernels(elementwise: bool, layers: bool) -> None:
    """Switch the compiled CPU elementwise ops, and the decode steps' one-call layer stack, on or
    off for the runners built from now on."""
    os.environ["PAGEWIRE_CPU_ELEMENTWISE"] = "1" if elementwise else "0"
    os.environ["PAGEWIRE_CPU_DECODE_LAYERS"] = "1" if layers else "0"
    cpu_elementwise.load.cache_clear()
    cpu_decode_layers.load.cache_clear()


def print_table(runs: list[dict]) -> None:
    """One row per variant and batch: medians over rounds, [min-max] when there were several."""
    cols = ["prefill_ms", "wall_ms", "serial_ms", "device_ms", "host_share", "tok_s", "of_bound"]
    print(" | ".join([*VARIANT, "batch", *cols]))
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((*variant(r), r["batch"]), []).append(r)
    for key, rows in groups.items():
        cells = []
        for c in cols:
            vals = [r[c] for r in rows if isinstance(r.get(c), float)]
            if not vals:
                cells.append("-")
                continue
            med = statistics.median(vals)
            cells.append(f"{med:.3f}" + (f" [{min(vals):.3f}-{max(vals):.3f}]" if len(vals) > 1 else ""))
        print(" | ".join([*map(str, key), *cells]))


def plot(report: dict, out: Path) -> Path:
    """Wall time per step beside the device's time, per batch size, graphs on and off."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    variants = sorted({variant(r) for r in report["runs"]})
    for v, marker in zip(variants, "os^v<>", strict=False):
        runs = [r for r in report["runs"] if variant(r) == v]
        by_batch: dict[int, list[dict]] = {}
        for r in runs:
            by_batch.setdefault(r["batch"], []).append(r)
        batches = sorted(by_batch)
        label = ", ".join(f"{k} {x}" for k, x in zip(VARIANT, v, strict=True))
        ax.plot(batches, [statistics.median(r["wall_ms"] for r in by_batch[b]) for b in batches],
                marker=marker, label=f"step, {label}")
        if all("device_ms" in r for r in runs):
            ax.plot(batches, [statistics.median(r["device_ms"] for r in by_batch[b]) for b in batches],
                    marker=marker, linestyle="--", label=f"device, {label}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("decode batch (sequences)")
    ax.set_ylabel("ms per step")
    ax.set_title(f"worker decode step, {report['shape']}")
    ax.legend()
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--override", action="append", default=[], help="config key=json-value")
    p.add_argument("--batches", default="1,8,64,256")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prefill-chunk", type=int, default=8192, help="prompt tokens per prefill step")
    p.add_argument("--prompt-jitter", type=float, default=0.0,
                   help="prompt lengths uniform in [len * (1 - jitter), len]")
    p.add_argument("--graphs", default="on,off", help="on, off, or on,off")
    p.add_argument("--packed", default="on", help="on, off, or on,off (CPU bfloat16 weights)")
    p.add_argument("--elementwise", default="on", help="on, off, or on,off (CPU compiled elementwise ops)")
    p.add_argument("--layers", default="on", help="on, off, or on,off (CPU decode steps' layers in one C call)")
    p.add_argument("--model", default="", help="a model directory (real weights) instead of --shape")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--bound", action="store_true")
    p.add_argument("--out", default="bench_worker_step.json")
    p.add_argument("--replot", default="", help="only redraw the plot of an earlier JSON")
    args = p.parse_args()
    if args.replot:
        print(plot(json.loads(Path(args.replot).read_text()), Path(args.replot)))
        return
    batches = [int(x) for x in args.batches.split(",")]
    if args.model:
        model_dir = Path(args.model).expanduser()
    else:
        model_dir = write_shape(args.shape, tempfile.mkdtemp(), parse_override(args.override))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    blocks = max(batches) * (-(-(args.prompt_len + 4 * args.steps + 16) // BLOCK)) + 16
    report: dict = {"shape": args.model or args.shape, "override": args.override, "args": vars(args), "runs": []}
    variants = [(g, p, e, la) for g in args.graphs.split(",") for p in args.packed.split(",")
                for e in args.elementwise.split(",") for la in args.layers.split(",")]
    for graphs, packed, elementwise, layers in variants * args.rounds:
        use_kernels(elementwise == "on", layers == "on")
        cfg = WorkerConfig(model=str(model_dir), load_format="auto" if args.model else "dummy",
                           dtype=args.dtype,
                           device=args.device, num_blocks=blocks, block_size=BLOCK,
                           max_model_len=args.max_model_len, cuda_graphs=graphs == "on",
                           max_num_seqs=max(batches), packed_weights=packed == "on",
                           threads=args.threads)
        t0 = time.perf_counter()
        runner, _ = compute_thread.call(build_runner, cfg)  # where the server's steps run
        start_s = time.perf_counter() - t0
        if args.bound and runner.device.type == "cuda" and "bandwidth" not in report:
            report["bandwidth_gbs"] = copy_bandwidth(runner.device) / 1e9
        for batch in batches:
            row = {"graphs": graphs, "packed": packed, "elementwise": elementwise, "layers": layers,
                   "start_s": start_s,
                   **measure(runner, batch, args, vocab)}
            if args.bound and "bandwidth_gbs" in report:
                row.update(bound(runner, row["context"], report["bandwidth_gbs"] * 1e9))
                row["of_bound"] = row["tok_s"] / batch / row["bound_tok_s"]
            report["runs"].append(row)
            print(json.dumps(row), flush=True)
        del runner
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(report, indent=2))
    print_table(report["runs"])
    print(f"json: {args.out}")
    print(f"plot: {plot(report, Path(args.out))}")


if __name__ == "__main__":
    main()
