"""A request as the scheduler sees it: tokens in, tokens out, and the KV blocks it holds."""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from dataclasses import dataclass, field

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2, scheduler_pb2

_seq_ids = itertools.count(1)


class RouterConn:
    """One router's Connect stream: its live requests and the events not yet sent to it.

    Events of every request and every worker engine collect in one outbox, which the stream
    sends as a single EventBatch: one gRPC message per step per router, not per request.
    """

    def __init__(self) -> None:
        self.requests: dict[str, Request] = {}
        self.outbox: list[scheduler_pb2.TokenEvent] = []
        self.ready = asyncio.Event()

    def send(self, event: scheduler_pb2.TokenEvent) -> None:
        self.outbox.append(event)
        self.ready.set()

    def take(self) -> list[scheduler_pb2.TokenEvent]:
        events, self.outbox = self.outbox, []
        self.ready.clear()
        return events


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
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
    sent: int = 0  # output tokens already put on the events queue
    flushed: int = 0  # output tokens Redis has acknowledged

    # Tokens sampled by steps still in flight (their ids are not known yet; at most the depth of
    # the step pipeline). They count in num_tokens: the next decode feeds the worker's own sample.
    pending: int = 0
    # Bumped whenever the request loses its blocks (preemption, worker loss): results of steps
    # scheduled before that no longer describe its block table.
    epoch: int = 0

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
