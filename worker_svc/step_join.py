"""Steps that join the step before them: one forward pass, a result for each.

On a CPU worker the scheduler sends step N+1 a few ms before step N ends, so that the worker
never waits for it. A request arriving in those ms used to wait for all of N+1 before its own
step: one decode step more of TTFT for ~40 % of arrivals at light load. Instead the scheduler
now sends such a request at once as a step of new sequences only, marked ``joins = N+1``; if
N+1 has not begun when the worker takes it up, the two run as one (N+1's decodes and the new
prefills in one pass, as if the request had been there when N+1 was decided), and each gets its
own result. The sequences of a joining step are new, so nothing in it depends on N+1's tokens.
"""

from __future__ import annotations

from collections import deque

from pagewire.v1 import worker_pb2


def take_joiners(step: worker_pb2.Step, inbox: deque[worker_pb2.Step]) -> list[worker_pb2.Step]:
    """The steps waiting right behind ``step`` that join it, taken out of ``inbox``."""
    joiners = []
    while inbox and inbox[0].joins == step.step_id:
        joiners.append(inbox.popleft())
    return joiners


def merged(step: worker_pb2.Step, joiners: list[worker_pb2.Step]) -> worker_pb2.Step:
    """``step`` with its joiners' sequences (and releases) added: the pass the worker runs."""
    out = worker_pb2.Step()
    out.CopyFrom(step)
    for j in joiners:
        out.seqs.extend(j.seqs)
        out.release_seq_ids.extend(j.release_seq_ids)
    return out


def split(result: worker_pb2.StepResult,
          joiners: list[worker_pb2.Step]) -> list[worker_pb2.StepResult]:
    """The merged pass's result as the joined step's and then each joiner's, by sequence.

    Compute time is left out (0): the pass's time belongs to no one step's composition, and the
    scheduler's step clock learns only from steps that ran alone."""
    if not joiners:
        return [result]
    parts = [worker_pb2.StepResult(step_id=result.step_id)]
    part_of: dict[int, worker_pb2.StepResult] = {}
    for j in joiners:
        parts.append(worker_pb2.StepResult(step_id=j.step_id))
        part_of.update((s.seq_id, parts[-1]) for s in j.seqs)
    head = parts[0]
    logprobs = result.logprobs
    for i, seq_id in enumerate(result.seq_ids):
        part = part_of.get(seq_id, head)
        part.seq_ids.append(seq_id)
        part.token_ids.append(result.token_ids[i])
        if logprobs:
            part.logprobs.append(logprobs[i])
    for p in parts:  # parallel to seq_ids only where some sequence asked for logprobs
        if p.logprobs and not any(e.ByteSize() for e in p.logprobs):
            del p.logprobs[:]
    for chunk in result.prompt_logprobs:
        part_of.get(chunk.seq_id, head).prompt_logprobs.append(chunk)
    for e in result.embeddings:
        part_of.get(e.seq_id, head).embeddings.append(e)
    if result.unknown_seq_ids:  # the pass did not run: none of it did
        head.unknown_seq_ids.extend(result.unknown_seq_ids)
        for p, j in zip(parts[1:], joiners, strict=True):
            p.unknown_seq_ids.extend(s.seq_id for s in j.seqs)
    return parts
