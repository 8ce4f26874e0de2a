"""The step loop for one worker: schedule, send the step, apply the result, record, emit.

One ``WorkerEngine`` per worker. Each step: the scheduler's decision (``scheduler``) becomes a
``Step`` message (``step_encoding``), the worker answers with one token per sampling sequence,
the scheduler appends them, and the step's Redis write goes out before its token events
(``step_writer``). Step N+1 is scheduled and sent while the worker computes step N, shortly
before N is expected to end (``step_clock``), so that what arrives meanwhile still gets into it.

Except after a step that gives some request its first token, on a CPU worker
(``hold_after_first_token``): that step's tokens go to Redis and to the routers before the
worker gets anything more. There the worker's compute threads take every core, and a delivery
made while the next step computes waits for CPU at each of its hops (worker -> scheduler -> Redis
-> scheduler -> router): 6-15 ms for a first token on the 2-core bench machine; held, 2.5-8.5 ms,
while the worker waits 2-7 ms, once per request (docs/BENCHMARKS.md).

A request that arrives after N+1 was sent but while N still computes is sent at once, as a step
that joins N+1 (``join_new_requests``, CPU workers): the worker runs it inside N+1 if it has not
begun N+1 (``worker_svc.step_join``), so the request does not wait for N+1 to end first.

When the worker's stream breaks or its heartbeat lapses, every request it held goes back to the
fleet to be recomputed elsewhere (``Fleet.worker_lost``), and the engine keeps trying to
reconnect. A draining worker (``set_draining``, from its health status) runs what it holds to the
end but takes nothing new: between steps its waiting requests that never started go to the
fleet's other workers (``Fleet.hand_over``), and its load figures say ``draining=1``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING

import grpc

from pagewire import serving
from pagewire.metrics import EngineMetrics, SchedulerMetrics
from pagewire.redis_client import Client
from pagewire.tls import TLSFiles
from pagewire.v1 import worker_pb2, worker_pb2_grpc
from scheduler_svc.batch import ScheduledBatch
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.heartbeat import watch_heartbeat
from scheduler_svc.observe import first_scheduled, load_figures, record_step
from scheduler_svc.recovery import recover
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerLimits
from scheduler_svc.state_store import StateStore
from scheduler_svc.step_clock import StepClock
from scheduler_svc.step_encoding import encode_step
from scheduler_svc.step_results import add_prompt_logprobs, read_result
from scheduler_svc.step_writer import StepWriter
from scheduler_svc.stored_state import StoredPool

if TYPE_CHECKING:
    from scheduler_svc.fleet import Fleet

log = logging.getLogger("scheduler.engine")

PIPELINE_DEPTH = 2  # steps in flight to the worker at once


class WorkerEngine:
    def __init__(self, address: str, info: worker_pb2.WorkerInfo, store: StateStore,
                 limits: SchedulerLimits, fleet: Fleet, tls: TLSFiles | None = None,
                 metrics: SchedulerMetrics | None = None) -> None:
        self.address = address
        self.info = info
        self.store = store
        self.scheduler = Scheduler(limits, BlockPool(info.num_blocks))
        self.fleet = fleet
        self.writer = StepWriter(store, self.scheduler, fleet, info.worker_id, info.instance_id)
        self.tls = tls
        self.metrics_family = metrics  # this worker's series are dropped while it is lost
        self.metrics: EngineMetrics | None = (
            metrics.for_worker(info.worker_id) if metrics is not None else None)
        self.wakeup = asyncio.Event()
        self.steps_sent = 0  # the last Step's id
        self.steps_done = 0  # since attached: published as the ``steps`` load figure
        self.connected = False
        # The worker's health is not SERVING (shutting down, or still loading): no new requests.
        self.draining = False
        self._draining_published: bool | None = None  # what Redis's load figures say (None: unknown)
        self.check_invariants = False
        self._release_ids: list[int] = []  # sequences the worker may release, sent with the next step
        self.step_clock = StepClock()
        self.hold_after_first_token = False  # see the module's docstring; CPU workers only
        self.join_new_requests = False  # likewise
        # The next result's read, started while the next step was held back (step_clock).
        self._reader: asyncio.Future[worker_pb2.StepResult] | None = None
        self._arrival: asyncio.Future[None] | None = None  # set by submit() while joining

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    # ---- called by the fleet -----------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.scheduler.add(req)
        self.store.admitted(req)
        self.wakeup.set()
        if self._arrival is not None and not self._arrival.done():
            self._arrival.set_result(None)

    def abort(self, req: Request) -> None:
        self.scheduler.abort(req)
        self.wakeup.set()

    def set_draining(self, draining: bool) -> None:
        self.draining = draining
        self.wakeup.set()  # publish the flag for routers, hand waiting requests over

    def load(self) -> int:
        return self.scheduler.load_tokens() if self.connected else 1 << 60

    async def let_go(self, reqs: list[Request]) -> None:
        """``reqs`` left this engine's scheduler for another worker: let this worker release
        them (with the next step), and wait until this worker's Redis writes so far have landed,
        so that their admission here can never overwrite their admission there."""
        self._release_ids.extend(r.seq_id for r in reqs)
        self.wakeup.set()
        await self.store.flush()

    async def settle(self) -> None:
        await self.writer.settle()

    # ---- start-up ----------------------------------------------------------------------
    async def recover(self, stored: StoredPool | None) -> list[Request]:
        """Adopt what Redis recorded for this worker (``recovery``); the requests it held."""
        return await recover(self, stored)

    async def evacuate(self) -> None:
        """Recompute every request this engine holds on the other workers, as if the worker were
        lost, but keep driving it. For a worker found draining when this scheduler starts: its
        recovered requests may not finish there (the first stream a scheduler opens resets the
        worker's sequences, and a draining worker holding none exits), so they move at once."""
        reqs = await self._take_all()
        await self.store.reset(self.info.instance_id, self.info.num_blocks)
        self.fleet.worker_lost(self, reqs)

    # ---- the loop ----------------------------------------------------------------------
    async def run(self, redis_client: Client, heartbeat_s: float) -> None:
        """Drive the worker until cancelled; on loss hand its requests back and reconnect."""
        while True:
            stream = asyncio.create_task(self._run_stream())
            watchdog = asyncio.create_task(watch_heartbeat(
                redis_client, self.store.keys, self.worker_id, heartbeat_s, self._state_lost))
            try:
                done, _ = await asyncio.wait({stream, watchdog},
                                             return_when=asyncio.FIRST_COMPLETED)
            finally:  # cancelled too: the step stream must not outlive the engine's loop
                for t in (stream, watchdog):
                    t.cancel()
                await asyncio.gather(stream, watchdog, return_exceptions=True)
            reason = next((t.exception() for t in done if not t.cancelled() and t.exception()), None)
            if isinstance(reason, AssertionError):
                # A broken invariant: crash rather than serve from corrupt bookkeeping. Redis
                # holds the last consistent step, and a restarted scheduler resumes from it.
                log.critical("invariant violated on worker %s: %s", self.worker_id, reason)
                os._exit(70)
            log.warning("worker %s lost: %s", self.worker_id, reason or "heartbeat expired")
            await self._lose_worker()
            await self._reconnect()

    async def _run_stream(self) -> None:
        """The step pipeline: the scheduler's own work -- applying N's tokens, the Redis write,
        emitting events, scheduling N+2 -- overlaps the worker's compute of N+1."""
        async with serving.open_channel(self.address, self.tls) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Execute()
            for req in self.scheduler.running:
                req.on_worker = False  # a new stream starts with an empty worker cache
            self.connected = True
            self.wakeup.set()
            inflight: deque[ScheduledBatch] = deque()
            try:
                while True:
                    await self._hand_over_at_boundary(call, inflight)
                    scheduled = False
                    if (len(inflight) < PIPELINE_DEPTH and self.scheduler.has_work
                            and not self._held_after_first_tokens(inflight)):
                        batch = self._schedule()
                        if batch.num_seqs:
                            await call.write(self._encode(batch))
                            inflight.append(batch)
                            scheduled = True
                        elif batch.ended:
                            await self._complete(batch, None)
                    if inflight and (len(inflight) >= PIPELINE_DEPTH or not scheduled):
                        await self._complete_next(call, inflight)
                    elif not scheduled and not inflight:
                        await self._idle(call)
            finally:
                if self._reader is not None:
                    self._reader.cancel()
                    self._reader = None

    async def _next_result(self, call: grpc.aio.StreamStreamCall) -> worker_pb2.StepResult:
        reader, self._reader = self._reader, None
        return await (reader if reader is not None else read_result(call))

    async def _complete_next(self, call: grpc.aio.StreamStreamCall,
                             inflight: deque[ScheduledBatch]) -> None:
        """Complete the oldest step in flight; if it gave first tokens (held), wait until they
        are delivered; else, with a step still computing and more to schedule, hold the next one
        back until shortly before that step should end, or until its result comes, whichever is
        first."""
        result = await self._result_joining(call, inflight)
        arrived = time.perf_counter()
        batch = inflight.popleft()
        await self._complete(batch, result)
        if batch.first_tokens and self.hold_after_first_token:
            await self.writer.wait()  # in Redis and with the routers: the worker may go on
            return
        if not (inflight and self.scheduler.has_work):
            return
        running = inflight[0]
        delay = self.step_clock.delay_s(running, max(arrived, running.sent_at), time.perf_counter())
        if delay > 0:
            self._reader = asyncio.ensure_future(read_result(call))
            await asyncio.wait({self._reader}, timeout=delay)

    async def _result_joining(self, call: grpc.aio.StreamStreamCall,
                              inflight: deque[ScheduledBatch]) -> worker_pb2.StepResult:
        """The oldest step's result. Meanwhile, with the step after it sent, requests that
        arrive are sent at once as steps that join that one."""
        if not (self.join_new_requests and len(inflight) > 1 and not inflight[1].joins):
            return await self._next_result(call)
        reader = self._reader = self._reader or asyncio.ensure_future(read_result(call))
        loop = asyncio.get_running_loop()
        try:
            while not reader.done():
                arrival = self._arrival = loop.create_future()  # before the check: none is missed
                if self.scheduler.waiting and not self.draining:
                    await self._join(call, inflight)
                if not arrival.done():
                    await asyncio.wait({reader, arrival}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._arrival = None
        self._reader = None
        return reader.result()

    async def _join(self, call: grpc.aio.StreamStreamCall, inflight: deque[ScheduledBatch]) -> None:
        """Send the waiting requests that fit beside ``inflight[1]`` as a step joining it."""
        target = inflight[1]
        beside = [b for b in inflight if b is target or b.joins == target.step_id]
        batch = self.scheduler.schedule_joining(sum(b.num_tokens for b in beside),
                                                sum(b.num_seqs for b in beside))
        if not batch.num_seqs:
            return
        batch.joins = target.step_id
        self._record_decision(batch)
        step = self._encode(batch, release=False)  # releases wait for the next step
        inflight.append(batch)
        await call.write(step)

    def _held_after_first_tokens(self, inflight: deque[ScheduledBatch]) -> bool:
        """Nothing more goes to the worker until the latest step's first tokens are delivered."""
        return self.hold_after_first_token and bool(inflight) and inflight[-1].first_tokens

    async def _hand_over_at_boundary(self, call: grpc.aio.StreamStreamCall,
                                     inflight: deque[ScheduledBatch]) -> None:
        """Draining, with waiting requests that never started: the fleet may move them. Before
        anything else is scheduled the steps in flight finish, so the hand-over happens at a step
        boundary, before a waiting request starts here."""
        sched = self.scheduler
        if not (self.draining and sched.waiting and sched.has_unstarted()):
            return
        hand_over = self.fleet.hand_over(self)
        if hand_over is None:
            return  # no other worker takes them: they run here
        while inflight:
            await self._complete(inflight.popleft(), await self._next_result(call))
        await hand_over

    async def _idle(self, call: grpc.aio.StreamStreamCall) -> None:
        """Nothing in flight and nothing to send: tidy up, then wait for work."""
        if self._release_ids:  # let the worker release finished sequences now
            await call.write(self._encode(ScheduledBatch()))
            await self._next_result(call)
        if self._draining_published is not self.draining:  # idle: no step publishes it
            self.store.publish_draining(self.draining)
            self._draining_published = self.draining
        await self.settle()
        self.wakeup.clear()
        if not self.scheduler.has_work:
            await self.wakeup.wait()
        else:  # work that cannot run yet (blocks, tokens in flight): poll gently
            with contextlib.suppress(asyncio.TimeoutError):  # and the wait is cancelled
                await asyncio.wait_for(self.wakeup.wait(), 0.01)

    def _encode(self, batch: ScheduledBatch, release: bool = True) -> worker_pb2.Step:
        self.steps_sent += 1
        batch.step_id = self.steps_sent
        released: list[int] = []
        if release:
            released, self._release_ids = self._release_ids, []
        return encode_step(batch, self.steps_sent, released)

    def _schedule(self) -> ScheduledBatch:
        """Decide the next step and queue its block-table writes."""
        batch = self.scheduler.schedule()
        self._record_decision(batch)
        self._release_ids.extend(r.seq_id for r in batch.ended)
        return batch

    def _record_decision(self, batch: ScheduledBatch) -> None:
        """Queue a decided step's block-table writes; note its first-token and send times."""
        batch.sent_at = time.perf_counter()
        batch.first_tokens = any(s.samples_token and not s.request.output for s in batch.seqs)
        store = self.store
        for victim in batch.preempted:
            store.dropped_table(victim)
            if victim.span is not None and victim.span.is_recording():
                victim.span.add_event("preempted")
        for req, block in batch.appended:
            store.appended(req, [block])
        for s in batch.seqs:
            if s.resend:
                store.table(s.request)
                if s.request.span is None:
                    first_scheduled(s.request, self.metrics, self.worker_id)
            else:
                store.appended(s.request, s.new_blocks)

    async def _complete(self, batch: ScheduledBatch, result: worker_pb2.StepResult | None) -> None:
        """Apply a step's tokens and hand the step to the writer (Redis first, then events)."""
        sched = self.scheduler
        await self.writer.wait()  # at most one write in flight (and a failed one surfaces here)
        if result is None:
            touched = sched.update(batch, ())
        else:
            if result.prompt_logprobs:
                add_prompt_logprobs(batch, result)
            embeddings = {e.seq_id: e.values for e in result.embeddings}
            touched = sched.update(batch, result.token_ids, result.logprobs, embeddings)
            self.step_clock.observe(batch, result.compute_ms)
        # Finished this step, or aborted since the last one (finished ones were recorded already).
        done = sched.finished_now + [r for r in batch.ended if r.aborted]
        self.writer.record(touched, done, load_figures(sched, self.steps_done + 1, self.draining))
        self._draining_published = self.draining
        record_step(self.metrics, sched, batch, len(result.token_ids) if result is not None else 0)
        if self.check_invariants:
            sched.check_invariants()
        self.steps_done += 1

    # ---- losing the worker -------------------------------------------------------------
    async def _state_lost(self) -> None:
        """Redis restarted empty while no write of this worker was in flight to notice (an idle
        worker): rewrite its state now, the way a failed write would, and not on top of nothing
        with the next step's deltas."""
        if self.store.lost:
            return  # a resync is under way
        log.warning("Redis holds no state for worker %s (restarted empty?)", self.worker_id)
        self.store.lost = True
        await self.settle()

    async def _lose_worker(self) -> None:
        self.connected = False
        self._draining_published = None  # forget_worker drops the load figures
        reqs = await self._take_all()
        await self.store.forget_worker()
        if self.metrics_family is not None:  # its gauges would go on showing what it held
            self.metrics_family.remove_worker(self.worker_id)
            self.metrics = None
        self.fleet.worker_lost(self, reqs)

    async def _take_all(self) -> list[Request]:
        """Take every request off this worker, their block tables dropped in Redis."""
        reqs = self.scheduler.take_all()
        for req in reqs:
            self.store.dropped_table(req)
        self.store.checkpoint(reqs)  # they move on: their tokens must not stay in this log
        await self.settle()
        return reqs

    async def _reconnect(self) -> None:
        while True:
            try:
                async with serving.open_channel(self.address, self.tls) as ch:
                    stub = worker_pb2_grpc.WorkerStub(ch)
                    info = await stub.Describe(worker_pb2.DescribeRequest(), timeout=5)
                self.info = info
                self.writer.instance_id = info.instance_id
                self.scheduler.kv.reset(info.num_blocks)
                await self.store.reset(info.instance_id, info.num_blocks)
                if self.metrics_family is not None:
                    self.metrics = self.metrics_family.for_worker(self.worker_id)
                log.info("worker %s is back (instance %s)", self.worker_id, info.instance_id[:8])
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1.0)
