"""Is a worker still beating? Its heartbeat key in Redis, read the way a Redis restart cannot fool.

A worker refreshes its heartbeat key (``worker_alive``, TTL three beats) every beat. A key that
is missing after its TTL ran out means the worker stopped beating: it is lost. A key missing
*before* then was not expired by Redis: Redis restarted empty (or lost it in a failover). That
says nothing of the worker, which registers again at its next beat, so it gets one whole TTL
from then to show up; so does a worker whose key could not be read while Redis was away.
Declaring it lost instead would throw away its KV and prefix caches and recompute every request
it holds. (A worker that exits deletes its key but not its registry entry, written with every
beat and never expiring: a key gone early beside an entry still there is a worker that left.)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pagewire.redis_client import Client
from pagewire.redis_keys import RedisKeys
from pagewire.store_outage import STORE_DOWN

log = logging.getLogger("scheduler.heartbeat")


async def watch_heartbeat(
    r: Client, keys: RedisKeys, worker_id: str, interval: float,
    on_state_lost: Callable[[], Awaitable[None]],
) -> None:
    """Poll every ``interval`` s; return when the worker has stopped beating. The same read
    notices a Redis that no longer holds the worker's state (``worker_state``, which the
    scheduler keeps while it drives the worker) and awaits ``on_state_lost``."""
    key, state = keys.worker_alive(worker_id), keys.worker_state(worker_id)
    info = keys.worker_info(worker_id)  # written with every beat, no TTL: gone only with Redis
    loop = asyncio.get_running_loop()
    ttl = 0.0  # the longest TTL seen on the key
    expires_at: float | None = None  # None until the key is first seen
    vanished = False  # missing before its time; expires_at is the grace's end
    while True:
        await asyncio.sleep(interval)
        asked = loop.time()  # before the read: the key expires no earlier than this + its TTL
        try:
            async with r.pipeline(transaction=False) as p:
                pttl, has_state, has_info = await p.pttl(key).exists(state).exists(info).execute()
        except STORE_DOWN:
            if expires_at is not None:
                expires_at = max(expires_at, loop.time() + ttl)
            continue
        if not has_state:
            await on_state_lost()
        if pttl >= 0 or pttl == -1:  # -1: no TTL (set by hand), alive while it stays
            ttl = max(ttl, pttl / 1000, interval)
            expires_at, vanished = asked + max(pttl / 1000, interval), False
        elif expires_at is None:
            continue
        elif asked >= expires_at or has_info:  # expired, or the worker took itself out
            return
        elif not vanished:
            log.warning("worker %s: heartbeat key gone before its TTL ran out (Redis restarted?);"
                        " waiting up to %.1f s for its next beat", worker_id, ttl)
            expires_at, vanished = asked + ttl, True
