"""The Redis formats the worker, the scheduler and the router share: the registry entry the
worker writes and both others read, and the load figures the scheduler writes and routers read."""

from __future__ import annotations

import asyncio
import uuid

import redis.asyncio as aioredis

from pagewire.redis_keys import RedisKeys
from pagewire.worker_load import FIELDS, ROUTING_FIELDS, LoadFigures
from pagewire.worker_registry import WorkerEntry, beat, leave, live_addresses, read_entries
from router.routing import DECISION_LUA


def test_a_beat_registers_the_entry_and_the_readers_get_it_back(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url)
        keys = RedisKeys(f"formats-{uuid.uuid4().hex[:8]}", "m")
        a = WorkerEntry("a", "host:1", "m", block_size=16, num_blocks=100, max_model_len=2048,
                        group="g", pid=42)
        b = WorkerEntry("b", "host:2", "m", block_size=16, num_blocks=50, max_model_len=2048)
        try:
            await beat(r, keys, a, ttl_ms=60_000)
            await beat(r, keys, b, ttl_ms=60_000)
            assert await read_entries(r, keys) == [a, b]
            assert await live_addresses(r, keys, "g") == ["host:1"]
            assert await live_addresses(r, keys, "default") == ["host:2"]
            await leave(r, keys, "a")
            assert await live_addresses(r, keys, "g") == [], "gone once its heartbeat key is"
            assert await read_entries(r, keys) == [a, b], "the entry outlives the heartbeat"
        finally:
            await r.aclose()

    asyncio.run(scenario())


def test_an_entry_written_without_newer_fields_reads_with_defaults() -> None:
    raw = {b"address": b"h:1", b"block_size": b"16"}
    assert WorkerEntry.from_fields("old", raw) == WorkerEntry("old", "h:1", block_size=16)


def test_the_routing_script_reads_load_figures_the_scheduler_writes() -> None:
    figures = LoadFigures(1, 2, 3, 4, 5, 6, 7, 8, 9, 1)
    assert tuple(figures.as_dict()) == FIELDS
    for name in ROUTING_FIELDS:
        assert f"'{name}'" in DECISION_LUA
