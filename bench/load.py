"""Sustained load through one router, then its queue bound: does the stack stay within itself?

    python bench/load.py                                   # 500 streams for 60 s, tiny model
    python bench/load.py --streams 64 --duration 10 --out /tmp/load.json

Phase 1, sustained: ``--streams`` client loops, each sending its next request the moment the
last one ends (random ``--prompt-len``-token prompts, greedy, ``ignore_eos``, ``--max-tokens``
tokens), so that many requests are always in flight for ``--duration`` seconds. It reports
requests completed, tokens, errors by gRPC status, latency, and the resident memory (VmRSS from
``/proc/<pid>/status``) of the router, scheduler, worker and Redis every ``--sample-s``: start,
peak and end, so growth under a steady load shows.

Phase 2, overload: the scheduler restarts with ``--max-queue`` and ``--max-num-seqs`` lowered
(``--queue-max``, ``--queue-max-num-seqs``) and ``--burst`` requests arrive at once. Past the
running batch and the queue, a request must be refused with RESOURCE_EXHAUSTED, promptly; every
other request completes whole.

After each phase the KV pool is read back from Redis (the scheduler's state of record): every
block free or cached, no request live. Prints a table; writes JSON (``--out``).
The script starts its own stack (Redis, worker, scheduler, router) on ``--model`` (default: the
tiny test model, built on first use), since it needs the processes' ids and flags.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shlex
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from serving_data import FIRST_ORDINARY_ID, model_vocab_size

from pagewire import serving
from pagewire.launcher import Stack, start_stack
from pagewire.redis_keys import RedisKeys
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

DEFAULT_MODEL = Path.home() / ".cache/pagewire/models/tiny-seed0"
WORKER = "worker-0"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="",
                   help=f"model dir (default {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--streams", type=int, default=500, help="requests always in flight (phase 1)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of phase 1")
    p.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per request")
    p.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    p.add_argument("--channels", type=int, default=8, help="client connections the streams share")
    p.add_argument("--sample-s", type=float, default=1.0, help="seconds between RSS samples")
    p.add_argument("--burst", type=int, default=500, help="requests sent at once (phase 2)")
    p.add_argument("--burst-max-tokens", type=int, default=64)
    p.add_argument("--queue-max", type=int, default=64, help="scheduler --max-queue in phase 2")
    p.add_argument("--queue-max-num-seqs", type=int, default=32,
                   help="scheduler --max-num-seqs in phase 2 (the running batch)")
    p.add_argument("--timeout", type=float, default=120.0, help="deadline of each request, seconds")
    p.add_argument("--log-dir", default="", help="service logs here (default: discarded)")
    p.add_argument("--out", default="load.json")
    return p


# ---- client -----------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the client saw: outcomes by status, tokens, and each completed request's latency."""

    statuses: Counter[str] = field(default_factory=Counter)
    tokens: int = 0
    latencies: list[float] = field(default_factory=list)
    short: int = 0  # "OK" but fewer tokens than asked: must stay 0
    per_stream: Counter[int] = field(default_factory=Counter)  # completed, by client loop


async def one_request(
    stub: generation_pb2_grpc.GenerationStub, request: generation_pb2.GenerateRequest,
    tally: Tally, timeout: float,
) -> str:
    """Send one request, stream it to the end, tally it; its status ("OK" or a gRPC code)."""
    start = time.perf_counter()
    tokens = 0
    try:
        async for response in stub.Generate(request, timeout=timeout):
            tokens += len(response.token_ids)
    except grpc.aio.AioRpcError as e:
        tally.statuses[e.code().name] += 1
        return e.code().name
    tally.statuses["OK"] += 1
    tally.tokens += tokens
    tally.short += tokens != request.sampling.max_tokens
    tally.latencies.append(time.perf_counter() - start)
    return "OK"


@dataclass(frozen=True)
class RequestShape:
    prompt_len: int
    max_tokens: int
    vocab_size: int

    def draw(self, rng: random.Random) -> generation_pb2.GenerateRequest:
        """Random ordinary ids, so that no two requests share a cached prefix; greedy with
        ignore_eos, so each yields exactly ``max_tokens`` tokens."""
        ids = [rng.randrange(FIRST_ORDINARY_ID, self.vocab_size) for _ in range(self.prompt_len)]
        sampling = common_pb2.SamplingParams(
            temperature=0.0, max_tokens=self.max_tokens, ignore_eos=True)
        return generation_pb2.GenerateRequest(
            token_ids=generation_pb2.TokenIds(ids=ids), sampling=sampling)


