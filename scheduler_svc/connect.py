"""The scheduler's gRPC service: one Connect stream per router, requests in, event batches out.

A router's messages are read here and handed on -- a submit to admission and the fleet, a resume
to the recovered request, an abort to the fleet -- and the router's events, collected by its
``RouterConn`` as steps complete, leave as one EventBatch per wake-up.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pagewire import config as pwconfig
from pagewire.v1 import scheduler_pb2, scheduler_pb2_grpc
from scheduler_svc.admission import Refusal, admit
from scheduler_svc.events import RouterConn, replay_event
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request
from scheduler_svc.stored_state import load_request

log = logging.getLogger("scheduler")

ORPHAN_TIMEOUT_S = 60.0  # a recovered request no router re-attaches to within this is aborted


class SchedulerService(scheduler_pb2_grpc.SchedulerServicer):
    def __init__(self, cfg: pwconfig.SchedulerConfig) -> None:
        self.cfg = cfg
        self.fleet = Fleet()
        self.ready = False
        self.draining = False  # shutting down: no new requests

    async def drain(self) -> None:
        """SIGTERM: refuse new requests, let the ones in flight finish."""
        self.draining = True
        while len(self.fleet):
            await asyncio.sleep(0.1)
        await self.fleet.settle()

    async def Connect(
        self, request_iterator: AsyncIterator[scheduler_pb2.RouterMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[scheduler_pb2.EventBatch]:
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "scheduler is starting")
        await context.send_initial_metadata(())  # tells the router the stream is accepted
        conn = RouterConn()
        reader = asyncio.create_task(self._read_router(request_iterator, conn))
        reader.add_done_callback(lambda _: conn.ready.set())  # wakes the loop below to end
        try:
            while True:
                if conn.pending:
                    for batch in conn.take():  # clears ready
                        yield batch
                elif reader.done():
                    break
                else:
                    conn.ready.clear()
                    await conn.ready.wait()
        finally:
            reader.cancel()
            for req in self.fleet.owned_by(conn):  # the router went away: free their blocks
                req.conn = None
                engine = self.fleet.engine_of(req.request_id)
                if engine is not None and not req.finished:
                    engine.abort(req)

    async def _read_router(
        self, messages: AsyncIterator[scheduler_pb2.RouterMessage], conn: RouterConn
    ) -> None:
        async for msg in messages:
            if msg.HasField("submit"):
                sub = msg.submit
                refusal = await self.resume(sub, conn) if sub.resume else self.submit(sub, conn)
                if refusal is not None:
                    conn.send(scheduler_pb2.TokenEvent(
                        request_id=sub.request_id, error_code=refusal.code.value[0],
                        error_message=refusal.text,
                    ))
            elif msg.HasField("abort"):
                self.fleet.abort(msg.abort.request_id, conn)

    def submit(self, sub: scheduler_pb2.SubmitRequest, conn: RouterConn) -> Refusal | None:
        """Admit a new request and place it; why not, if it is refused."""
        found = admit(sub, self.fleet, conn, group=self.cfg.group, max_queue=self.cfg.max_queue,
                      shutting_down=self.draining)
        if isinstance(found, Refusal):
            return found
        self.fleet.place(found.request, found.engine)
        return None

    async def resume(self, sub: scheduler_pb2.SubmitRequest, conn: RouterConn) -> Refusal | None:
        """Re-attach a request recovered after a restart: replay from resume_from, then live.

        A request that finished just before the restart (its last events possibly unsent) is
        replayed from Redis, where its output outlives it for a while.
        """
        rid, start = sub.request_id, max(sub.resume_from, 0)
        req = self.fleet.request(rid)
        if req is None:
            req = await self._finished_request(rid)
            if req is None:
                return Refusal(grpc.StatusCode.NOT_FOUND, f"request_id {rid!r} is not in flight")
        else:
            req.conn = conn
        conn.send(replay_event(req, start))
        return None

    async def _finished_request(self, rid: str) -> Request | None:
        engine = next(iter(self.fleet.engines.values()), None)
        stored = await load_request(engine.store.r, engine.store.keys, rid) if engine else None
        if stored is None or not stored[0].finish_reason:
            return None
        return stored[0].to_request()

    async def reap_orphans(self, recovered: list[Request]) -> None:
        """Abort recovered requests that no router re-attached to in time."""
        await asyncio.sleep(ORPHAN_TIMEOUT_S)
        for req in recovered:
            if req.conn is None and not req.finished:
                log.warning("aborting %s: no router resumed it", req.request_id)
                self.fleet.abort(req.request_id)
