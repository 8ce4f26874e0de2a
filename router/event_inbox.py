"""One completion's token events, between the scheduler link (which puts) and the one task that
streams the completion to its client (which gets).

Two things set it apart from an ``asyncio.Queue``, both for the router's cost per streamed token:

- a plain token (one id, nothing else to say: the packed columns of an EventBatch) joins the
  plain event still waiting at the back of the inbox when it continues it, so a reader that fell
  behind (a busy router, a slow client) takes every token that came meanwhile as one event: one
  detokenizer call, one response and one write to its client, not one per step. vLLM's API
  server merges its outputs the same way;
- it is a deque and one waiter future, without the queue's size limit, task counting and join.

An event is never changed once the reader has it: only one still in the inbox is appended to.
"""

from __future__ import annotations

import asyncio
from collections import deque

from pagewire.v1 import scheduler_pb2


class EventInbox:
    def __init__(self) -> None:
        self._events: deque[scheduler_pb2.TokenEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._open_plain: scheduler_pb2.TokenEvent | None = None  # at the back, may take more

    def __len__(self) -> int:
        return len(self._events)

    def put(self, event: scheduler_pb2.TokenEvent) -> None:
        """An event as it came (a first or last token, logprobs, an error): never merged into."""
        self._events.append(event)
        self._open_plain = None
        self._wake()

    def put_token(self, rid: str, token: int, index: int) -> None:
        """One plain token: appended to the waiting plain event it continues, else a new one."""
        last = self._open_plain
        if last is not None and last.index + len(last.token_ids) == index:
            last.token_ids.append(token)
            return
        event = scheduler_pb2.TokenEvent(request_id=rid, token_ids=[token], index=index)
        self._events.append(event)
        self._open_plain = event
        self._wake()

    async def get(self) -> scheduler_pb2.TokenEvent:
        """The oldest event, waiting for one if there is none."""
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        event = self._events.popleft()
        if event is self._open_plain:
            self._open_plain = None
        return event

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
