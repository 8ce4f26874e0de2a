"""A fleet of engines as discovery.attach_worker makes them, without their step loops (unless a
test runs one), over a real Redis in a key namespace of the test's own."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.fleet import Fleet
from scheduler_svc.scheduler import SchedulerLimits
from scheduler_svc.state_store import StateStore
from scheduler_svc.step_loop import WorkerEngine

BS = 4


def worker_info(wid: str, num_blocks: int = 64, max_model_len: int = 512) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(worker_id=wid, block_size=BS, num_blocks=num_blocks,
                                 max_model_len=max_model_len, eos_token_ids=[1],
                                 instance_id=uuid.uuid4().hex)


def attach(fleet: Fleet, r: aioredis.Redis, keys: RedisKeys, wid: str, *, connected: bool = True,
           address: str = "", info: worker_pb2.WorkerInfo | None = None) -> WorkerEngine:
    """An engine added to ``fleet``, marked connected (as its step stream would)."""
    info = info or worker_info(wid)
    limits = SchedulerLimits(8, 64, BS, info.max_model_len, eos_token_ids=tuple(info.eos_token_ids))
    engine = WorkerEngine(address or f"addr-{wid}", info, StateStore(r, keys, wid), limits, fleet)
    engine.connected = connected
    fleet.adopt(engine, [])
    return engine


def submit(rid: str, worker_id: str = "", prompt_len: int = 3, max_tokens: int = 8,
           **fields: object) -> scheduler_pb2.SubmitRequest:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens).to_proto()
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=list(range(5, 5 + prompt_len)),
                                       sampling=sampling, worker_id=worker_id, **fields)


def scenario(redis_url: str, body: Callable[[aioredis.Redis, RedisKeys], Awaitable[None]]) -> None:
    """Run ``body`` with its own key namespace, so tests sharing the server never meet."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            await body(r, RedisKeys(f"fleet-{uuid.uuid4().hex[:8]}", "m"))
        finally:
            await r.aclose()

    asyncio.run(run())
