"""The step loop for one worker: schedule, send the step, apply the result, record, emit.

One ``WorkerEngine`` per worker. Each step: the scheduler's decision becomes a ``Step`` message
(deltas: new blocks and new tokens; full state only for sequences the worker has not seen), the
worker answers with one token per sampling sequence, the scheduler appends them, the step's
Redis writes go out as one pipeline, and only then are token events handed to the routers'
Connect streams.

When the worker's stream breaks or its heartbeat lapses, every request it held is handed back
(``on_lost``) to be recomputed elsewhere, and the engine keeps trying to reconnect.

A worker that is draining (``draining``, set from its health status) runs what it holds to the end
but takes nothing new: between steps its waiting requests that never started are offered to the
other workers (``on_draining``), and its load figures in Redis say ``draining=1`` so routers stop
choosing it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable

import grpc

from pagewire import serving, tracing
from pagewire.metrics import EngineMetrics, SchedulerMetrics
from pagewire.redis_client import STORE_DOWN, Client
from pagewire.tls import TLSFiles
from pagewire.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.heartbeat import watch_heartbeat
from scheduler_svc.request import Request, Status, send_next_tokens
from scheduler_svc.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from scheduler_svc.state_store import (
    CHECKPOINT_LOG_BYTES,
    StateStore,
    StoredPool,
    Write,
)

log = logging.getLogger("scheduler.engine")


PIPELINE_DEPTH = 2  # steps in flight to the worker at once


class WorkerLost(Exception):
    pass


class WorkerEngine:
    def __init__(
        self,
        address: str,
        info: worker_pb2.WorkerInfo,
        store: StateStore,
        limits: SchedulerLimits,
        on_lost: Callable[[WorkerEngine, list[Request]], None],
        on_done: Callable[[Request], None],
        tls: TLSFiles | None = None,
        metrics: SchedulerMetrics | None = None,
        on_draining: Callable[[WorkerEngine], Awaitable[None] | None] | None = None,
    ) -> None:
        self.address = address
        self.info = info
        self.store = store
        self.scheduler = Scheduler(limits, BlockPool(info.num_blocks))
        self.on_lost = on_lost
        self.on_done = on_done
        self.on_draining = on_draining
        self.tls = tls
        self.metrics_family = metrics  # this worker's series are dropped while it is lost
        self.metrics: EngineMetrics | None = (
            metrics.for_worker(info.worker_id) if metrics is not None else None)
        self.wakeup = asyncio.Event()
        self.step_id = 0
        self.steps = 0
        self.connected = False
        # The worker's health is not SERVING (it is shutting down, or still loading): it gets no
        # new requests. Set by the scheduler service from the worker's health watch.
        self.draining = False
        self._draining_published: bool | None = None  # what Redis's load figures say (None: unknown)
        self.check_invariants = False
        self._release_ids: list[int] = []  # sequences the worker may forget, sent with the next step
        self._emitting: asyncio.Future[None] | None = None  # the latest step's write + events
        self._resync_lock = asyncio.Lock()

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    # ---- start-up ----------------------------------------------------------------------
    async def recover(self, stored: StoredPool | None) -> list[Request]:
        """Adopt what Redis recorded for this worker; return the requests it held.

        If the worker is the same process (same instance id) its KV memory is intact: block
        tables, the prefix cache and computed tokens are kept. Otherwise the bookkeeping starts
        afresh and the requests recompute from prompt + output.
        """
        reqs = []
        for s in stored.requests if stored else []:
            req = Request(s.request_id, s.prompt, s.params, priority=s.priority, output=s.output,
                          block_table=s.block_table, num_cached=s.num_cached, pooling=s.pooling,
                          images=s.images, cache_salt=s.cache_salt)
            req.sent = req.queued = req.flushed = len(req.output)
            req.checkpointed = s.checkpointed
            reqs.append(req)
        if stored is not None:
            # Logged tokens into the requests' lists, under the handles of this incarnation.
            self.store.checkpoint(reqs, handles=True)
            await self.store.flush()
        if stored is not None and (stored.instance_id, stored.num_blocks) == (
            self.info.instance_id, self.info.num_blocks,
        ):
            self.scheduler.pool = BlockPool.restore(
                self.info.num_blocks, [r.block_table for r in reqs], stored.index, stored.cached_lru
            )
            self.scheduler.restore(reqs)
            self.scheduler.check_invariants()
        else:
            await self.store.reset(self.info.instance_id, self.info.num_blocks)
            for req in reqs:
                req.block_table = []
                self.store.dropped_table(req)
                self.scheduler.add(req)
        return reqs

    # ---- requests ----------------------------------------------------------------------
    def submit(self, req: Request) -> None:
        self.scheduler.add(req)
        self.store.admitted(req)
        self.wakeup.set()

    def abort(self, req: Request) -> None:
        self.scheduler.abort(req)
        self.wakeup.set()

    def load(self) -> int:
        return self.scheduler.load_tokens() if self.connected else 1 << 60

    async def release(self, reqs: list[Request]) -> None:
        """``reqs`` left this engine's scheduler for another worker: let this worker forget them
        (with the next step), and wait until this worker's Redis writes so far have landed, so
        that their admission here can never overwrite their admission there."""
        self._release_ids.extend(r.seq_id for r in reqs)
        self.wakeup.set()
        await self.store.flush()

    # ---- the loop ------------------------------------------------------------------------
    async def run(self, redis_client: Client, heartbeat_s: float) -> None:
        """Drive the worker until cancelled; on loss hand its requests back and reconnect."""
        while True:
            stream = asyncio.create_task(self._run_stream())
            watchdog = asyncio.create_task(watch_heartbeat(
                redis_client, self.store.keys, self.worker_id, heartbeat_s, self._state_lost))
            done, _ = await asyncio.wait({stream, watchdog}, return_when=asyncio.FIRST_COMPLETED)
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
        self.on_lost(self, reqs)

    async def evacuate(self) -> None:
        """Recompute every request this engine holds on the other workers, as if the worker were
        lost, but keep driving it. For a worker found draining when this scheduler starts: its
        recovered requests may not finish there (the first stream a scheduler opens resets the
        worker's sequences, and a draining worker holding none exits), so they move at once."""
        reqs = await self._take_all()
        await self.store.reset(self.info.instance_id, self.info.num_blocks)
        self.on_lost(self, reqs)

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
                self.scheduler.pool = BlockPool(info.num_blocks)
                await self.store.reset(info.instance_id, info.num_blocks)
                if self.metrics_family is not None:
                    self.metrics = self.metrics_family.for_worker(self.worker_id)
                log.info("worker %s is back (instance %s)", self.worker_id, info.instance_id[:8])
                return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(1.0)

    async def _run_stream(self) -> None:
        """The step pipeline: step N+1 is scheduled and sent while the worker computes step N.

        The worker runs steps in order, so it starts N+1 the moment N is done; the scheduler's own
        work — applying N's tokens, the Redis write, emitting events, scheduling N+2 — overlaps
        the worker's compute of N+1 instead of sitting between the two steps.
        """
        async with serving.open_channel(self.address, self.tls) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Execute()
            for req in self.scheduler.running:
                req.on_worker = False  # a new stream starts with an empty worker cache
            self.connected = True
            self.wakeup.set()
            inflight: deque[ScheduledBatch] = deque()
            while True:
                hand_over = self._hand_over()
                if hand_over is not None:
                    # Before anything else is scheduled: finish the steps in flight, so that the
                    # hand-over happens at a step boundary, before a waiting request starts here.
                    while inflight:
                        await self._complete(inflight.popleft(), await self._receive(call))
                    await hand_over
                scheduled = False
                if len(inflight) < PIPELINE_DEPTH and self.scheduler.has_work:
                    batch = self._schedule()
                    if batch.num_seqs:
                        await self._send(call, batch)
                        inflight.append(batch)
                        scheduled = True
                    elif batch.released:
                        await self._complete(batch, None)
                if inflight and (len(inflight) == PIPELINE_DEPTH or not scheduled):
                    await self._complete(inflight.popleft(), await self._receive(call))
                elif not scheduled and not inflight:
                    if self._release_ids:  # let the worker forget finished sequences now
                        await self._send(call, ScheduledBatch())
                        await self._receive(call)
                    if self._draining_published is not self.draining:  # idle: no step publishes it
                        self.store.publish_load(draining=int(self.draining))
                        self._draining_published = self.draining
                    await self.settle()
                    self.wakeup.clear()
                    if not self.scheduler.has_work:
                        await self.wakeup.wait()
                    else:  # work that cannot run yet (blocks, tokens in flight): poll gently
                        await asyncio.wait([asyncio.ensure_future(self.wakeup.wait())], timeout=0.01)

    def _hand_over(self) -> Awaitable[None] | None:
        """Draining, with waiting requests that never started: ``on_draining`` gives the
        hand-over to run before the next schedule() could start them here (None: no other
        worker takes them, so they run here)."""
        if (self.draining and self.on_draining is not None and self.scheduler.waiting
                and self.scheduler.has_unstarted()):
            return self.on_draining(self)
        return None

    def _schedule(self) -> ScheduledBatch:
        """Decide the next step and queue its block-table writes."""
        batch = self.scheduler.schedule()
        batch.sent_at = time.perf_counter()
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
                    self._first_scheduled(s.request)
            else:
                store.appended(s.request, s.new_blocks)
        self._release_ids.extend(r.seq_id for r in batch.released)
        return batch

    def _first_scheduled(self, req: Request) -> None:
        """Queue time, and the scheduler's spans under the router's (when the request is traced)."""
        if self.metrics is not None:
            self.metrics.observe_queue_time(time.monotonic() - req.arrival)
        req.span = tracing.INVALID_SPAN
        if req.trace_context and tracing.enabled():
            attrs = {tracing.REQUEST_ID: req.request_id, tracing.WORKER_ID: self.worker_id}
            queued = tracing.start_child(tracing.SCHEDULER_QUEUE_SPAN, req.trace_context, attrs,
                                         start_time_ns=tracing.wall_ns(req.arrival))
            tracing.end_span(queued)
            req.span = tracing.start_child(tracing.SCHEDULER_SCHEDULE_SPAN, req.trace_context, attrs)
            # The worker's spans for this sequence are children of the scheduler's.
            req.trace_context = tracing.inject(req.span) or req.trace_context

    def _record_step(self, batch: ScheduledBatch, generated: int) -> None:
        sched, m = self.scheduler, self.metrics
        if m is None:
            return
        prompts_done = sum(len(s.request.prompt) for s in batch.seqs
                           if s.sample and len(s.request.output) == 1)
        m.observe_step(time.perf_counter() - batch.sent_at, prompts_done, generated)
        m.set_state(len(sched.running), len(sched.waiting), sched.pool.num_used, sched.pool.num_blocks)
        bs = self.info.block_size
        m.sync_totals(sched.num_preemptions, sched.pool.queries * bs, sched.pool.hits * bs)

    async def _complete(self, batch: ScheduledBatch, result: worker_pb2.StepResult | None) -> None:
        """Apply a step's tokens and start its Redis write; its events leave once Redis has it.

        The write is not awaited here: the loop schedules and sends the next step while Redis
        applies this one (writes land in order, and so do the emissions that follow them). The
        previous step's write is awaited first, so at most one is in flight.
        """
        sched, store = self.scheduler, self.store
        if self._emitting is not None:
            await self._emitting  # at most one write in flight (and a failed one surfaces here)
        if result is None:
            touched = sched.update(batch, ())
        else:
            if result.prompt_logprobs:
                self._add_prompt_logprobs(batch, result)
            embeddings = {e.seq_id: e.values for e in result.embeddings}
            touched = sched.update(batch, result.token_ids, result.logprobs, embeddings)
        sched.drain_freed()
        store.generated(touched)
        # Finished this step, or aborted since the last one (finished ones were recorded already).
        done = sched.finished_now + [r for r in batch.released if r.aborted]
        for req in done:
            store.finished(req)
        if store.log_bytes > CHECKPOINT_LOG_BYTES:
            store.checkpoint([*sched.running, *sched.waiting])
        store.blocks(sched.pool)
        store.publish_load(
            running=len(sched.running),
            waiting=len(sched.waiting),
            waiting_tokens=sum(len(r.prompt) + len(r.output) for r in sched.waiting),
            used_blocks=sched.pool.num_used,
            total_blocks=sched.pool.num_blocks,
            preemptions=sched.num_preemptions,
            prefix_queries=sched.pool.queries,
            prefix_hits=sched.pool.hits,
            steps=self.steps + 1,
            draining=int(self.draining),
        )
        self._draining_published = self.draining
        # What this step tells the routers is fixed now: later steps append to the same requests.
        plain: list[Request] = []
        events: list[tuple[Request, scheduler_pb2.TokenEvent]] = []
        worker_id, add_plain, finished = self.worker_id, plain.append, Status.FINISHED
        for req in touched:
            sent = req.sent
            if sent and len(req.output) - sent == 1 and req.status is not finished and not req.logprobs:
                add_plain(req)  # the common case: one token, nothing else to say
                req.sent = sent + 1
            else:
                events.append((req, self._event(req, worker_id)))
        self._emitting = asyncio.ensure_future(
            self._emit_after(store.generation, store.take(), plain, events, done)
        )
        self._record_step(batch, len(result.token_ids) if result is not None else 0)
        if self.check_invariants:
            sched.check_invariants()
        self.steps += 1

    async def _emit_after(
        self,
        generation: int,
        write: Write,
        plain: list[Request],
        events: list[tuple[Request, scheduler_pb2.TokenEvent]],
        done: list[Request],
    ) -> None:
        """Tokens leave only once Redis has them, and in step order (the step before finished
        emitting before this one was taken: see _complete)."""
        try:
            await self.store.send(write)
        except STORE_DOWN as e:
            await self._resync(generation, e)
        send_next_tokens(plain)
        for req, event in events:
            req.flushed = event.index + len(event.token_ids)
            if req.conn is not None:
                req.conn.send(event)
        for req in done:
            if req.span is not None:
                tracing.end_span(req.span, {
                    tracing.OUTPUT_TOKENS: len(req.output),
                    tracing.CACHED_TOKENS: max(req.num_cached, 0),
                    tracing.FINISH_REASON: common_pb2.FinishReason.Name(req.finish_reason),
                })
            self.on_done(req)

    async def settle(self) -> None:
        """Wait until every step's write has landed and its events are out."""
        if self._emitting is not None:
            await self._emitting
        generation = self.store.generation
        try:
            await self.store.flush()
        except STORE_DOWN as e:
            await self._resync(generation, e)

    async def _resync(self, generation: int, error: BaseException) -> None:
        """Redis lost a write (it restarted, or the connection broke): hold this worker's events
        until Redis is back, then rewrite its whole state from memory. Tokens are never sent
        before Redis has them, so a router never sees a token a recovery could not replay."""
        async with self._resync_lock:
            if self.store.generation != generation:
                return  # a resync since this write was queued already covered it
            log.warning("Redis write for worker %s failed (%s): holding events until it is back",
                        self.worker_id, error)
            while True:
                try:
                    sched = self.scheduler
                    await self.store.resync(self.info.instance_id, sched.pool,
                                            [*sched.running, *sched.waiting])
                    log.warning("Redis is back: worker %s state rewritten", self.worker_id)
                    return
                except STORE_DOWN:
                    await asyncio.sleep(0.2)

    @staticmethod
    def _add_prompt_logprobs(batch: ScheduledBatch, result: worker_pb2.StepResult) -> None:
        by_seq = {s.request.seq_id: s.request for s in batch.seqs}
        for chunk in result.prompt_logprobs:
            req = by_seq.get(chunk.seq_id)
            # Entries arrive in prompt order; a recompute after preemption repeats them.
            if req is not None and chunk.start_index == len(req.prompt_logprobs) + 1:
                req.prompt_logprobs.extend(chunk.positions)

    async def _send(self, call: grpc.aio.StreamStreamCall, batch: ScheduledBatch) -> None:
        self.step_id += 1
        step = worker_pb2.Step(step_id=self.step_id, release_seq_ids=self._release_ids)
        self._release_ids = []
        if batch.decodes:
            d = step.decodes
            d.seq_ids.extend([r.seq_id for r in batch.decodes])
            d.positions.extend(batch.decode_positions)
            d.new_block_ids.extend(batch.decode_blocks)
            d.output_indices.extend(batch.decode_indices)
        for s in batch.seqs:
            req = s.request
            # A decode whose input is the token sampled by the step still in flight names none:
            # the worker feeds its own last sample.
            known = s.start < req.num_known
            seq = step.seqs.add(
                seq_id=req.seq_id,
                start_pos=s.start,
                token_ids=req.tokens(s.start, s.start + s.num_tokens) if known else (),
                sample=s.sample,
                new=s.resend,
                output_index=len(req.output) + req.pending - 1 if s.sample else len(req.output),
            )
            if s.resend:
                seq.block_ids.extend(req.block_table)
                seq.sampling.CopyFrom(req.params.to_proto())
                seq.prompt_len = len(req.prompt)
                seq.pooling = req.pooling  # type: ignore[assignment]
                seq.trace_context.update(req.trace_context)
                if req.params.structured is not None:  # the worker replays them into a matcher
                    seq.output_ids.extend(req.output)
                seq.images.extend(req.images)
            else:
                seq.block_ids.extend(s.new_blocks)
        await call.write(step)

    async def _receive(self, call: grpc.aio.StreamStreamCall) -> worker_pb2.StepResult:
        result = await call.read()
        if result is grpc.aio.EOF:
            raise WorkerLost("stream closed")
        if result.unknown_seq_ids:
            raise WorkerLost(f"worker lost state of {len(result.unknown_seq_ids)} sequences")
        return result

    @staticmethod
    def _event(req: Request, worker_id: str) -> scheduler_pb2.TokenEvent:
        """The full event for ``req``'s tokens since the last event (first/last/extras)."""
        event = scheduler_pb2.TokenEvent(
            request_id=req.request_id,
            token_ids=req.output[req.sent :],
            index=req.sent,
            worker_id=worker_id,
            finish_reason=req.finish_reason,
        )
        if req.sent == 0 or req.finished:
            event.prompt_tokens = len(req.prompt)
            event.cached_tokens = max(req.num_cached, 0)
        if req.sent == 0 and req.prompt_logprobs:
            event.prompt_logprobs.extend(req.prompt_logprobs)
            req.prompt_logprobs = []
        if req.logprobs:
            event.logprobs.extend(req.logprobs)
            req.logprobs = []
        if req.embedding is not None:
            event.embedding.extend(req.embedding)
        req.sent = len(req.output)
        return event
