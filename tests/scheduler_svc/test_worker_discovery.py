"""A scheduler without --workers finds, in the real Redis registry, the live workers of its group."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from pagewire.config import SchedulerConfig
from pagewire.redis_keys import RedisKeys
from scheduler_svc.discovery import discover_workers


async def register(r: aioredis.Redis, k: RedisKeys, wid: str, group: str | None, alive: bool = True) -> None:
    """What worker_svc.server.register writes (a worker from before groups writes no group)."""
    info = {"address": f"addr-{wid}", "block_size": 16} | ({"group": group} if group else {})
    await r.sadd(k.workers(), wid)
    await r.hset(k.worker_info(wid), mapping=info)
    if alive:
        await r.set(k.worker_alive(wid), f"addr-{wid}", px=60_000)


def test_scheduler_drives_the_live_registered_workers_of_its_own_group(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url)
        deployment = f"discovery-{uuid.uuid4().hex[:8]}"
        k = RedisKeys(deployment, "m")
        await register(r, k, "a1", "a")
        await register(r, k, "a2", "a")
        await register(r, k, "a3", "a", alive=False)
        await register(r, k, "b1", "b")
        await register(r, k, "old", None)
        cfg = SchedulerConfig(deployment=deployment, model_name="m")
        try:
            for group, expected in (("a", ["addr-a1", "addr-a2"]), ("b", ["addr-b1"]),
                                    ("default", ["addr-old"])):
                cfg.group = group
                assert sorted(await discover_workers(cfg, r)) == expected
        finally:
            await r.aclose()

    asyncio.run(scenario())
