"""The workers this scheduler drives, the requests in flight, and which worker runs which.

The fleet owns the engines (one per worker) and the one index of requests in flight (request id
-> the request and its engine). It places new requests, moves requests between workers (a lost
worker's, a draining worker's that never started), and forgets requests once their last events
are out. Engines call it by name (``worker_lost``, ``hand_over``, ``request_done``); nothing else
writes the index.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable

from scheduler_svc.events import RouterConn
from scheduler_svc.request import Request
from scheduler_svc.step_loop import WorkerEngine

log = logging.getLogger("scheduler")


class Fleet:
    def __init__(self) -> None:
        self.engines: dict[str, WorkerEngine] = {}
        self._index: dict[str, tuple[Request, WorkerEngine]] = {}

    # ---- the index ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    def request(self, rid: str) -> Request | None:
        found = self._index.get(rid)
        return found[0] if found is not None else None

    def engine_of(self, rid: str) -> WorkerEngine | None:
        found = self._index.get(rid)
        return found[1] if found is not None else None

    def owned_by(self, conn: RouterConn) -> list[Request]:
        """The requests whose events go to ``conn`` (a router stream that is closing)."""
        return [req for req, _ in self._index.values() if req.conn is conn]

    def adopt(self, engine: WorkerEngine, recovered: list[Request]) -> None:
        """An attached worker, with the requests Redis says it held."""
        for req in recovered:
            self._index[req.request_id] = (req, engine)
        self.engines[engine.worker_id] = engine

    # ---- placement ---------------------------------------------------------------------
    def pick(self, worker_id: str, exclude: WorkerEngine | None = None) -> WorkerEngine | None:
        """The router's choice if it takes new work, else the least loaded worker that does.
        None when every worker (but ``exclude``) is draining: none of them may get new work."""
        candidates = [e for e in self.engines.values() if e is not exclude and not e.draining]
        if not candidates:
            return None
        chosen = self.engines.get(worker_id)
        if chosen in candidates and chosen.connected:
            return chosen
        return min(candidates, key=lambda e: e.load())

    def place(self, req: Request, engine: WorkerEngine) -> None:
        self._index[req.request_id] = (req, engine)
        engine.submit(req)

    def _place_elsewhere(self, reqs: list[Request], leaving: WorkerEngine) -> int:
        """Place ``reqs`` on the other workers that take new work (on ``leaving`` itself when
        none does); how many were placed (an aborted one is not)."""
        placed = 0
        for req in reqs:
            if req.finished:  # aborted while its move was written
                continue
            self.place(req, self.pick("", exclude=leaving) or leaving)
            placed += 1
        return placed

    def abort(self, rid: str, conn: RouterConn | None = None) -> bool:
        """Abort ``rid``. Over a Connect stream (``conn``), only the stream that owns the request
        (or any, while a recovered request has no owner yet) may: a router that sent a duplicate
        id and was refused aborts that id, and must not end the first request."""
        found = self._index.get(rid)
        if found is None:
            return False
        req, engine = found
        if conn is not None and req.conn is not None and req.conn is not conn:
            return False
        req.conn = None  # the router no longer wants its events
        engine.abort(req)
        return True

    # ---- called by the engines ---------------------------------------------------------
    def request_done(self, req: Request) -> None:
        """A request finished or was aborted: forget it (its events were sent already)."""
        found = self._index.get(req.request_id)
        if found is not None and found[0] is req:
            del self._index[req.request_id]

    def worker_lost(self, lost: WorkerEngine, reqs: list[Request]) -> None:
        """Recompute a lost worker's requests (prompt + output so far) on the others."""
        for req in reqs:
            self.place(req, self.pick("", exclude=lost) or lost)
        if reqs:
            log.warning("moved %d requests off worker %s", len(reqs), lost.worker_id)

    def hand_over(self, engine: WorkerEngine) -> Awaitable[None] | None:
        """A draining worker has waiting requests that never started: the hand-over that moves
        them to the workers that take new work, or None when no such worker is connected -- then
        they stay and run there, within its drain timeout (they were accepted, and the worker is
        still computing). The engine runs it at a step boundary."""
        if not any(e.connected and not e.draining for e in self.engines.values() if e is not engine):
            return None
        return self._hand_over(engine)

    async def _hand_over(self, engine: WorkerEngine) -> None:
        moved = engine.scheduler.take_unstarted()
        if not moved:
            return
        await engine.let_go(moved)
        placed = self._place_elsewhere(moved, engine)
        log.warning("worker %s is draining: moved %d waiting requests to other workers",
                    engine.worker_id, placed)

    # ---- worker health -----------------------------------------------------------------
    def set_serving(self, engine: WorkerEngine, serving: bool) -> None:
        """The worker's health status changed (``worker_health``): a worker that is not SERVING
        is draining and gets no new requests; its engine hands its unstarted ones over."""
        if engine.draining == (not serving):
            return
        engine.set_draining(not serving)
        if engine.draining:
            log.warning("worker %s is not serving (draining or starting): no new requests go to it",
                        engine.worker_id)
        else:
            log.info("worker %s is serving: it takes new requests", engine.worker_id)

    async def evacuate_draining(self) -> None:
        """Workers found draining at start-up hand their recovered requests to the serving ones,
        which recompute them (prompt + output so far) as after a worker loss: the first stream
        this scheduler opens to a worker resets its sequences, so a draining one would exit with
        them. With no worker serving they stay, and run there while it lasts."""
        if all(e.draining for e in self.engines.values()):
            return
        for engine in list(self.engines.values()):
            if engine.draining:
                log.warning("worker %s is draining at start-up: its %d recovered requests "
                            "recompute on the workers that serve", engine.worker_id,
                            len(engine.scheduler.running) + len(engine.scheduler.waiting))
                await engine.evacuate()

    async def settle(self) -> None:
        for engine in self.engines.values():
            await engine.settle()
