"""Fault matrix: greedy streams in flight through a real local stack, one fault per scenario.

    python bench/faults.py                                   # 48 streams of 600 tokens
    python bench/faults.py --streams 16 --tokens 200 --scenarios worker-kill,redis-0.2s

Each scenario starts a fresh stack (Redis, two workers, a scheduler, a router: the launcher's
real processes), runs ``--streams`` greedy prompts, and when the streams have on average
``--fault-at`` of their tokens applies its fault. Per scenario it prints how many streams came
back identical to the fault-free run of the same prompts (itself identical to transformers: the
e2e tests check that), wrong (complete but different), failed (with their gRPC status; for a
router kill, whether what they got was a correct prefix), hung (not done ``--hang-s`` after the
fault); whether every KV block is back (free or cached, in Redis) and the scheduler's gauges
back (nothing running, no series of a lost worker); and the longest pause between two tokens of
a stream from the fault on (how long the fault held the streams up).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from fault_streams import Stream, blocks_back, gauges_back, stall_s, stream_all

from pagewire.launcher import Stack, free_port, start_stack
from pagewire.redis_keys import RedisKeys

DEFAULT_MODEL = Path.home() / ".cache/pagewire/models/tiny-seed0"
NUM_BLOCKS = 2048
Fault = Callable[[Stack], Awaitable[set[str]]]  # applies the fault; returns the workers it lost


async def kill(stack: Stack, name: str, restart_after: float | None = None) -> None:
    svc = stack.service(name)
    svc.process.kill()
    svc.process.wait()
    if restart_after is not None:
        await asyncio.sleep(restart_after)
        await stack.restart(name)


async def worker_kill(stack: Stack) -> set[str]:
    await kill(stack, "worker-1")
    return {"worker-1"}


async def worker_stop(stack: Stack) -> set[str]:
    proc = stack.service("worker-1").process
    proc.send_signal(signal.SIGSTOP)
    await asyncio.sleep(15)
    proc.send_signal(signal.SIGCONT)
    return set()


async def worker_drain(stack: Stack) -> set[str]:
    stack.service("worker-1").process.send_signal(signal.SIGTERM)
    return {"worker-1"}  # it exits once what it holds has finished


async def redis_outage(stack: Stack, down_s: float) -> set[str]:
    assert stack.redis is not None
    await asyncio.to_thread(stack.redis.restart, 10.0, down_s)
    return set()


async def scheduler_kill(stack: Stack, restart_after: float) -> set[str]:
    await kill(stack, "scheduler", restart_after)
    return set()


async def router_kill(stack: Stack) -> set[str]:
    await kill(stack, "router")
    return set()


async def nothing(stack: Stack) -> set[str]:
    return set()


SCENARIOS: dict[str, Fault] = {
    "none": nothing,
    "worker-kill": worker_kill,
    "scheduler-kill-1.5s": lambda s: scheduler_kill(s, 1.5),
    "scheduler-kill-20s": lambda s: scheduler_kill(s, 20.0),
    "router-kill": router_kill,
    "redis-0.2s": lambda s: redis_outage(s, 0.2),
    "redis-3s": lambda s: redis_outage(s, 3.0),
    "worker-sigstop-15s": worker_stop,
    "worker-drain": worker_drain,
}


def start(model: str, log_dir: Path, metrics_port: int) -> Stack:
    return asyncio.run(start_stack(
        model, num_workers=2, log_dir=log_dir,
        worker_args=["--num-blocks", str(NUM_BLOCKS), "--heartbeat-s", "1"],
        scheduler_args=["--metrics-port", str(metrics_port), "--heartbeat-check-s", "0.5"]))


def run_scenario(name: str, args: argparse.Namespace, prompts: list[str],
                 reference: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    metrics_port = free_port()
    stack = start(args.model, Path(tempfile.mkdtemp(prefix=f"faults-{name}-")), metrics_port)
    lost: set[str] = set()
    try:
        async def fault() -> None:
            lost.update(await SCENARIOS[name](stack))

        streams, began = asyncio.run(stream_all(
            stack.router, prompts, args.tokens, args.hang_s, args.fault_at, fault))
        workers = {w: NUM_BLOCKS for w in ("worker-0", "worker-1") if w not in lost}
        keys = RedisKeys("default", Path(args.model).resolve().name)
        row = tally(name, streams, reference or [s.tokens for s in streams])
        row["stall_s"] = round(stall_s(streams, began), 2)
        row["blocks_back"] = blocks_back(stack.redis_url, keys, workers)
        row["gauges_back"] = gauges_back(metrics_port, lost)
        return row, [s.tokens for s in streams]
    finally:
        stack.stop()


def tally(name: str, streams: list[Stream], reference: list[list[int]]) -> dict:
    row: dict = {"scenario": name, "identical": 0, "wrong": 0, "failed": 0, "hung": 0,
                 "failed_with_correct_prefix": 0, "errors": set()}
    for s, ref in zip(streams, reference, strict=True):
        if s.done:
            row["identical" if s.tokens == ref else "wrong"] += 1
        elif s.error:
            row["failed"] += 1
            row["errors"].add(s.error)
            row["failed_with_correct_prefix"] += s.tokens == ref[:len(s.tokens)]
        else:
            row["hung"] += 1
    row["errors"] = ",".join(sorted(row["errors"]))
    return row


def run(argv: list[str] | None = None) -> list[dict]:
    """Parse ``argv``, run the scenarios, print the table as it goes; return its rows."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help=f"model dir (default {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--streams", type=int, default=48)
    p.add_argument("--tokens", type=int, default=600)
    p.add_argument("--fault-at", type=float, default=0.3, help="share of the tokens before the fault")
    p.add_argument("--hang-s", type=float, default=120.0, help="after the fault, a stream not done is hung")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated; 'none' always runs first")
    args = p.parse_args(argv)
    if not args.model:
        from pagewire.testmodel import ensure_model

        args.model = str(ensure_model(DEFAULT_MODEL, seed=0, size="tiny"))
    prompts = [f"Stream {i} of the fault matrix: " + "tell me more " * (i % 7) for i in range(args.streams)]
    print(f"{args.streams} streams x {args.tokens} tokens, fault at {args.fault_at:.0%}, "
          f"pid {os.getpid()}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    header = ("scenario", "identical", "wrong", "failed", "hung", "failed_with_correct_prefix",
              "errors", "blocks_back", "gauges_back", "stall_s")
    print(" | ".join(header), flush=True)
    reference, rows = None, []
    for name in ["none", *[n for n in args.scenarios.split(",") if n and n != "none"]]:
        row, outputs = run_scenario(name, args, prompts, reference)
        reference = reference or outputs
        rows.append(row)
        print(" | ".join(str(row[h]) for h in header), flush=True)
    return rows


if __name__ == "__main__":
    run()
