"""The scheduler lease against a real Redis: one holder, a standby that waits, no stale renewals."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from scheduler_svc.lease import Lease, LeaseLost


def test_standby_waits_for_the_holder_and_takes_over_after_release(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url)
        first, second = Lease(r, "lease-a", 0.3), Lease(r, "lease-a", 0.3)
        await first.acquire()
        waiting = asyncio.Event()
        standby = asyncio.create_task(second.acquire(waiting))
        await asyncio.wait_for(waiting.wait(), 1)
        keeper = asyncio.create_task(first.keep())
        await asyncio.sleep(0.6)  # two TTLs: renewals keep the standby out
        assert not standby.done()
        keeper.cancel()
        await first.release()
        await asyncio.wait_for(standby, 1)
        assert await r.get("lease-a") == second.token.encode()
        await r.aclose()

    asyncio.run(scenario())


def test_holder_that_lost_its_lease_cannot_renew_it(redis_url: str) -> None:
    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url)
        first, second = Lease(r, "lease-b", 0.3), Lease(r, "lease-b", 0.3)
        await first.acquire()
        await r.delete("lease-b")  # expired, e.g. the holder was paused past its TTL
        await second.acquire()  # ... and a standby took it
        with pytest.raises(LeaseLost):
            await first.keep()
        await first.release()  # a stale holder's release must not drop the new holder's lease
        assert await r.get("lease-b") == second.token.encode()
        await r.aclose()

    asyncio.run(scenario())
