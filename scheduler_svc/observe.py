"""What the step loop tells others: routers its load figures, operators queue and step metrics
and the scheduler's trace spans."""

from __future__ import annotations

import time

from pagewire import tracing
from pagewire.metrics import EngineMetrics
from pagewire.v1 import common_pb2
from pagewire.worker_load import LoadFigures
from scheduler_svc.batch import ScheduledBatch
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler


def load_figures(sched: Scheduler, steps: int, draining: bool) -> LoadFigures:
    """The figures routers read to choose a worker (``pagewire.worker_load``)."""
    pool = sched.pool
    return LoadFigures(
        running=len(sched.running),
        waiting=len(sched.waiting),
        waiting_tokens=sum(len(r.prompt) + len(r.output) for r in sched.waiting),
        used_blocks=pool.num_used,
        total_blocks=pool.num_blocks,
        preemptions=sched.num_preemptions,
        prefix_queries=pool.queries,
        prefix_hits=pool.hits,
        steps=steps,
        draining=int(draining),
    )


def first_scheduled(req: Request, metrics: EngineMetrics | None, worker_id: str) -> None:
    """Queue time, and the scheduler's spans under the router's (when the request is traced)."""
    if metrics is not None:
        metrics.observe_queue_time(time.monotonic() - req.arrival)
    req.span = tracing.INVALID_SPAN
    if req.trace_context and tracing.enabled():
        attrs = {tracing.REQUEST_ID: req.request_id, tracing.WORKER_ID: worker_id}
        queued = tracing.start_child(tracing.SCHEDULER_QUEUE_SPAN, req.trace_context, attrs,
                                     start_time_ns=tracing.wall_ns(req.arrival))
        tracing.end_span(queued)
        req.span = tracing.start_child(tracing.SCHEDULER_SCHEDULE_SPAN, req.trace_context, attrs)
        # The worker's spans for this sequence are children of the scheduler's.
        req.trace_context = tracing.inject(req.span) or req.trace_context


def record_step(metrics: EngineMetrics | None, sched: Scheduler, batch: ScheduledBatch,
                generated: int) -> None:
    if metrics is None:
        return
    prompts_done = sum(len(s.request.prompt) for s in batch.seqs
                       if s.sample and len(s.request.output) == 1)
    metrics.observe_step(time.perf_counter() - batch.sent_at, prompts_done, generated)
    pool = sched.pool
    metrics.set_state(len(sched.running), len(sched.waiting), pool.num_used, pool.num_blocks)
    bs = sched.limits.block_size
    metrics.sync_totals(sched.num_preemptions, pool.queries * bs, pool.hits * bs)


def end_request_span(req: Request) -> None:
    if req.span is not None:
        tracing.end_span(req.span, {
            tracing.OUTPUT_TOKENS: len(req.output),
            tracing.CACHED_TOKENS: max(req.num_cached, 0),
            tracing.FINISH_REASON: common_pb2.FinishReason.Name(req.finish_reason),
        })
