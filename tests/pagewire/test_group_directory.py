"""The group directory against a real Redis: written only under the lease, read as live only while
the lease is held, taken over by a standby at its own address."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from pagewire.group_directory import Group, publish_group, read_live_groups
from pagewire.redis_keys import RedisKeys

Body = Callable[[aioredis.Redis, RedisKeys], Awaitable[None]]


def scenario(redis_url: str, body: Body) -> None:
    """Run ``body`` in its own key namespace, so tests sharing the server never meet."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            await body(r, RedisKeys(f"groups-{uuid.uuid4().hex[:8]}", "m"))
        finally:
            await r.aclose()

    asyncio.run(run())


async def hold(r: aioredis.Redis, k: RedisKeys, group: str, token: str, ttl_ms: int = 60_000) -> None:
    """What scheduler_svc.lease.Lease.acquire writes."""
    assert await r.set(k.scheduler_lease(group), token, nx=True, px=ttl_ms)


def test_holders_publish_and_routers_read_every_live_group(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys) -> None:
        assert await read_live_groups(r, k) == []
        await hold(r, k, "b", "tb")
        await hold(r, k, "a", "ta")
        assert await publish_group(r, k, "b", "tb", "host-b:1", ["w2", "w3"])
        assert await publish_group(r, k, "a", "ta", "host-a:1", ["w1"])
        assert await read_live_groups(r, k) == [
            Group("a", "host-a:1", frozenset({"w1"})),
            Group("b", "host-b:1", frozenset({"w2", "w3"})),
        ]

    scenario(redis_url, body)


def test_group_whose_lease_lapsed_is_not_live(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys) -> None:
        await hold(r, k, "a", "ta")
        await hold(r, k, "b", "tb", ttl_ms=100)
        await publish_group(r, k, "a", "ta", "host-a:1", ["w1"])
        await publish_group(r, k, "b", "tb", "host-b:1", ["w2"])
        await asyncio.sleep(0.2)  # b's scheduler died: nobody renewed its lease
        assert [g.name for g in await read_live_groups(r, k)] == ["a"]

    scenario(redis_url, body)


def test_scheduler_without_the_lease_cannot_overwrite_the_holders_entry(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys) -> None:
        await hold(r, k, "a", "new-holder")
        assert await publish_group(r, k, "a", "new-holder", "host-new:1", ["w1"])
        assert not await publish_group(r, k, "a", "stale-holder", "host-old:1", ["w1", "w9"])
        assert await read_live_groups(r, k) == [Group("a", "host-new:1", frozenset({"w1"}))]

    scenario(redis_url, body)


def test_standby_taking_the_lease_over_replaces_address_and_workers(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys) -> None:
        await hold(r, k, "a", "first")
        await publish_group(r, k, "a", "first", "host-1:1", ["w1", "w2"])
        await r.delete(k.scheduler_lease("a"))  # the holder died and its lease expired
        await hold(r, k, "a", "standby")
        assert await publish_group(r, k, "a", "standby", "host-2:1", ["w1"])
        assert await read_live_groups(r, k) == [Group("a", "host-2:1", frozenset({"w1"}))]

    scenario(redis_url, body)


def test_group_with_no_workers_is_live_and_empty(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys) -> None:
        await hold(r, k, "a", "ta")
        await publish_group(r, k, "a", "ta", "host-a:1", ["w1"])
        assert await publish_group(r, k, "a", "ta", "host-a:1", [])
        assert await read_live_groups(r, k) == [Group("a", "host-a:1", frozenset())]

    scenario(redis_url, body)
