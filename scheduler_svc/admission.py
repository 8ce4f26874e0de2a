"""Admission: a router's SubmitRequest becomes a Request for a chosen worker, or is refused.

A plain function of the request and the fleet: nothing is placed here (``Fleet.place`` does
that), so every refusal is decided before anything changes. Refusals carry the gRPC status the
router passes on: UNAVAILABLE is the one clients retry (nothing ran), INVALID_ARGUMENT names the
parameter that cannot be honoured, RESOURCE_EXHAUSTED a full queue.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import grpc

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2, scheduler_pb2
from scheduler_svc import images
from scheduler_svc.block_pool import blocks_for
from scheduler_svc.events import RouterConn
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request
from scheduler_svc.step_loop import WorkerEngine


class Refusal(NamedTuple):
    code: grpc.StatusCode
    text: str


class Admitted(NamedTuple):
    request: Request
    engine: WorkerEngine


def admit(sub: scheduler_pb2.SubmitRequest, fleet: Fleet, conn: RouterConn, *, group: str,
          max_queue: int, shutting_down: bool) -> Admitted | Refusal:
    """The request and the worker that takes it, or why not."""
    rid = sub.request_id
    if not rid or not sub.prompt_token_ids:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, "request_id and prompt_token_ids are required")
    if fleet.request(rid) is not None:
        return Refusal(grpc.StatusCode.ALREADY_EXISTS, f"request_id {rid!r} is in flight")
    if shutting_down:
        return Refusal(grpc.StatusCode.UNAVAILABLE, "scheduler is shutting down")
    engine = fleet.pick(sub.worker_id)
    if engine is None and fleet.engines:
        # Queueing for a worker that is leaving would hold the client for an unknown time
        # (it may never come back); UNAVAILABLE is the status clients retry, and nothing ran.
        return Refusal(grpc.StatusCode.UNAVAILABLE,
                       f"every worker of group {group!r} is draining (shutting down or "
                       "starting): no new requests until one serves again; retry")
    if engine is None:
        return Refusal(grpc.StatusCode.UNAVAILABLE, "no worker available")
    if len(engine.scheduler.waiting) >= max_queue:
        return Refusal(grpc.StatusCode.RESOURCE_EXHAUSTED,
                       f"queue full: {max_queue} requests waiting (--max-queue)")
    params = SamplingParams.from_proto(sub.sampling)
    refusal = _refuse_length(len(sub.prompt_token_ids) + params.max_tokens, engine)
    if refusal is not None:
        return refusal
    if sub.pooling != common_pb2.POOLING_NONE:
        params = dataclasses.replace(params, max_tokens=1)  # runs its prompt, samples nothing
    if bad := images.check(sub.images, len(sub.prompt_token_ids)):
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT, bad)
    req = Request(rid, list(sub.prompt_token_ids), params, priority=sub.priority, conn=conn,
                  pooling=sub.pooling, trace_context=dict(sub.trace_context),
                  images=list(sub.images), cache_salt=sub.cache_salt)
    return Admitted(req, engine)


def _refuse_length(total: int, engine: WorkerEngine) -> Refusal | None:
    """Prompt + max_tokens must fit the worker's context and, alone, its KV pool: a request
    that could never run is refused now (preemption cannot help it)."""
    info = engine.info
    if total > info.max_model_len:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"max_tokens: prompt + max_tokens must be <= {info.max_model_len}")
    need = blocks_for(total, info.block_size)
    if need > info.num_blocks:
        return Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                       f"max_tokens: prompt + max_tokens ({total} tokens) needs {need} KV blocks; "
                       f"worker {engine.worker_id} has {info.num_blocks}")
    return None
