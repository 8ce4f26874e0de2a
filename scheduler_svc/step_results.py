"""A step's results: read off the worker's stream, and applied to the scheduler's requests --
tokens appended, logprobs and pooled embeddings attached, full blocks named for the prefix cache,
and requests that stop finished.

Results are in ``ScheduledBatch.sampling_order()``: the packed decodes first (the hot path, one
pass with no call per request unless it fills a block or may stop), then the other sequences
that sample. A result for a request that lost its blocks since it was scheduled (``epoch``)
names no block of its table now, and a token for a finished request is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import grpc

from pagewire.v1 import common_pb2, worker_pb2
from scheduler_svc.batch import ScheduledBatch
from scheduler_svc.request import Request, Status

if TYPE_CHECKING:
    from scheduler_svc.scheduler import Scheduler


class WorkerLost(Exception):
    pass


async def read_result(call: grpc.aio.StreamStreamCall) -> worker_pb2.StepResult:
    """The next step's result; WorkerLost when the stream ended or the worker lost sequences."""
    result = await call.read()
    if result is grpc.aio.EOF:
        raise WorkerLost("stream closed")
    if result.unknown_seq_ids:
        raise WorkerLost(f"worker lost state of {len(result.unknown_seq_ids)} sequences")
    return result


def add_prompt_logprobs(batch: ScheduledBatch, result: worker_pb2.StepResult) -> None:
    """The result's prompt logprobs, onto the requests they belong to."""
    by_seq = {s.request.seq_id: s.request for s in batch.seqs}
    for chunk in result.prompt_logprobs:
        req = by_seq.get(chunk.seq_id)
        # Entries arrive in prompt order; a recompute after preemption repeats them.
        if req is not None and chunk.start_index == len(req.prompt_logprobs) + 1:
            req.prompt_logprobs.extend(chunk.positions)


def apply_decodes(sched: Scheduler, batch: ScheduledBatch, tokens: Sequence[int], lps: Iterator,
                  touched: list[Request]) -> None:
    """The packed decodes' tokens: the hot path, one pass with no call per request unless
    it fills a block or may stop."""
    touch = touched.append
    caching, bs = sched.limits.prefix_caching, sched.limits.block_size
    max_len, eos, finished = sched.limits.max_model_len, sched.eos, Status.FINISHED
    for req, token, pos, epoch, lp in zip(
        batch.decodes, tokens, batch.decode_positions, batch.decode_epochs, lps, strict=False
    ):
        pending = req.pending
        if pending:
            req.pending = pending - 1
        if req.status is finished:
            continue  # finished by an earlier step: a token sampled past the end is dropped
        out = req.output
        out.append(token)
        touch(req)
        p = req.params
        if lp is not None and p.logprobs is not None:
            req.logprobs.append(lp)
        if caching and epoch == req.epoch and (pos + 1) // bs > len(req.block_hashes):
            sched.kv.register_full_blocks(req, pos + 1)
        n = len(out)
        if (token in eos or p.stop_token_ids or n >= p.max_tokens
                or len(req.prompt) + n >= max_len):
            reason = req.stop_reason(token, eos, max_len)
            if reason:
                sched.running.remove(req)
                sched.finish(req, reason)


def apply_seqs(sched: Scheduler, batch: ScheduledBatch, rest: Iterator, lps: Iterator,
               embeddings: dict[int, Sequence[float]], touched: list[Request]) -> None:
    """Prefill chunks, first steps and resends: their tokens, or an embedding's pooling."""
    caching = sched.limits.prefix_caching
    for s in batch.seqs:
        req = s.request
        token = lp = None
        if s.samples_token:
            token, lp = next(rest), next(lps)
        if s.sample:
            req.pending = max(req.pending - 1, 0)
        if req.finished:
            continue
        if token is not None:
            req.output.append(token)
            touched.append(req)
            if lp is not None and req.params.logprobs is not None:
                req.logprobs.append(lp)
        if caching and s.epoch == req.epoch:
            sched.kv.register_full_blocks(req, s.start + s.num_tokens)
        reason = req.stop_reason(token, sched.eos, sched.limits.max_model_len) if token is not None else 0
        if s.sample and req.pooling != common_pb2.POOLING_NONE and s.epoch == req.epoch:
            req.embedding = list(embeddings.get(req.seq_id, ()))
            touched.append(req)
            reason = common_pb2.FINISH_REASON_STOP
        if reason:
            (sched.running if req in sched.running else sched.waiting).remove(req)
            sched.finish(req, reason)
