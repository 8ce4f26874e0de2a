"""The measuring side of ``bench/faults.py``: streams that note when each token came, and what a
stack looks like once a fault is over (blocks back in Redis, gauges back in the metrics)."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

from pagewire import redis_client, serving
from pagewire.redis_keys import RedisKeys
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass
class Stream:
    prompt: str
    tokens: list[int] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # monotonic arrival of each token
    error: str = ""  # gRPC status name when it failed
    done: bool = False


def request(prompt: str, max_tokens: int) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(text=prompt, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


async def run_stream(stub: generation_pb2_grpc.GenerationStub, s: Stream, max_tokens: int) -> None:
    try:
        async for resp in stub.Generate(request(s.prompt, max_tokens)):
            now = time.monotonic()
            s.tokens.extend(resp.token_ids)
            s.times.extend([now] * len(resp.token_ids))
        s.done = True
    except grpc.aio.AioRpcError as e:
        s.error = e.code().name


async def stream_all(router: str, prompts: list[str], max_tokens: int, hang_s: float,
                     fault_at: float, fault: object) -> tuple[list[Stream], float]:
    """Run every prompt; once the streams average ``fault_at`` of their tokens, await
    ``fault()``. Streams not done ``hang_s`` after the fault are left hung (cancelled).
    Returns the streams and when the fault began."""
    streams = [Stream(p) for p in prompts]
    async with serving.insecure_channel(router) as ch:
        stub = generation_pb2_grpc.GenerationStub(ch)
        tasks = [asyncio.create_task(run_stream(stub, s, max_tokens)) for s in streams]
        while sum(len(s.tokens) for s in streams) < fault_at * max_tokens * len(streams):
            await asyncio.sleep(0.01)
        began = time.monotonic()
        await fault()  # type: ignore[operator]
        _, pending = await asyncio.wait(tasks, timeout=hang_s)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return streams, began


def stall_s(streams: list[Stream], began: float) -> float:
    """The longest pause between two tokens of one stream, from the fault on: how long the
    fault held the streams up (0 when no stream was still going)."""
    gaps = [after - before for s in streams
            for before, after in zip(s.times, s.times[1:], strict=False) if after > began]
    return max(gaps, default=0.0)


def blocks_back(redis_url: str, keys: RedisKeys, workers: dict[str, int], timeout: float = 15) -> bool:
    """Every block of every (surviving) worker free or cached in Redis, no request live."""
    client = redis_client.sync_client(redis_url)
    deadline = time.monotonic() + timeout
    try:
        while True:
            live = client.scard(keys.requests())
            ok = live == 0 and all(
                client.scard(keys.free_blocks(w)) + client.zcard(keys.cached_blocks(w)) == n
                for w, n in workers.items())
            if ok or time.monotonic() > deadline:
                return ok
            time.sleep(0.2)
    finally:
        client.close()


def gauges_back(metrics_port: int, lost: set[str], timeout: float = 15) -> bool:
    """The scheduler reports nothing running anywhere, and no series for a lost worker."""
    deadline = time.monotonic() + timeout
    while True:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        running = {s.labels["worker_id"]: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name == "pagewire:num_requests_running"}
        ok = not (set(running) & lost) and not any(running.values())
        if ok or time.monotonic() > deadline:
            return ok
        time.sleep(0.2)
