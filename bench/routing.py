"""Worker routing: decision time at 100 workers, and a multi-tenant workload per policy.

    python bench/routing.py [--rate 3] [--requests 120] [--workers 8] [--out routing.json]

(a) Decision time: a private redis-server holding 100 fake registry entries (heartbeat, load, 16
of them holding one of 8 tenants' 1,024-token prompts in their prefix index); ``choose()`` timed
per request, median, p90 and p99.

(b) Multi-tenant workload: ``--workers`` CPU workers on the tiny test model (one torch thread
each), each with ``--num-blocks`` KV blocks -- room for about 2.3 of the 8 tenants' system
prompts, so one worker's cache holds only part of them while the fleet holds them all. Each
request is one tenant's ``--system-len``-token system prompt plus a short question, arriving as a
Poisson process at ``--rate`` per second; every policy gets the same arrivals. Per policy (prefix,
least-load, round-robin) a new scheduler starts on an emptied Redis, so every cache starts empty.
The bench routes like a router: ``WorkerRouter.choose()`` per request, then a SubmitRequest
naming the worker on one Connect stream to the scheduler. Reported after ``--warmup`` requests:
hit rate (prompt tokens served from cache, from usage.cached_tokens), TTFT p50/p90 (from before
the routing decision to the first token), the busiest worker's share of requests and the
decisions' reasons. Throughput (output tokens/s) comes from a ``--burst`` of requests sent at
once to the warm fleet afterwards: at a steady rate every policy that keeps up delivers the same.

The fleet is CPU workers only. Null workers (no model) would widen it cheaply, but they answer at
once, so a policy's TTFT would then depend on how many requests it happens to send them (a trial
with 2 CPU + 4 null workers: prefix sent 11 % of requests to the CPU workers, round-robin 33 %).
Eight workers rather than four because 8 tenants hashed over few workers land unevenly (over 4
workers here: 3, 2, 2, 1), and a worker homing more prompts than its cache holds thrashes.
The schedulers' prefix_hits / prefix_queries counters are not used: a request waiting for KV
blocks is looked up again every step, so they weigh waiting requests many times over.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from pagewire import serving
from pagewire.block_hash import prompt_block_hashes
from pagewire.launcher import Service, Stack
from pagewire.redis_keys import RedisKeys
from pagewire.redis_server import start_redis
from pagewire.testmodel import ensure_model
from pagewire.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc
from pagewire.worker_load import LoadFigures
from pagewire.worker_registry import WorkerEntry
from router.routing import POLICIES, WorkerRouter

FIRST_ID = 16  # keep clear of the test tokenizer's special ids
BLOCK_SIZE = 16


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(int(q * len(s)), len(s) - 1)]


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(FIRST_ID, 1000) for _ in range(n)]


# ---- (a) decision time --------------------------------------------------------------------
async def decision_time(n_workers: int, decisions: int) -> dict:
    rs = start_redis()
    r = aioredis.Redis.from_url(rs.url)
    try:
        keys, rng = RedisKeys("bench", "m"), random.Random(0)
        tenants = [tokens(rng, 1024) for _ in range(8)]
        async with r.pipeline(transaction=False) as p:
            for i in range(n_workers):
                wid = f"w{i:03d}"
                p.sadd(keys.workers(), wid)
                entry = WorkerEntry(wid, f"addr-{wid}", "m", BLOCK_SIZE, num_blocks=4096)
                p.hset(keys.worker_info(wid), mapping=entry.fields())
                p.set(keys.worker_alive(wid), f"addr-{wid}")
                p.hset(keys.worker_load(wid), mapping=LoadFigures(
                    running=i % 7, waiting=i % 5, waiting_tokens=64 * (i % 5), used_blocks=40 * i,
                    total_blocks=4096, preemptions=0, prefix_queries=0, prefix_hits=0, steps=1,
                    draining=0).as_dict())
                if i < 16:
                    hashes = prompt_block_hashes(tenants[i % 8], BLOCK_SIZE)
                    p.hset(keys.prefix_index(wid), mapping={h: b for b, h in enumerate(hashes)})
            await p.execute()
        router = WorkerRouter(r, keys, refresh_s=60)
        times = []
        for i in range(decisions + 50):
            prompt = tenants[i % 8] + tokens(rng, 40)
            t0 = time.perf_counter()
            await router.choose(prompt)
            times.append(time.perf_counter() - t0)
        times = times[50:]
        return {"workers": n_workers, "decisions": decisions, "prompt_tokens": 1064,
                "median_ms": statistics.median(times) * 1e3, "p90_ms": pct(times, 0.9) * 1e3,
                "p99_ms": pct(times, 0.99) * 1e3}
    finally:
        await r.aclose()
        rs.stop()


# ---- (b) the multi-tenant workload --------------------------------------------------------
@dataclass
class Sent:
    prompt_len: int
    measured: bool
    start: float = 0.0
    first: float = 0.0
    done: float = 0.0
    cached: int = 0
    tokens: int = 0
    worker: str = ""  # chosen by the router; the scheduler's events name the one that ran it
    reason: str = ""  # the routing decision's
    error: str = ""


Arrivals = list[tuple[float, list[int]]]  # (offset from the start in s, prompt)


def workloads(args: argparse.Namespace) -> tuple[Arrivals, Arrivals]:
    """The Poisson stream, then the burst (all at once); the same for each policy."""
    rng = random.Random(args.seed)
    systems = [tokens(rng, args.system_len) for _ in range(args.tenants)]

    def request() -> list[int]:
        return systems[rng.randrange(args.tenants)] + tokens(rng, rng.randint(16, 48))

    t, stream = 0.0, []
    for _ in range(args.requests):
        t += rng.expovariate(args.rate)
        stream.append((t, request()))
    return stream, [(0.0, request()) for _ in range(args.burst)]


async def fresh_scheduler(stack: Stack, workers: list[Service], r: aioredis.Redis,
                          keys: RedisKeys) -> Service:
    """A scheduler on an emptied Redis, so every worker's cache starts empty for the next policy
    (the workers' contents are forgotten with the index that named them)."""
    first = all(s.name != "scheduler" for s in stack.services)
    if not first:
        stack.service("scheduler").stop()
    await r.flushall()
    while await r.scard(keys.workers()) < len(workers):  # heartbeats register them again
        await asyncio.sleep(0.1)
    if first:
        return await stack.start_scheduler(workers, ["--log-level", "WARNING"])
    return await stack.restart("scheduler")


async def drive(sched: Service, router: WorkerRouter, reqs: Arrivals,
                warmup: int, max_tokens: int) -> dict:
    """Send every request at its arrival time over one Connect stream; time its tokens."""
    sent: dict[str, Sent] = {}
    outgoing: asyncio.Queue[scheduler_pb2.RouterMessage] = asyncio.Queue()
    all_done = asyncio.Event()
    finished = 0

    async def messages() -> AsyncIterator[scheduler_pb2.RouterMessage]:
        while True:
            yield await outgoing.get()

    def on_event(ev: scheduler_pb2.TokenEvent, now: float) -> None:
        nonlocal finished
        s = sent[ev.request_id]
        if ev.token_ids and not s.first:
            s.first = now
        s.tokens += len(ev.token_ids)
        s.cached = max(s.cached, ev.cached_tokens)
        s.worker = ev.worker_id or s.worker
        if ev.error_code:
            s.error = ev.error_message
        if ev.finish_reason or ev.error_code:
            s.done, finished = now, finished + 1
            if finished == len(reqs):
                all_done.set()

    async with serving.insecure_channel(sched.address) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).Connect(messages())

        async def consume() -> None:
            async for batch in call:
                now = time.perf_counter()
                for ev in batch.events:
                    on_event(ev, now)
                for rid in batch.token_request_ids:
                    sent[rid].tokens += 1

        consumer = asyncio.create_task(consume())
        t0 = time.perf_counter()
        for i, (offset, prompt) in enumerate(reqs):
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            rid = f"req-{i}-{uuid.uuid4().hex[:6]}"
            sent[rid] = s = Sent(len(prompt), measured=i >= warmup, start=time.perf_counter())
            decision = await router.choose(prompt)
            s.worker, s.reason = decision.worker_id, decision.reason
            outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=scheduler_pb2.SubmitRequest(
                request_id=rid, prompt_token_ids=prompt, worker_id=decision.worker_id,
                sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                   ignore_eos=True))))
        await asyncio.wait_for(all_done.wait(), timeout=120)
        call.cancel()
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    return summarise([s for s in sent.values() if s.measured])


