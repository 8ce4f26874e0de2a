"""The scheduler's health follows its state of record: NOT_SERVING while Redis has not answered
for longer than a bound.

While Redis is away the scheduler holds every token event (a token leaves only once Redis has
it), so its streams stall; a short outage is a pause, not a failure. Past ``--store-timeout-s``
without an answer, the scheduler says so where operators and probes look -- its gRPC health turns
NOT_SERVING -- and turns SERVING again at the first answer. It keeps its work either way: when
Redis is back it rewrites its state from memory and the streams resume.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pagewire.redis_client import Client
from pagewire.store_outage import STORE_ERRORS

log = logging.getLogger("scheduler.store")


async def watch_store(
    r: Client, bound_s: float, set_serving: Callable[[bool], Awaitable[None]],
    draining: Callable[[], bool], period_s: float = 0.5,
) -> None:
    """PING every ``period_s`` (each given ``period_s`` to answer); call ``set_serving(False)``
    once none has answered for ``bound_s``, ``set_serving(True)`` at the next answer -- never
    while ``draining()`` (shutting down owns the health then)."""
    loop = asyncio.get_running_loop()
    answered, down = loop.time(), False
    while True:
        await asyncio.sleep(period_s)
        try:
            await asyncio.wait_for(r.ping(), period_s)
            answered = loop.time()
        except (TimeoutError, *STORE_ERRORS):
            pass
        if draining():
            return
        late = loop.time() - answered
        if not down and late > bound_s:
            log.warning("Redis has not answered for %.1f s: NOT_SERVING until it does "
                        "(token events are held meanwhile)", late)
            down = True
            await set_serving(False)
        elif down and late <= period_s * 2:
            log.warning("Redis answers again: SERVING")
            down = False
            await set_serving(True)