Stubs = list[generation_pb2_grpc.GenerationStub]


async def sustained(stubs: Stubs, args: argparse.Namespace) -> tuple[Tally, float]:
    """Phase 1: ``args.streams`` loops of back-to-back requests; the tally and the wall time."""
    tally = Tally()
    shape = RequestShape(args.prompt_len, args.max_tokens, model_vocab_size(args.model))
    end = time.monotonic() + args.duration

    async def loop(i: int) -> None:
        rng = random.Random(i)
        stub = stubs[i % len(stubs)]
        while time.monotonic() < end:
            status = await one_request(stub, shape.draw(rng), tally, args.timeout)
            tally.per_stream[i] += status == "OK"
            if status != "OK":
                await asyncio.sleep(0.05)  # a failing stack must not turn this into a spin

    start = time.monotonic()
    await asyncio.gather(*(loop(i) for i in range(args.streams)))
    return tally, time.monotonic() - start


async def burst(stubs: Stubs, args: argparse.Namespace) -> tuple[Tally, float]:
    """Phase 2: ``args.burst`` requests at once; the tally and the slowest refusal, seconds."""
    tally, refusals = Tally(), [0.0]
    rng = random.Random(-1)
    shape = RequestShape(args.prompt_len, args.burst_max_tokens, model_vocab_size(args.model))
    requests = [shape.draw(rng) for _ in range(args.burst)]

    async def one(i: int) -> None:
        start = time.perf_counter()
        status = await one_request(stubs[i % len(stubs)], requests[i], tally, args.timeout)
        if status == "RESOURCE_EXHAUSTED":
            refusals.append(time.perf_counter() - start)

    await asyncio.gather(*(one(i) for i in range(args.burst)))
    return tally, max(refusals)