def summarise(done: list[Sent]) -> dict:
    errors = [s.error for s in done if s.error]
    ok = [s for s in done if not s.error]
    ttft = [(s.first - s.start) * 1e3 for s in ok]
    wall = max(s.done for s in ok) - min(s.start for s in ok)
    per_worker = Counter(s.worker for s in ok)
    return {
        "requests": len(done), "errors": len(errors), "error_examples": errors[:3],
        "hit_rate": sum(s.cached for s in ok) / sum(s.prompt_len for s in ok),
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p90_ms": pct(ttft, 0.9),
        "output_tok_per_s": sum(s.tokens for s in ok) / wall,
        "requests_per_s": len(ok) / wall,
        "requests_per_worker": dict(sorted(per_worker.items())),
        "busiest_worker_share": max(per_worker.values()) / len(ok),
        "reasons": dict(Counter(s.reason for s in ok)),
        "misses_by_reason": dict(Counter(s.reason for s in ok if s.cached < s.prompt_len // 2)),
    }


async def run_policy(policy: str, args: argparse.Namespace, sched: Service,
                     keys: RedisKeys, r: aioredis.Redis, stream: Arrivals,
                     burst: Arrivals) -> dict:
    """The stream routed by ``policy`` for hit rate and TTFT, then the burst on the warm fleet
    for throughput."""
    router = WorkerRouter(r, keys, policy)
    row = await drive(sched, router, stream, args.warmup, args.max_tokens)
    at_once = await drive(sched, router, burst, 0, args.max_tokens)
    return {"policy": policy, **row, "burst": at_once,
            "burst_output_tok_per_s": at_once["output_tok_per_s"]}


async def main_async(args: argparse.Namespace) -> dict:
    model = args.model or str(ensure_model(Path.home() / ".cache/pagewire/models/tiny-seed0"))
    report: dict = {"config": vars(args) | {"model": model},
                    "decision_time": await decision_time(100, args.decisions)}
    stream, burst = workloads(args)
    rs = start_redis()
    report["log_dir"] = args.log_dir or tempfile.mkdtemp(prefix="pagewire-routing-bench-")
    stack = Stack(model=model, redis_url=rs.url, log_dir=Path(report["log_dir"]))
    keys = RedisKeys("default", Path(model).resolve().name)
    r = aioredis.Redis.from_url(rs.url)
    flags = ["--num-blocks", str(args.num_blocks), "--threads", "1", "--log-level", "WARNING"]
    try:
        workers = list(await asyncio.gather(*(stack.start_worker(f"cpu-{i}", flags)
                                              for i in range(args.workers))))
        report["policies"] = []
        for policy in args.policies:
            sched = await fresh_scheduler(stack, workers, r, keys)
            report["policies"].append(await run_policy(policy, args, sched, keys, r, stream, burst))
    finally:
        stack.stop()  # before Redis: the scheduler writes to it until it stops
        await r.aclose()
        rs.stop()
    by = {row["policy"]: row for row in report["policies"]}
    if "prefix" in by and "round-robin" in by:
        p, rr = by["prefix"], by["round-robin"]
        report["prefix_vs_round_robin"] = {
            "hit_rate_ratio": p["hit_rate"] / max(rr["hit_rate"], 1e-9),
            "ttft_p90_ratio": p["ttft_p90_ms"] / rr["ttft_p90_ms"],
        }
    return report


def print_report(report: dict) -> None:
    d = report["decision_time"]
    print(f"decision time, {d['workers']} workers, {d['prompt_tokens']}-token prompts: "
          f"median {d['median_ms']:.3f} ms, p90 {d['p90_ms']:.3f} ms, p99 {d['p99_ms']:.3f} ms")
    print(f"{'policy':<12} {'hit rate':>8} {'TTFT p50 ms':>12} {'TTFT p90 ms':>12} "
          f"{'busiest':>8} {'burst tok/s':>12} {'errors':>6}")
    for row in report["policies"]:
        print(f"{row['policy']:<12} {row['hit_rate']:>8.1%} {row['ttft_p50_ms']:>12.1f} "
              f"{row['ttft_p90_ms']:>12.1f} {row['busiest_worker_share']:>8.1%} "
              f"{row['burst_output_tok_per_s']:>12.1f} {row['errors'] + row['burst']['errors']:>6}")
    for k, v in report.get("prefix_vs_round_robin", {}).items():
        print(f"prefix / round-robin {k}: {v:.2f}")
    print(f"service logs: {report['log_dir']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--decisions", type=int, default=2000)
    p.add_argument("--tenants", type=int, default=8)
    p.add_argument("--system-len", type=int, default=768)
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--warmup", type=int, default=24)
    p.add_argument("--rate", type=float, default=3.0, help="requests per second (Poisson)")
    p.add_argument("--burst", type=int, default=32, help="requests sent at once, for throughput")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--num-blocks", type=int, default=112, help="KV blocks per worker")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-dir", default="", help="service logs (default: a new temporary folder)")
    p.add_argument("--out", default="routing.json")
    args = p.parse_args()
    args.policies = args.policies.split(",")
    report = asyncio.run(main_async(args))
    print_report(report)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
