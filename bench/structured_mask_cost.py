"""What a grammar mask costs: 64 constrained sequences against 64 unconstrained ones.

    python bench/structured_mask_cost.py --rounds 5 --out bench/results/structured_mask_cost.json

Two measurements, each in alternating rounds (unconstrained, constrained, unconstrained, ...) so
that drift on a shared machine hits both alike; medians and ranges are reported:

- worker step: 64 sequences prefilled, then ``--steps`` decode steps through the worker's own step
  loop (two in flight, as the scheduler sends them) in the worker's process; per-step wall time.
  Constrained rows pay the mask fill, its masked fill on the logits and the matcher advance (on
  the CPU the step loop is sequential, so waiting for the previous step's token costs nothing);
- end to end: a live stack (router, scheduler, worker, Redis), 64 concurrent gRPC requests of
  ``--max-tokens`` sampled tokens; output tokens per second of wall time.

The constraint is a nested JSON schema (objects, an array, enums, bounded strings); the
unconstrained requests sample the same way (temperature 1, seeded). Writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from worker_step import Batch, run_loop

from pagewire.config import WorkerConfig
from pagewire.launcher import start_stack
from pagewire.structured import StructuredOutput
from pagewire.testmodel import ensure_model
from pagewire.v1 import common_pb2, generation_pb2
from worker_svc.runner import ModelRunner
from worker_svc.server import build_runner

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 6},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20},
                           "street": {"type": "string", "maxLength": 30}},
            "required": ["city", "street"],
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
}
SPEC = StructuredOutput("json_schema", json.dumps(SCHEMA))
BATCH = 64


def sampling(constrained: bool, seed: int, max_tokens: int = 1) -> common_pb2.SamplingParams:
    p = common_pb2.SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens)
    if constrained:
        p.structured.CopyFrom(SPEC.to_proto())
    return p


class MaskTimer:
    """Wraps the runner's mask stage (bitmask fill, upload, masked fill) to time it alone."""

    def __init__(self, runner: ModelRunner) -> None:
        self.inner, self.seconds = runner.sampler._constrain, []
        runner.sampler._constrain = self  # type: ignore[method-assign]

    def __call__(self, *args: object) -> object:
        start = time.perf_counter()
        out = self.inner(*args)
        self.seconds.append(time.perf_counter() - start)
        return out


def worker_round(runner: ModelRunner, constrained: bool, steps: int, vocab: int, seed: int) -> float:
    """Seconds per decode step for one round (wall time of the decode steps / steps)."""
    runner.reset()
    batch = Batch(BATCH, 16, vocab, seed)
    prefills = batch.prefills(4096)
    for step in prefills:
        for s in step.seqs:
            s.sampling.CopyFrom(sampling(constrained, seed + s.seq_id))
    run_loop(runner, prefills)
    decodes = batch.decodes(steps)
    return run_loop(runner, decodes) / steps


async def e2e_round(address: str, constrained: bool, max_tokens: int, seed: int) -> float:
    """Output tokens per second for BATCH concurrent requests."""
    from pagewire import serving
    from pagewire.v1 import generation_pb2_grpc

    async with serving.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def one(i: int) -> int:
            req = generation_pb2.GenerateRequest(
                text=f"Record {i}:", sampling=sampling(constrained, seed + i, max_tokens))
            n = 0
            async for resp in stub.Generate(req):
                n += len(resp.token_ids)
            return n

        start = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(BATCH)))
        return sum(counts) / (time.perf_counter() - start)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small", help="test model size (pagewire.testmodel)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="bench/results/structured_mask_cost.json")
    args = ap.parse_args()
    model = ensure_model(Path.home() / ".cache/pagewire/models" / f"{args.size}-seed0",
                         size=args.size)
    runner, info = build_runner(WorkerConfig(model=str(model), num_blocks=2048, block_size=16,
                                             threads=args.threads))
    for constrained in (False, True):  # warm: allocator, the compile cache
        worker_round(runner, constrained, 4, info.vocab_size, 0)
    timer = MaskTimer(runner)
    step: dict[bool, list[float]] = {False: [], True: []}
    for r in range(args.rounds):
        for constrained in (False, True):
            step[constrained].append(
                worker_round(runner, constrained, args.steps, info.vocab_size, 100 * r))
    mask_ms = [v * 1e3 for v in timer.seconds]
    del runner
    tps: dict[bool, list[float]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as logs:
        stack = asyncio.run(start_stack(str(model), log_dir=Path(logs), worker_args=[
            "--num-blocks", "2048", "--threads", str(args.threads)]))
        try:
            asyncio.run(e2e_round(stack.router, True, 8, 0))  # warm: compile, caches
            for r in range(args.rounds):
                for constrained in (False, True):
                    tps[constrained].append(
                        asyncio.run(e2e_round(stack.router, constrained, args.max_tokens, 1000 * r)))
        finally:
            stack.stop()
    report = {
        "model": args.size, "batch": BATCH, "steps": args.steps, "max_tokens": args.max_tokens,
        "rounds": args.rounds, "threads": args.threads,
        "step_ms": {k: summary([v * 1e3 for v in step[c]]) for k, c in (("free", False),
                                                                      ("constrained", True))},
        "tok_s": {k: summary(tps[c]) for k, c in (("free", False), ("constrained", True))},
        "mask_ms_per_step": summary(mask_ms),
        "raw": {"step_ms_free": [v * 1e3 for v in step[False]],
                "step_ms_constrained": [v * 1e3 for v in step[True]],
                "tok_s_free": tps[False], "tok_s_constrained": tps[True]},
    }
    s, t = report["step_ms"], report["tok_s"]
    report["step_overhead"] = s["constrained"]["median"] / s["free"]["median"] - 1
    report["throughput_loss"] = 1 - t["constrained"]["median"] / t["free"]["median"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"plot: {plot(report, out.with_suffix('.png'))}")


def table(r: dict) -> str:
    def cell(d: dict) -> str:
        return f"{d['median']:.2f} ({d['min']:.2f}-{d['max']:.2f})"

    return "\n".join([
        "| 64 sequences | worker step ms, median (range) | end-to-end tok/s, median (range) |",
        "|---|---:|---:|",
        f"| unconstrained | {cell(r['step_ms']['free'])} | {cell(r['tok_s']['free'])} |",
        f"| JSON schema | {cell(r['step_ms']['constrained'])} | {cell(r['tok_s']['constrained'])} |",
        f"| cost | {100 * r['step_overhead']:+.1f} % step time | "
        f"{-100 * r['throughput_loss']:+.1f} % tok/s |",
        "",
        f"mask stage alone (fill 64 rows + upload + masked fill), per constrained step: "
        f"{cell(r['mask_ms_per_step'])} ms",
    ])


def plot(r: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
    for ax, key, label in ((axes[0], "step_ms", "worker step (ms)"),
                           (axes[1], "tok_s", "end-to-end tok/s")):
        meds = [r[key][k]["median"] for k in ("free", "constrained")]
        lo = [m - r[key][k]["min"] for m, k in zip(meds, ("free", "constrained"), strict=True)]
        hi = [r[key][k]["max"] - m for m, k in zip(meds, ("free", "constrained"), strict=True)]
        ax.bar(["unconstrained", "JSON schema"], meds, yerr=np.array([lo, hi]), capsize=6,
               color=["#999999", "#3b7dd8"])
        ax.set_title(label)
    fig.suptitle(f"64 sequences, test model '{r['model']}': median, range over {r['rounds']} rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
