"""Token events, from a step's results to the routers' Connect streams.

A step's events are fixed when its results are applied (:func:`split_events`), and leave only
once Redis has the step (``step_writer``): a router never sees a token a recovery could not
replay. Events of every request and every worker collect per router in a :class:`RouterConn`,
which its stream sends as one EventBatch: one gRPC message per step per router, not per request.
The common case -- one new token, nothing else to say -- travels in packed columns, with no
message object per request per step.
"""

from __future__ import annotations

import asyncio

from pagewire.v1 import common_pb2, scheduler_pb2
from scheduler_svc.request import Request, Status


class RouterConn:
    """One router's Connect stream: the events not yet sent to it.

    The router reads a batch's full events before its columns, so a request's full event must
    never share a batch with column tokens of its own that came before it (a last event after
    plain tokens of earlier steps, when the stream had no chance to send in between): such an
    event starts a new batch.
    """

    def __init__(self) -> None:
        self.outbox: list[scheduler_pb2.TokenEvent] = []
        self.token_rids: list[str] = []
        self.token_ids: list[int] = []
        self.token_indices: list[int] = []
        self._sealed: list[scheduler_pb2.EventBatch] = []  # complete batches, oldest first
        self.ready = asyncio.Event()

    def send(self, event: scheduler_pb2.TokenEvent) -> None:
        if event.index and self.token_rids and event.request_id in self.token_rids:
            self._seal()
        self.outbox.append(event)
        self.ready.set()

    @property
    def pending(self) -> bool:
        return bool(self._sealed or self.outbox or self.token_rids)

    def _seal(self) -> None:
        self._sealed.append(scheduler_pb2.EventBatch(
            events=self.outbox,
            token_request_ids=self.token_rids,
            token_ids=self.token_ids,
            token_indices=self.token_indices,
        ))
        self.outbox, self.token_rids, self.token_ids, self.token_indices = [], [], [], []

    def take(self) -> list[scheduler_pb2.EventBatch]:
        """Every batch not yet sent, in order (usually one)."""
        if self.outbox or self.token_rids:
            self._seal()
        batches, self._sealed = self._sealed, []
        self.ready.clear()
        return batches


Events = list[tuple[Request, scheduler_pb2.TokenEvent]]


def split_events(touched: list[Request], worker_id: str) -> tuple[list[Request], Events]:
    """What a step tells the routers, fixed now (later steps append to the same requests): the
    requests whose news is one plain token, and full events for the rest."""
    plain: list[Request] = []
    events: Events = []
    add_plain, finished = plain.append, Status.FINISHED
    for req in touched:
        sent = req.num_evented
        if sent and len(req.output) - sent == 1 and req.status is not finished and not req.logprobs:
            add_plain(req)  # the common case: one token, nothing else to say
            req.num_evented = sent + 1
        else:
            events.append((req, full_event(req, worker_id)))
    return plain, events


def full_event(req: Request, worker_id: str) -> scheduler_pb2.TokenEvent:
    """The full event for ``req``'s tokens since the last event (first/last/extras)."""
    event = scheduler_pb2.TokenEvent(
        request_id=req.request_id,
        token_ids=req.output[req.num_evented :],
        index=req.num_evented,
        worker_id=worker_id,
        finish_reason=req.finish_reason,
    )
    if req.num_evented == 0 or req.finished:
        event.prompt_tokens = len(req.prompt)
        event.cached_tokens = max(req.num_cached, 0)
    if req.num_evented == 0 and req.prompt_logprobs:
        event.prompt_logprobs.extend(req.prompt_logprobs)
        req.prompt_logprobs = []
    if req.logprobs:
        event.logprobs.extend(req.logprobs)
        req.logprobs = []
    if req.embedding is not None:
        event.embedding.extend(req.embedding)
    req.num_evented = len(req.output)
    return event


def replay_event(req: Request, start: int) -> scheduler_pb2.TokenEvent:
    """Everything delivered from ``start`` on, for a router that re-attaches after a restart.

    The finish goes with it only once its last tokens are delivered too: a request can finish
    while its last step's write is still on the way to Redis, and that step's own event (sent to
    this router, now attached) carries those tokens and the finish. Told the finish here, the
    router would end the stream without them, and read the last token it had as the one that
    stopped generation."""
    delivered_all = req.num_delivered >= len(req.output)
    finished = req.finish_reason if delivered_all else common_pb2.FINISH_REASON_UNSPECIFIED
    return scheduler_pb2.TokenEvent(
        request_id=req.request_id,
        token_ids=req.output[start : req.num_delivered],
        index=start,
        finish_reason=finished,
        prompt_tokens=len(req.prompt),
        cached_tokens=max(req.num_cached, 0),
    )


def deliver(plain: list[Request], events: Events) -> None:
    """A step's events, to the router each request belongs to now (not when its step completed:
    a router may have re-attached since)."""
    deliver_next_tokens(plain)
    for req, event in events:
        req.num_delivered = event.index + len(event.token_ids)
        if req.conn is not None:
            req.conn.send(event)


def deliver_next_tokens(reqs: list[Request]) -> None:
    """Each request's next undelivered token, in one pass with no call per request. A request
    no router listens to (aborted, or not re-attached yet after a restart) still counts its
    token as delivered."""
    conn = None
    rids: list[str] = []
    ids: list[int] = []
    indices: list[int] = []
    for req in reqs:
        index = req.num_delivered
        req.num_delivered = index + 1
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
