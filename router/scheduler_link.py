"""The router's one connection to its scheduler, shared by all of the router's requests.

Requests and aborts go up one ``Connect`` stream; token events come back batched (one message
per scheduler step) and are handed to each request's inbox (``router.event_inbox``). When the
stream breaks — the scheduler restarted — the link reconnects and re-attaches every request in
flight from the number of tokens it already has (``resume``), so client streams continue with
nothing lost or repeated. A request the new scheduler never heard of and that has no tokens yet
is submitted afresh. Past ``resume_timeout_s`` without a scheduler, requests fail with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from pagewire import serving
from pagewire.tls import TLSFiles
from pagewire.v1 import scheduler_pb2, scheduler_pb2_grpc
from router.event_inbox import EventInbox

log = logging.getLogger("router.link")
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


class SchedulerLink:
    def __init__(self, address: str, resume_timeout_s: float, tls: TLSFiles | None = None) -> None:
        self.address = address
        self.tls = tls
        self.resume_timeout_s = resume_timeout_s
        self.queues: dict[str, EventInbox] = {}
        self.submits: dict[str, scheduler_pb2.SubmitRequest] = {}
        self.received: dict[str, int] = {}  # output tokens each request has been sent
        self.resuming: set[str] = set()
        self._outgoing: asyncio.Queue[scheduler_pb2.RouterMessage | None] = asyncio.Queue()
        self._down_since: float | None = None  # when the stream last broke; None while up
        # The scheduler has accepted the current Connect stream (it answers with its headers at
        # once) and the stream has not broken since: a new request may be submitted. While not,
        # new requests are refused UNAVAILABLE (those in flight wait to resume).
        self.connected = False

    # ---- used by request handlers ---------------------------------------------------------
    def submit(self, sub: scheduler_pb2.SubmitRequest) -> EventInbox:
        """The inbox of ``sub``'s events. Its id must not be in flight on this link: the caller
        refuses duplicates (replacing the inbox would orphan the first request's stream)."""
        assert sub.request_id not in self.queues, f"request id {sub.request_id!r} is in flight"
        queue = EventInbox()
        self.queues[sub.request_id] = queue
        self.submits[sub.request_id] = sub
        self.received[sub.request_id] = 0
        self._outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=sub))
        return queue

    def finish(self, rid: str, abort: bool) -> None:
        """The handler is done with ``rid``; tell the scheduler to stop if it is still running."""
        if self.queues.pop(rid, None) is not None and abort:
            msg = scheduler_pb2.RouterMessage(abort=scheduler_pb2.AbortRequest(request_id=rid))
            self._outgoing.put_nowait(msg)
        self.submits.pop(rid, None)
        self.received.pop(rid, None)
        self.resuming.discard(rid)

    @property
    def in_flight(self) -> int:
        return len(self.queues)

    # ---- the connection -------------------------------------------------------------------
    async def run(self) -> None:
        """Keep a Connect stream open for the router's lifetime, at the current ``address``.

        A new address (another scheduler took the group over) is dialled once the stream to the
        old one breaks; the old holder exits when it loses the lease, so that is soon.
        """
        while True:
            address = self.address
            async with serving.open_channel(address, self.tls) as channel:
                stub = scheduler_pb2_grpc.SchedulerStub(channel)
                while self.address == address:
                    await self._stream(stub)
                    _raise_if_cancelled()
                    self._check_timeout()
                    await asyncio.sleep(0.2)

    async def _stream(self, stub: scheduler_pb2_grpc.SchedulerStub) -> None:
        """One Connect stream, from (re)connecting until it breaks."""
        outgoing: asyncio.Queue[scheduler_pb2.RouterMessage | None] = asyncio.Queue()
        if self._down_since is not None:
            self._resume_all(outgoing)
        while not self._outgoing.empty():  # queued while down, or never sent
            msg = self._outgoing.get_nowait()
            if msg is not None and (self._down_since is None or msg.HasField("abort")):  # submits became resumes
                outgoing.put_nowait(msg)
        self._outgoing = outgoing
        call = stub.Connect(_drain(outgoing))
        opened = asyncio.ensure_future(self._opened(call))
        try:
            async for batch in call:
                self._down_since = None
                for event in batch.events:
                    self._dispatch(event)
                self._dispatch_tokens(batch)
        except grpc.aio.AioRpcError as e:
            # Once per outage: a stream that was up broke. The attempts to reconnect that fail
            # (every 0.2 s while the scheduler is away) are debug lines.
            (log.warning if self.connected else log.debug)(
                "scheduler %s stream broke: %s %s", self.address, e.code().name, e.details())
        finally:
            opened.cancel()
            self.connected = False
            call.cancel()
            # The broken stream's request reader may still wait on its queue: messages not
            # taken move to a fresh queue (so none is lost in the backoff), and a sentinel ends
            # the reader.
            fresh: asyncio.Queue[scheduler_pb2.RouterMessage | None] = asyncio.Queue()
            while not outgoing.empty():
                fresh.put_nowait(outgoing.get_nowait())
            outgoing.put_nowait(None)
            self._outgoing = fresh
        if self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()

    async def _opened(self, call: grpc.aio.StreamStreamCall) -> None:
        await call.initial_metadata()
        if not call.done():  # headers, not the end of a refused call
            self.connected = True

    def _check_timeout(self) -> None:
        assert self._down_since is not None
        if asyncio.get_running_loop().time() - self._down_since > self.resume_timeout_s:
            self._fail_all(f"scheduler {self.address} unreachable for {self.resume_timeout_s}s")

    def _resume_all(self, outgoing: asyncio.Queue[scheduler_pb2.RouterMessage | None]) -> None:
        for rid, sub in self.submits.items():
            resume = scheduler_pb2.SubmitRequest()
            resume.CopyFrom(sub)
            resume.resume, resume.resume_from = True, self.received[rid]
            self.resuming.add(rid)
            outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=resume))

    def _dispatch(self, event: scheduler_pb2.TokenEvent) -> None:
        rid = event.request_id
        queue = self.queues.get(rid)
        if queue is None:
            return  # the handler already left (client cancelled)
        if event.error_code == NOT_FOUND and rid in self.resuming and self.received[rid] == 0:
            self.resuming.discard(rid)  # it never reached the old scheduler: submit afresh
            self._outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=self.submits[rid]))
            return
        self.resuming.discard(rid)
        self.received[rid] = max(self.received[rid], event.index + len(event.token_ids))
        queue.put(event)

    def _dispatch_tokens(self, batch: scheduler_pb2.EventBatch) -> None:
        """The packed one-token events: a request streaming with nothing else to say."""
        queues, received = self.queues, self.received
        for rid, token, index in zip(
            batch.token_request_ids, batch.token_ids, batch.token_indices, strict=True
        ):
            queue = queues.get(rid)
            if queue is None:
                continue
            self.resuming.discard(rid)
            received[rid] = max(received[rid], index + 1)
            queue.put_token(rid, token, index)

    def _fail_all(self, message: str) -> None:
        for rid, queue in self.queues.items():
            queue.put(scheduler_pb2.TokenEvent(
                request_id=rid, error_code=UNAVAILABLE, error_message=message))


async def _drain(
    queue: asyncio.Queue[scheduler_pb2.RouterMessage | None],
) -> AsyncIterator[scheduler_pb2.RouterMessage]:
    while (msg := await queue.get()) is not None:
        yield msg


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that gRPC turned into the end of the call: a task cancelled
    while its stream is being torn down can see AioRpcError(CANCELLED) instead of
    CancelledError, and the link would then redial forever while ``close`` waits for it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
