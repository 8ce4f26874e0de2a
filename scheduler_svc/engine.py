"""The step loop for one worker: schedule, send the step, apply the result, record, emit.

One ``WorkerEngine`` per worker. Each step: the scheduler's decision becomes a ``Step`` message
(deltas: new blocks and new tokens; full state only for sequences the worker has not seen), the
worker answers with one token per sampling sequence, the scheduler appends them, the step's
Redis writes go out as one pipeline, and only then are token events handed to the Submit streams.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from pagewire import serving
from pagewire.v1 import common_pb2, scheduler_pb2, worker_pb2, worker_pb2_grpc
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.scheduler import ScheduledBatch, Scheduler, SchedulerLimits
from scheduler_svc.state_store import StateStore

log = logging.getLogger("scheduler.engine")


class WorkerLost(Exception):
    pass


class WorkerEngine:
    def __init__(
        self,
        address: str,
        info: worker_pb2.WorkerInfo,
        store: StateStore,
        max_num_seqs: int,
        max_num_batched_tokens: int,
    ) -> None:
        self.address = address
        self.info = info
        self.store = store
        limits = SchedulerLimits(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            block_size=info.block_size,
            max_model_len=info.max_model_len,
            eos_token_ids=tuple(info.eos_token_ids),
        )
        self.scheduler = Scheduler(limits, BlockPool(info.num_blocks))
        self.wakeup = asyncio.Event()
        self.step_id = 0
        self.steps = 0
        self.check_invariants = False

    @property
    def worker_id(self) -> str:
        return self.info.worker_id

    def submit(self, req: Request) -> None:
        self.scheduler.add(req)
        self.store.admitted(req)
        self.wakeup.set()

    def abort(self, req: Request) -> None:
        self.scheduler.abort(req)
        self.wakeup.set()

    # ---- the loop ------------------------------------------------------------------------
    async def run(self) -> None:
        """Drive the worker until cancelled; reconnect when its stream breaks."""
        while True:
            try:
                await self._run_stream()
            except (grpc.aio.AioRpcError, WorkerLost) as e:
                log.warning("worker %s stream broke: %s", self.worker_id, e)
                self._fail_all("worker connection lost")
                await asyncio.sleep(0.5)

    async def _run_stream(self) -> None:
        async with serving.insecure_channel(self.address) as channel:
            call = worker_pb2_grpc.WorkerStub(channel).Execute()
            for req in self.scheduler.running:
                req.on_worker = False  # a new stream starts with an empty worker cache
            while True:
                if not self.scheduler.has_work:
                    await self.store.flush()
                    self.wakeup.clear()
                    await self.wakeup.wait()
                    continue
                await self.step(call)

    async def step(self, call: grpc.aio.StreamStreamCall) -> None:
        sched = self.scheduler
        batch = sched.schedule()
        for req, blocks in sched.drain_freed():
            self.store.freed(req, blocks)
        for s in batch.seqs:
            self.store.allocated(s.request, s.new_blocks)
        sampled = await self._execute(call, batch) if batch.seqs else {}
        touched = sched.update(batch, sampled)
        for req, blocks in sched.drain_freed():
            self.store.freed(req, blocks)
        for req in touched:
            self.store.generated(req, req.output[req.sent :])
        # Finished this step, or aborted since the last one (finished ones were recorded already).
        done = [r for r in touched if r.finished] + [r for r in batch.released if r.aborted]
        for req in done:
            self.store.finished(req)
        self.store.publish_load(
            running=len(sched.running),
            waiting=len(sched.waiting),
            used_blocks=sched.pool.num_used,
            total_blocks=sched.pool.num_blocks,
            preemptions=sched.num_preemptions,
        )
        await self.store.flush()  # tokens leave only once Redis has them
        for req in touched:
            self._emit(req)
        for req in batch.released:
            if req.aborted:
                req.events.put_nowait(None)
        if self.check_invariants:
            sched.check_invariants()
        self.steps += 1

    async def _execute(self, call: grpc.aio.StreamStreamCall, batch: ScheduledBatch) -> dict[int, int]:
        self.step_id += 1
        step = worker_pb2.Step(
            step_id=self.step_id,
            release_seq_ids=[r.seq_id for r in batch.released],
        )
        for s in batch.seqs:
            req = s.request
            seq = step.seqs.add(
                seq_id=req.seq_id,
                start_pos=s.start,
                token_ids=req.tokens(s.start, s.start + s.num_tokens),
                sample=s.sample,
                new=s.resend,
                output_index=len(req.output),
            )
            if s.resend:
                seq.block_ids.extend(req.block_table)
                seq.sampling.CopyFrom(req.params.to_proto())
            else:
                seq.block_ids.extend(s.new_blocks)
        await call.write(step)
        result = await call.read()
        if result is grpc.aio.EOF:
            raise WorkerLost("stream closed")
        if result.unknown_seq_ids:
            raise WorkerLost(f"worker lost state of {len(result.unknown_seq_ids)} sequences")
        return dict(zip(result.seq_ids, result.token_ids, strict=True))

    def _emit(self, req: Request) -> None:
        new = req.output[req.sent :]
        event = scheduler_pb2.TokenEvent(
            request_id=req.request_id,
            token_ids=new,
            index=req.sent,
            worker_id=self.worker_id,
            finish_reason=req.finish_reason,
        )
        if req.sent == 0 or req.finished:
            event.prompt_tokens = len(req.prompt)
        req.sent = len(req.output)
        req.events.put_nowait(event)
        if req.finished:
            req.events.put_nowait(None)

    def _fail_all(self, reason: str) -> None:
        for req in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.abort(req)
            req.events.put_nowait(
                scheduler_pb2.TokenEvent(
                    request_id=req.request_id,
                    index=req.sent,
                    finish_reason=common_pb2.FINISH_REASON_ABORT,
                )
            )
            req.events.put_nowait(None)
        log.error("failed all requests of %s: %s", self.worker_id, reason)
