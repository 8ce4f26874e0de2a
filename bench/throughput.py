"""Concurrent-request throughput through a running router (or a stack this script starts).

    python bench/throughput.py --concurrency 16 --max-tokens 128            # starts its own stack
    python bench/throughput.py --addr 127.0.0.1:50051 --concurrency 16      # an existing `pagewire up`

Each request is a distinct prompt, greedy, ``ignore_eos`` so every request produces exactly
``--max-tokens`` tokens. Reports output tokens/s over the wall time of the whole batch, plus TTFT
and per-request latency medians; repeats ``--runs`` times and reports the median run. Writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from pagewire import serving
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc


async def one(stub: generation_pb2_grpc.GenerationStub, prompt: str, max_tokens: int) -> dict:
    req = generation_pb2.GenerateRequest(
        text=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    t0 = time.perf_counter()
    ttft, n = None, 0
    async for resp in stub.Generate(req):
        if resp.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        n += len(resp.token_ids)
    return {"ttft_s": ttft, "latency_s": time.perf_counter() - t0, "tokens": n}


async def run_once(addr: str, concurrency: int, max_tokens: int, run: int) -> dict:
    prompts = [f"Request {run}-{i}: tell me a story about server number {i * 7}." for i in range(concurrency)]
    async with serving.insecure_channel(addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(stub, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in results)
    return {
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_per_s": tokens / wall,
        "ttft_p50_s": statistics.median(r["ttft_s"] for r in results),
        "latency_p50_s": statistics.median(r["latency_s"] for r in results),
    }


async def main_async(args: argparse.Namespace) -> dict:
    stack = None
    addr = args.addr
    if not addr:
        from pagewire.launcher import start_stack
        from pagewire.testmodel import ensure_model

        model = args.model or str(ensure_model(Path.home() / ".cache/pagewire/models/tiny-seed0"))
        stack = await start_stack(model)
        addr = stack.router
    try:
        await run_once(addr, min(args.concurrency, 4), 8, -1)  # warm-up
        runs = [await run_once(addr, args.concurrency, args.max_tokens, i) for i in range(args.runs)]
    finally:
        if stack is not None:
            stack.stop()
    runs.sort(key=lambda r: r["output_tok_per_s"])
    return {"concurrency": args.concurrency, "max_tokens": args.max_tokens, "runs": runs,
            "median": runs[len(runs) // 2]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="", help="router address; empty: start a local stack")
    p.add_argument("--model", default="", help="model dir for the local stack (default: tiny test model)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="bench_throughput.json")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    print(f"{'run':>4} {'wall s':>8} {'tokens':>7} {'tok/s':>8} {'TTFT p50 ms':>12} {'latency p50 s':>14}")
    for i, r in enumerate(report["runs"]):
        print(f"{i:>4} {r['wall_s']:8.2f} {r['output_tokens']:7d} {r['output_tok_per_s']:8.1f} "
              f"{r['ttft_p50_s'] * 1e3:12.1f} {r['latency_p50_s']:14.2f}")
    m = report["median"]
    print(f"median: {m['output_tok_per_s']:.1f} output tokens/s at concurrency {args.concurrency}")
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
