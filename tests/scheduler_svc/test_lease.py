"""The scheduler lease against a real Redis: one holder, a standby that waits, no stale renewals,
and a holder killed on this machine replaced at once (one elsewhere, or alive, waited for)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

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


HOLDER = """
import asyncio, sys
import redis.asyncio as aioredis
from scheduler_svc.lease import Lease

async def main():
    lease = Lease(aioredis.Redis.from_url(sys.argv[1]), sys.argv[2], 60)
    await lease.acquire()
    print("held", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def holder_process(redis_url: str, key: str) -> subprocess.Popen[str]:
    """A real process that takes the lease (TTL 60 s) and holds it until killed."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, redis_url, key], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_lease_of_a_holder_killed_on_this_machine_is_taken_over_at_once(redis_url: str) -> None:
    holder = holder_process(redis_url, "lease-c")
    holder.kill()
    holder.wait()

    async def scenario() -> float:
        r = aioredis.Redis.from_url(redis_url)
        assert await r.pttl("lease-c") > 50_000  # the dead holder's lease would last a minute
        successor = Lease(r, "lease-c", 60)
        start = time.monotonic()
        await asyncio.wait_for(successor.acquire(), 5)
        assert await r.get("lease-c") == successor.token.encode()
        await r.aclose()
        return time.monotonic() - start

    assert asyncio.run(scenario()) < 1.0


def test_lease_of_a_live_holder_or_one_elsewhere_is_waited_for(redis_url: str) -> None:
    holder = holder_process(redis_url, "lease-d")

    async def scenario() -> None:
        r = aioredis.Redis.from_url(redis_url)
        successor = Lease(r, "lease-d", 60)
        with pytest.raises(TimeoutError):  # alive: whatever the successor thinks, it waits
            await asyncio.wait_for(successor.acquire(), 1)
        token, _space, pid = (await r.get("lease-d")).decode().split(" ")
        await r.set("lease-d", f"{token} another-host/boot/pid:[1] {pid}", px=60_000)
        holder.kill()
        holder.wait()
        with pytest.raises(TimeoutError):  # dead, but on another machine: nothing proves it
            await asyncio.wait_for(successor.acquire(), 1)
        await r.aclose()

    try:
        asyncio.run(scenario())
    finally:
        holder.kill()
