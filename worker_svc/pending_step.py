"""A launched step: what the worker holds between a step's launch and its result.

A step runs in two halves (:meth:`ModelRunner.launch` queues the device work, :meth:`ModelRunner.
finish` collects it) so that step N+1 can be launched while step N is still on the device. The
halves meet only through this record: the step loop keeps it, the sampler fills it at launch and
reads it back when the tokens are on the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from pagewire.v1 import worker_pb2
from worker_svc.constraints import GrammarState
from worker_svc.seq_table import TokenHistory
from worker_svc.step_inputs import Download


@dataclass
class PendingStep:
    """A launched step: what :meth:`ModelRunner.finish` needs to build its result."""

    step: worker_pb2.Step
    result: worker_pb2.StepResult  # prompt outputs already in
    started: float
    seq_ids: list[int]  # sequences that sampled, in result order
    ran: bool = False  # the step had work (its result reports compute time)
    tokens: Download | None = None
    logprobs: tuple[Tensor, Tensor, list[int], np.ndarray] | None = None  # raw, chosen, k, rows
    # Penalized rows: their token histories (captured at launch) and the sampled positions.
    histories: list[tuple[int, TokenHistory | None, int]] | None = None
    # Constrained rows: (row in the result, matcher) to advance by the sampled token, once.
    grammars: list[tuple[int, GrammarState]] | None = None
    advanced: bool = False

    def ready(self) -> bool:
        """The sampled tokens are on the host (finish() will not block)."""
        return self.tokens is None or self.tokens.ready()

    def wait(self) -> None:
        if self.tokens is not None:
            self.tokens.wait()
