"""A step's results, recorded in Redis first and told to the routers after.

Tokens leave only once Redis has them, and in step order: a router never sees a token a
recovery could not replay. The write of step N is not awaited by the step loop: it schedules and
sends step N+1 while Redis applies N (writes land in order, and so do the emissions that follow
them). At most one write is in flight; the next :meth:`StepWriter.wait` surfaces its failure.

When a write fails (Redis restarted, or the connection broke) the worker's events are held until
Redis is back, and then its whole state is rewritten from memory (:meth:`StepWriter.resync`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from pagewire.store_outage import STORE_DOWN
from pagewire.worker_load import LoadFigures
from scheduler_svc.events import Events, deliver, split_events
from scheduler_svc.observe import end_request_span
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler
from scheduler_svc.state_store import CHECKPOINT_LOG_BYTES, StateStore
from scheduler_svc.store_writes import Write

if TYPE_CHECKING:
    from scheduler_svc.fleet import Fleet

log = logging.getLogger("scheduler.engine")


class StepWriter:
    def __init__(self, store: StateStore, scheduler: Scheduler, fleet: Fleet, worker_id: str,
                 instance_id: str) -> None:
        self.store = store
        self.scheduler = scheduler
        self.fleet = fleet
        self.worker_id = worker_id
        self.instance_id = instance_id  # which worker process a resync describes
        self._emitting: asyncio.Future[None] | None = None  # the latest step's write + events
        self._resync_lock = asyncio.Lock()

    async def wait(self) -> None:
        """The previous step's write and events are out (a failed write surfaces here)."""
        if self._emitting is not None:
            await self._emitting

    def record(self, touched: list[Request], done: list[Request], figures: LoadFigures) -> None:
        """Queue the step's Redis writes, fix its events, and send both in that order."""
        sched, store = self.scheduler, self.store
        store.generated(touched)
        for req in done:
            store.finished(req)
        if store.log_bytes > CHECKPOINT_LOG_BYTES:
            store.checkpoint([*sched.running, *sched.waiting])
        store.blocks(sched.pool)
        store.publish_load(figures)
        plain, events = split_events(touched, self.worker_id)
        self._emitting = asyncio.ensure_future(
            self._emit_after(store.generation, store.take(), plain, events, done))

    async def _emit_after(self, generation: int, write: Write, plain: list[Request],
                          events: Events, done: list[Request]) -> None:
        try:
            await self.store.send(write)
        except STORE_DOWN as e:
            await self.resync(generation, e)
        deliver(plain, events)
        for req in done:
            end_request_span(req)
            self.fleet.request_done(req)

    async def settle(self) -> None:
        """Wait until every step's write has landed and its events are out."""
        await self.wait()
        generation = self.store.generation
        try:
            await self.store.flush()
        except STORE_DOWN as e:
            await self.resync(generation, e)

    async def resync(self, generation: int, error: BaseException) -> None:
        """Hold this worker's events until Redis is back, then rewrite its whole state."""
        async with self._resync_lock:
            if self.store.generation != generation:
                return  # a resync since this write was queued already covered it
            log.warning("Redis write for worker %s failed (%s): holding events until it is back",
                        self.worker_id, error)
            while True:
                try:
                    sched = self.scheduler
                    await self.store.resync(self.instance_id, sched.pool,
                                            [*sched.running, *sched.waiting])
                    log.warning("Redis is back: worker %s state rewritten", self.worker_id)
                    return
                except STORE_DOWN:
                    await asyncio.sleep(0.2)