# ---- the stack's side -------------------------------------------------------------------------
def rss_kib(pid: int) -> int:
    """Resident memory of a process, from the kernel's own accounting."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stack_pids(stack: Stack) -> dict[str, int]:
    pids = {s.name: s.process.pid for s in stack.services}
    if stack.redis is not None:
        pids["redis"] = stack.redis.process.pid
    return pids


async def sample_rss(stack: Stack, every_s: float, into: list[dict[str, float]]) -> None:
    """Append {"t": seconds, name: MiB, ...} every ``every_s`` until cancelled."""
    start = time.monotonic()
    while True:
        row: dict[str, float] = {"t": round(time.monotonic() - start, 2)}
        for name, pid in stack_pids(stack).items():
            row[name] = round(rss_kib(pid) / 1024, 1)
        into.append(row)
        await asyncio.sleep(every_s)


def rss_summary(samples: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per process: start, middle, peak and end. Bounded memory shows as middle ~ end."""
    names = [k for k in samples[0] if k != "t"]
    mid = samples[len(samples) // 2]
    return {n: {"start": samples[0][n], "mid": mid[n], "peak": max(s[n] for s in samples),
                "end": samples[-1][n]} for n in names}  # fmt: skip


def pool_check(stack: Stack, timeout: float = 15.0) -> dict[str, object]:
    """Every KV block free or cached and no request live, once the scheduler has settled."""
    keys = RedisKeys("default", Path(stack.model).resolve().name)
    client = redis.Redis.from_url(stack.redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            total = int(client.hget(keys.worker_load(WORKER), "total_blocks") or 0)
            free = {int(b) for b in client.smembers(keys.free_blocks(WORKER))}
            cached = {int(b) for b in client.zrange(keys.cached_blocks(WORKER), 0, -1)}
            live = client.scard(keys.requests())
            whole = total > 0 and free | cached == set(range(total))
            ok = whole and not live and not free & cached
            if ok or time.monotonic() > deadline:
                return {"ok": ok, "total_blocks": total, "free": len(free), "cached": len(cached),
                        "missing": total - len(free | cached), "live_requests": live}
            time.sleep(0.2)
    finally:
        client.close()


async def restart_scheduler(stack: Stack, extra: list[str], stubs: Stubs) -> None:
    """Same scheduler, new limits (argparse: the last flag wins); back once a request passes."""
    stack.service("scheduler").command += extra
    await stack.restart("scheduler")
    probe = RequestShape(4, 1, FIRST_ORDINARY_ID + 1).draw(random.Random(0))
    for _ in range(300):
        try:
            async for _ in stubs[0].Generate(probe, timeout=5):
                pass
            return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.1)
    raise RuntimeError("the router did not reach the restarted scheduler")


# ---- report -------------------------------------------------------------------------------------
def tally_report(tally: Tally, wall_s: float) -> dict[str, object]:
    lat = sorted(tally.latencies)
    return {
        "completed": tally.statuses["OK"], "statuses": dict(tally.statuses), "tokens": tally.tokens,
        "short_completions": tally.short, "wall_s": round(wall_s, 2),
        "requests_per_s": round(tally.statuses["OK"] / wall_s, 1) if wall_s else 0.0,
        "tokens_per_s": round(tally.tokens / wall_s, 1) if wall_s else 0.0,
        "latency_s": {name: round(lat[int(q * (len(lat) - 1))], 3) if lat else None
                      for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        # Fairness: how many requests the least and the most served client loop completed.
        "per_stream_completed": {"min": min(tally.per_stream.values(), default=0),
                                 "max": max(tally.per_stream.values(), default=0)},
    }  # fmt: skip


def print_table(report: dict) -> None:
    s, b = report["sustained"], report["overload"]
    print(f"\n== sustained: {report['args']['streams']} streams for {s['wall_s']} s")
    print(f"requests completed {s['completed']}  ({s['requests_per_s']}/s)   tokens {s['tokens']}"
          f"  ({s['tokens_per_s']}/s)   per stream {s['per_stream_completed']}")
    print("latency s  " + "  ".join(f"{k} {v}" for k, v in s["latency_s"].items()))
    print(f"statuses {s['statuses']}   short completions {s['short_completions']}")
    print(f"{'RSS MiB':<10}" + "".join(f"{c:>10}" for c in ("start", "mid", "peak", "end")))
    for name, r in s["rss_mib"].items():
        print(f"{name:<10}" + "".join(f"{r[c]:>10}" for c in ("start", "mid", "peak", "end")))
    print(f"KV pool after: {s['pool']}")
    print(f"\n== overload: {report['args']['burst']} at once, --max-queue "
          f"{report['args']['queue_max']}, --max-num-seqs {report['args']['queue_max_num_seqs']}")
    print(f"statuses {b['statuses']}   short completions {b['short_completions']}"
          f"   slowest refusal {b['slowest_refusal_s']} s")
    print(f"KV pool after: {b['pool']}")


async def main_async(args: argparse.Namespace) -> dict:
    stack = await start_stack(
        args.model,
        log_dir=Path(args.log_dir) if args.log_dir else None,
    )
    channels = [serving.insecure_channel(stack.router) for _ in range(args.channels)]
    stubs = [generation_pb2_grpc.GenerationStub(ch) for ch in channels]
    samples: list[dict[str, float]] = []
    try:
        sampler = asyncio.create_task(sample_rss(stack, args.sample_s, samples))
        tally, wall = await sustained(stubs, args)
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        phase1 = {**tally_report(tally, wall), "rss_mib": rss_summary(samples),
                  "rss_samples": samples, "pool": await asyncio.to_thread(pool_check, stack)}
        await restart_scheduler(stack, ["--max-queue", str(args.queue_max),
                                        "--max-num-seqs", str(args.queue_max_num_seqs)], stubs)
        tally, slowest_refusal = await burst(stubs, args)
        phase2 = {**tally_report(tally, 0.0), "slowest_refusal_s": round(slowest_refusal, 3),
                  "pool": await asyncio.to_thread(pool_check, stack)}
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
        stack.stop()
    return {"args": vars(args), "sustained": phase1, "overload": phase2}


def run(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if not args.model:
        from pagewire.testmodel import ensure_model

        args.model = str(ensure_model(DEFAULT_MODEL, seed=0, size="tiny"))
    report = {"command": shlex.join(["python", "bench/load.py", *argv]),
              **asyncio.run(main_async(args))}
    print_table(report)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    run()
