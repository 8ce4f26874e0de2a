"""One step as the scheduler decided it: plain data, the scheduler's output.

``Scheduler.schedule()`` returns a :class:`ScheduledBatch`; ``step_encoding`` writes it as the
worker's ``Step`` message, the state store records its block-table changes, and
``Scheduler.update()`` applies the worker's answer to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pagewire.v1 import common_pb2
from scheduler_svc.request import Request


@dataclass
class ScheduledSeq:
    request: Request
    start: int  # first position computed this step
    num_tokens: int
    new_blocks: list[int]
    sample: bool
    resend: bool  # worker must receive full state (first time, or after preemption)
    epoch: int = 0  # the request's epoch when scheduled

    @property
    def samples_token(self) -> bool:
        """A token comes back for it (an embedding's last chunk returns its pooling instead)."""
        return self.sample and self.request.pooling == common_pb2.POOLING_NONE


@dataclass
class ScheduledBatch:
    """One step. Plain decodes (one token, the worker's own last sample, of a sequence the worker
    holds) are packed in parallel lists, the bulk of a steady-state step with no object per
    sequence; everything else (prefill chunks, first steps, resends) is a ScheduledSeq."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    decodes: list[Request] = field(default_factory=list)
    decode_positions: list[int] = field(default_factory=list)
    decode_blocks: list[int] = field(default_factory=list)  # appended first; -1: none
    decode_indices: list[int] = field(default_factory=list)  # output index sampled
    decode_epochs: list[int] = field(default_factory=list)
    appended: list[tuple[Request, int]] = field(default_factory=list)  # decodes' new blocks
    preempted: list[Request] = field(default_factory=list)
    # Finished or aborted since the last step: the worker may release their sequences.
    ended: list[Request] = field(default_factory=list)
    first_tokens: bool = False  # it gives some request its first output token
    sent_at: float = 0.0  # perf_counter when the step went to the worker (step time metric)
    step_id: int = 0  # set when encoded
    joins: int = 0  # the step this one may run inside (worker_svc.step_join); 0: none

    def decode_columns(self) -> tuple[Callable[[Any], None], ...]:
        """The appends of the decode columns, in the order requests, positions, blocks, output
        indices, epochs: one call per column per decode, no attribute lookups."""
        return (self.decodes.append, self.decode_positions.append, self.decode_blocks.append,
                self.decode_indices.append, self.decode_epochs.append)

    @property
    def num_seqs(self) -> int:
        return len(self.seqs) + len(self.decodes)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs) + len(self.decodes)

    def requests(self) -> list[Request]:
        return [*self.decodes, *(s.request for s in self.seqs)]

    def sampling_order(self) -> list[Request]:
        """The requests that get a token, in the order the worker returns them."""
        return [*self.decodes, *(s.request for s in self.seqs if s.samples_token)]
