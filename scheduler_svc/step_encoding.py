"""The scheduler's decision as the worker's ``Step`` message (its answer, a ``StepResult``, is
``step_results``').

A step carries deltas: new blocks and new tokens; full state (block table, sampling, prompt
length, trace context) only for sequences the worker has not seen (``resend``). Plain decodes
travel in packed columns. A decode whose input is the token sampled by the step still in flight
names none: the worker feeds its own last sample.
"""

from __future__ import annotations

from pagewire.v1 import worker_pb2
from scheduler_svc.batch import ScheduledBatch


def encode_step(batch: ScheduledBatch, step_id: int, release_seq_ids: list[int]) -> worker_pb2.Step:
    """Step ``step_id`` of this stream; ``release_seq_ids``: sequences the worker may forget."""
    step = worker_pb2.Step(step_id=step_id, release_seq_ids=release_seq_ids, joins=batch.joins)
    if batch.decodes:
        d = step.decodes
        d.seq_ids.extend([r.seq_id for r in batch.decodes])
        d.positions.extend(batch.decode_positions)
        d.new_block_ids.extend(batch.decode_blocks)
        d.output_indices.extend(batch.decode_indices)
    for s in batch.seqs:
        req = s.request
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
    return step
