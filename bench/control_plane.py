"""Control-plane overhead: scheduler steps/s with a null worker (no model), Redis writes on.

    python bench/control_plane.py [--running 1,64,256,1024] [--window 3] [--out control_plane.json]

Starts a private redis-server, a null worker (same gRPC service, answers at once) and a
scheduler, then for each level keeps that many requests decoding (submitted on one Connect
stream, whose event batches this script consumes like a router would) and reads the scheduler's
step counter from Redis over a window, with the CPU time per step of the scheduler, the null
worker, redis-server and this client (they share the machine's cores). Every step writes its
tokens, blocks and load to Redis in one round trip and sends the step's events to the router as
one batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

import redis

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.redis_keys import RedisKeys
from pagewire.redis_server import start_redis
from pagewire.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to separate the scheduler's own cost
    per step from the waiting on the other processes that share this machine's cores."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(addr: str, pids: dict[str, int], r: redis.Redis, load_key: str, n: int,
                  window: float) -> dict:
    """Keep ``n`` requests decoding over one Connect stream (as a router does); count steps.
    ``pids``: the processes whose CPU time per step is reported (scheduler first)."""
    counts: dict[str, int] = {f"cp-{n}-{i}": 0 for i in range(n)}
    outgoing: asyncio.Queue[scheduler_pb2.RouterMessage] = asyncio.Queue()
    for i, rid in enumerate(counts):
        outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=scheduler_pb2.SubmitRequest(
            request_id=rid,
            prompt_token_ids=[100 + (i * 16 + j) % 30000 for j in range(16)],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=30000, ignore_eos=True),
        )))

    async def messages():  # type: ignore[no-untyped-def]
        while True:
            yield await outgoing.get()

    async with serving.insecure_channel(addr) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).Connect(messages())

        async def consume() -> None:
            async for batch in call:
                for event in batch.events:
                    counts[event.request_id] += len(event.token_ids)
                for rid in batch.token_request_ids:
                    counts[rid] += 1

        consumer = asyncio.create_task(consume())
        while min(counts.values()) < 2:
            await asyncio.sleep(0.05)
        samples: list[float] = []
        cpu_ms: dict[str, list[float]] = {name: [] for name in pids}
        for _ in range(3):
            s0, t0 = int(r.hget(load_key, "steps")), time.perf_counter()
            c0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
            await asyncio.sleep(window / 3)
            s1, t1 = int(r.hget(load_key, "steps")), time.perf_counter()
            for name, pid in pids.items():
                cpu_ms[name].append((cpu_seconds(pid) - c0[name]) * 1e3 / max(s1 - s0, 1))
            samples.append((s1 - s0) / (t1 - t0))
        running = int(r.hget(load_key, "running"))
        call.cancel()  # closing the stream aborts every request it submitted
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
    steps_s = statistics.median(samples)
    return {"running": n, "running_seen": running, "steps_per_s": steps_s, "ms_per_step": 1e3 / steps_s,
            **{f"{name}_cpu_ms_per_step": statistics.median(v) for name, v in cpu_ms.items()},
            "tokens_per_s": steps_s * n, "samples_steps_per_s": samples}


async def main_async(args: argparse.Namespace) -> list[dict]:
    rs = start_redis()
    stack = Stack(model="null", redis_url=rs.url)
    try:
        wport = free_port()
        worker = await stack.start_service("worker", "worker_svc.null_worker",
                                           ["--port", str(wport), "--worker-id", "null-0", "--num-blocks", "200000"], wport)
        sched = await stack.start_scheduler(
            [worker], ["--max-num-seqs", "1024", "--max-num-batched-tokens", "16384", "--log-level", "WARNING"]
        )
        # The server's overall health is SERVING as soon as it listens; the Scheduler service
        # only once it has attached its worker (a Connect before that is refused).
        await serving.wait_healthy(sched.address, 60, service="pagewire.v1.Scheduler")
        r = redis.Redis.from_url(rs.url)
        load_key = RedisKeys("default", "null").worker_load("null-0")
        rows = []
        for n in args.running:
            pids = {"scheduler": sched.process.pid, "worker": worker.process.pid, "redis": rs.pid,
                    "client": os.getpid()}
            rows.append(await measure(sched.address, pids, r, load_key, n, args.window))
            while int(r.hget(load_key, "running") or 0):
                await asyncio.sleep(0.1)
        return rows
    finally:
        stack.stop()  # before Redis: the scheduler writes to it until it stops
        rs.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--running", default="1,64,256,1024")
    p.add_argument("--window", type=float, default=3.0)
    p.add_argument("--out", default="control_plane.json")
    args = p.parse_args()
    args.running = [int(x) for x in args.running.split(",")]
    rows = asyncio.run(main_async(args))
    print(f"{'running':>8} {'steps/s':>9} {'wall ms/step':>13} {'sched CPU ms/step':>18} {'tokens/s':>9}"
          f"   CPU ms/step of worker / redis / client")
    for row in rows:
        print(f"{row['running']:>8} {row['steps_per_s']:>9.1f} {row['ms_per_step']:>13.3f} "
              f"{row['scheduler_cpu_ms_per_step']:>18.3f} {row['tokens_per_s']:>9.0f}   "
              f"{row['worker_cpu_ms_per_step']:.3f} / {row['redis_cpu_ms_per_step']:.3f} / "
              f"{row['client_cpu_ms_per_step']:.3f}")
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
