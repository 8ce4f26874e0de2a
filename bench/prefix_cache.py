"""Prefix caching on vs off, in one run, on the CPU test model.

    python bench/prefix_cache.py [--requests 32] [--system-len 1024] [--question-len 64] [--runs 3]

Workload A (shared prefix): ``--requests`` prompts = one ``--system-len``-token system prompt +
a distinct ``--question-len``-token question, all sent at once after one warm-up request that
puts the system prompt in the cache. Workload B (0 % hit rate): the same shape with every prompt
distinct, to show what caching costs when it never hits. Each workload runs on a stack with
``--prefix-caching`` and one with ``--no-prefix-caching``; reports TTFT (median, p90) and output
tokens/s, medians over ``--runs``, and the on/off ratios. Both stacks run side by side and the
runs alternate between them. Writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from pathlib import Path

from pagewire import serving
from pagewire.launcher import start_stack
from pagewire.testmodel import ensure_model
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

FIRST_ID = 16  # keep clear of the test tokenizer's special ids


def prompts(n: int, system_len: int, question_len: int, shared: bool, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    system = [rng.randrange(FIRST_ID, 1000) for _ in range(system_len)]
    out = []
    for _ in range(n):
        head = system if shared else [rng.randrange(FIRST_ID, 1000) for _ in range(system_len)]
        out.append(head + [rng.randrange(FIRST_ID, 1000) for _ in range(question_len)])
    return out


async def one(stub: generation_pb2_grpc.GenerationStub, ids: list[int], max_tokens: int) -> dict:
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
    )
    t0 = time.perf_counter()
    ttft, cached, n = None, 0, 0
    async for resp in stub.Generate(req):
        if resp.token_ids and ttft is None:
            ttft = time.perf_counter() - t0
        n += len(resp.token_ids)
        cached = resp.usage.cached_tokens or cached
    return {"ttft": ttft, "tokens": n, "cached": cached}


async def run_workload(addr: str, batch: list[list[int]], warmup: list[int], max_tokens: int) -> dict:
    async with serving.insecure_channel(addr) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        await one(stub, warmup, 1)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one(stub, ids, max_tokens) for ids in batch))
        wall = time.perf_counter() - t0
    ttfts = sorted(r["ttft"] for r in results)
    return {
        "ttft_p50_ms": statistics.median(ttfts) * 1e3,
        "ttft_p90_ms": ttfts[int(0.9 * (len(ttfts) - 1))] * 1e3,
        "output_tok_per_s": sum(r["tokens"] for r in results) / wall,
        "cached_tokens": sum(r["cached"] for r in results),
        "wall_s": wall,
    }


async def main_async(args: argparse.Namespace) -> dict:
    """Both stacks stay up and runs alternate between them, so drift in machine load (this
    machine is shared and noisy) hits caching on and off alike."""
    model = args.model or str(ensure_model(Path.home() / ".cache/pagewire/models/tiny-seed0"))
    report: dict = {"config": vars(args) | {"model": model}, "results": {}}
    stacks = {}
    try:
        for mode in ("on", "off"):
            flag = "--prefix-caching" if mode == "on" else "--no-prefix-caching"
            stacks[mode] = await start_stack(model, worker_args=["--num-blocks", "8192"],
                                             scheduler_args=[flag])
        runs: dict[str, list[dict]] = {}
        for run in range(args.runs):
            for shared in (True, False):
                seed = 1000 * run + (0 if shared else 500)
                batch = prompts(args.requests, args.system_len, args.question_len, shared, seed)
                # Warm-up: the shared system prompt, or an unrelated prompt for 0 % hits.
                source = batch[0] if shared else prompts(1, args.system_len, 0, False, seed + 7)[0]
                warm = source[: args.system_len] + [FIRST_ID] * args.question_len
                order = list(stacks.items())
                for mode, stack in order if run % 2 == 0 else order[::-1]:  # alternate who goes first
                    key = f"{'shared' if shared else 'distinct'}/{mode}"
                    runs.setdefault(key, []).append(
                        await run_workload(stack.router, batch, warm, args.max_tokens)
                    )
    finally:
        for stack in stacks.values():
            stack.stop()
    for key, rs in runs.items():
        report["results"][key] = {
            "runs": rs,
            **{m: statistics.median(r[m] for r in rs)
               for m in ("ttft_p50_ms", "ttft_p90_ms", "output_tok_per_s", "cached_tokens")},
        }
    res = report["results"]
    report["ratios"] = {
        "shared_ttft_p50_off_over_on": res["shared/off"]["ttft_p50_ms"] / res["shared/on"]["ttft_p50_ms"],
        "shared_throughput_on_over_off": res["shared/on"]["output_tok_per_s"] / res["shared/off"]["output_tok_per_s"],
        "distinct_throughput_on_over_off": res["distinct/on"]["output_tok_per_s"] / res["distinct/off"]["output_tok_per_s"],
    }
    return report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--system-len", type=int, default=1024)
    p.add_argument("--question-len", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--out", default="prefix_cache.json")
    args = p.parse_args()
    report = asyncio.run(main_async(args))
    print(f"{'workload':<16} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} {'tok/s':>8} {'cached tokens':>14}")
    for key, r in report["results"].items():
        print(f"{key:<16} {r['ttft_p50_ms']:>12.1f} {r['ttft_p90_ms']:>12.1f} "
              f"{r['output_tok_per_s']:>8.1f} {r['cached_tokens']:>14.0f}")
    for k, v in report["ratios"].items():
        print(f"{k}: {v:.2f}")
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
