"""A request as the scheduler sees it: tokens in, tokens out, and the KV blocks it holds.

Who writes what: the scheduler and its KV-cache manager the sequence state (status, num_computed,
block_table, block_hashes, on_worker, pending, epoch, output and the worker's other results);
the state store ``num_logged``, ``num_checkpointed`` and ``tokens_key``; event delivery
(``events``) ``conn``, ``num_evented`` and ``num_delivered``. The four output counters always
satisfy ``num_delivered <= num_evented <= len(output)`` and ``num_checkpointed <= num_logged``.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2

if TYPE_CHECKING:
    from scheduler_svc.events import RouterConn

_seq_ids = itertools.count(1)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Request:
    request_id: str
    prompt: list[int]
    params: SamplingParams
    priority: int = 0
    arrival: float = field(default_factory=time.monotonic)
    seq_id: int = field(default_factory=lambda: next(_seq_ids))
    status: Status = Status.WAITING
    output: list[int] = field(default_factory=list)
    # Tokens (prompt + output) whose K/V are in the cache, counting this step's once scheduled.
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    # Chained hashes of the leading full, computed blocks of block_table (the prefix cache names).
    block_hashes: list[bytes] = field(default_factory=list)
    # Prompt tokens served from the prefix cache at first admission (reported in usage).
    num_cached: int = -1
    # The worker has this sequence's state (block table, sampling) from an earlier step.
    on_worker: bool = False
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    aborted: bool = False
    # The router connection that receives this request's events (None: recovered after a restart
    # and not resumed by any router yet, or aborted).
    conn: RouterConn | None = None
    num_evented: int = 0  # output tokens put into an event (it leaves once Redis has them)
    num_delivered: int = 0  # output tokens handed to the router's stream (Redis has them)
    num_logged: int = 0  # output tokens queued for Redis (the worker's token log)
    num_checkpointed: int = 0  # output tokens in the request's own Redis string (the rest: log)

    # Tokens sampled by steps still in flight (their ids are not known yet; at most the depth of
    # the step pipeline). They count in num_tokens: the next decode feeds the worker's own sample.
    pending: int = 0
    # Bumped whenever the request loses its blocks (preemption, worker loss): results of steps
    # scheduled before that no longer describe its block table.
    epoch: int = 0
    # An embedding request (common_pb2.Pooling): runs its prompt, returns pooled hidden states.
    pooling: int = common_pb2.POOLING_NONE
    embedding: list[float] | None = None
    # W3C trace context of the router's span for this request (empty: not traced).
    trace_context: dict[str, str] = field(default_factory=dict)
    # The prompt's images (common_pb2.ImageInput), sent to the worker with the sequence.
    images: list[common_pb2.ImageInput] = field(default_factory=list)
    # SubmitRequest.cache_salt: mixed into the prompt's block hashes (empty: unsalted).
    cache_salt: bytes = b""
    # Logprobs of output tokens not yet emitted (only when params.logprobs is set), and the
    # prompt's (params.prompt_logprobs), sent with the first event.
    logprobs: list[common_pb2.Logprobs] = field(default_factory=list)
    prompt_logprobs: list[common_pb2.Logprobs] = field(default_factory=list)
    # Redis string of output tokens (the state store names it once, not per step).
    tokens_key: str = ""
    # The scheduler's span for this request (None until first scheduled; a no-op span when the
    # request is not traced).
    span: Any = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output) + self.pending

    @property
    def num_known(self) -> int:
        return len(self.prompt) + len(self.output)

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole sequence."""
        p = len(self.prompt)
        chunk = self.prompt[start : min(end, p)] if start < p else []
        if end > p:
            chunk += self.output[max(start - p, 0) : end - p]
        return chunk

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def unstarted(self) -> bool:
        """Nothing of it is on its worker: no output token, no block, no token in flight."""
        return not self.output and not self.block_table and not self.pending

    @property
    def uses_prefix_cache(self) -> bool:
        """Prompt logprobs and mean pooling need every prompt position computed, and penalties
        need the worker to see every token (cached ones are never sent to it)."""
        return (self.params.prompt_logprobs is None and self.pooling != common_pb2.POOLING_MEAN
                and not self.params.penalized)

    def stop_reason(self, token: int, eos: frozenset[int], max_model_len: int) -> int:
        """Why ``token``, just appended, ends the request (UNSPECIFIED: it does not)."""
        p = self.params
        # Before min_tokens the worker masks stop tokens; a stop token seen anyway is not a stop.
        can_stop = len(self.output) > p.min_tokens
        if can_stop and not p.ignore_eos and token in eos:
            return common_pb2.FINISH_REASON_STOP
        if can_stop and token in p.stop_token_ids:
            return common_pb2.FINISH_REASON_STOP
        if len(self.output) >= p.max_tokens or self.num_tokens >= max_model_len:
            return common_pb2.FINISH_REASON_LENGTH
        return common_pb2.FINISH_REASON_UNSPECIFIED

    def recompute(self) -> None:
        """It lost its KV (preempted, moved, its worker lost): it waits, and computes prompt +
        output again. Results of steps already in flight no longer describe it (``epoch``).
        Its blocks are the caller's to give back first."""
        self.block_table, self.block_hashes = [], []
        self.num_computed = 0
        self.epoch += 1
        self.on_worker = False
        self.status = Status.WAITING

    def replayed(self) -> None:
        """Reloaded from Redis: every output token it has is there, and was delivered or will
        be replayed on resume, so all four counters stand at its output."""
        n = len(self.output)
        self.num_evented = self.num_delivered = self.num_logged = n
