"""A request as the scheduler sees it: tokens in, tokens out, and the KV blocks it holds."""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2, scheduler_pb2

_seq_ids = itertools.count(1)


class RouterConn:
    """One router's Connect stream: its live requests and the events not yet sent to it.

    Events of every request and every worker engine collect here, and the stream sends them as a
    single EventBatch: one gRPC message per step per router, not per request. Plain one-token
    events go into packed columns (no message object per request per step).
    """

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}
        self.outbox: list[scheduler_pb2.TokenEvent] = []
        self.token_rids: list[str] = []
        self.token_ids: list[int] = []
        self.token_indices: list[int] = []
        self.ready = asyncio.Event()

    def send(self, event: scheduler_pb2.TokenEvent) -> None:
        self.outbox.append(event)
        self.ready.set()

    @property
    def pending(self) -> bool:
        return bool(self.outbox or self.token_rids)

    def take(self) -> scheduler_pb2.EventBatch:
        batch = scheduler_pb2.EventBatch(
            events=self.outbox,
            token_request_ids=self.token_rids,
            token_ids=self.token_ids,
            token_indices=self.token_indices,
        )
        self.outbox, self.token_rids, self.token_ids, self.token_indices = [], [], [], []
        self.ready.clear()
        return batch


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
    # and not resumed by any router yet).
    conn: RouterConn | None = None
    sent: int = 0  # output tokens already given to an event (delivered once Redis has them)
    queued: int = 0  # output tokens queued for Redis
    checkpointed: int = 0  # output tokens in the request's own Redis list (the rest: token log)
    flushed: int = 0  # output tokens Redis has acknowledged

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
    # Redis list of output tokens (the state store names it once, not per step).
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
    def uses_prefix_cache(self) -> bool:
        """Prompt logprobs and mean pooling need every prompt position computed, and penalties
        need the worker to see every token (cached ones are never sent to it)."""
        return (self.params.prompt_logprobs is None and self.pooling != common_pb2.POOLING_MEAN
                and not self.params.penalized)


def send_next_tokens(reqs: list[Request]) -> None:
    """Each request's next unflushed token, to the router it belongs to now (not when its step
    completed: a router may have re-attached since) -- the common case of a step, in one pass
    with no call per request. A request no router listens to (aborted, or not re-attached yet
    after a restart) still counts its token as flushed."""
    conn = None
    rids: list[str] = []
    ids: list[int] = []
    indices: list[int] = []
    for req in reqs:
        index = req.flushed
        req.flushed = index + 1
        c = req.conn
        if c is None:
            continue
        if c is not conn:
            conn = c
            rids, ids, indices = c.token_rids, c.token_ids, c.token_indices
            c.ready.set()
        rids.append(req.request_id)
        ids.append(req.output[index])
        indices.append(index)
