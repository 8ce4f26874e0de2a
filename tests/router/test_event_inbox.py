"""A completion's inbox: events in order; plain tokens a lagging reader has not taken yet merged."""

from __future__ import annotations

import asyncio

from pagewire.v1 import common_pb2, scheduler_pb2
from router.event_inbox import EventInbox

LENGTH = common_pb2.FINISH_REASON_LENGTH


def full(index: int, *tokens: int, **fields: object) -> scheduler_pb2.TokenEvent:
    return scheduler_pb2.TokenEvent(request_id="r", token_ids=tokens, index=index, **fields)


def drain(inbox: EventInbox) -> list[tuple[int, list[int], int]]:
    async def take() -> list[scheduler_pb2.TokenEvent]:
        return [await inbox.get() for _ in range(len(inbox))]

    return [(e.index, list(e.token_ids), e.finish_reason) for e in asyncio.run(take())]


def test_plain_tokens_waiting_in_the_inbox_arrive_as_one_event() -> None:
    inbox = EventInbox()
    inbox.put(full(0, 7, cached_tokens=3))  # the first token: an event of its own
    for index, token in [(1, 8), (2, 9), (3, 10)]:
        inbox.put_token("r", token, index)
    inbox.put(full(4, 11, finish_reason=LENGTH))  # the last: never merged into
    assert drain(inbox) == [(0, [7], 0), (1, [8, 9, 10], 0), (4, [11], LENGTH)]


def test_a_token_after_a_full_event_or_a_gap_starts_a_new_event() -> None:
    inbox = EventInbox()
    inbox.put_token("r", 8, 1)
    inbox.put(full(2, 9, logprobs=[common_pb2.Logprobs(token_id=9)]))
    inbox.put_token("r", 10, 3)
    inbox.put_token("r", 12, 5)  # not the next index (a replay after a resume): kept apart
    assert drain(inbox) == [(1, [8], 0), (2, [9], 0), (3, [10], 0), (5, [12], 0)]


def test_an_event_the_reader_has_taken_is_never_changed() -> None:
    async def body() -> None:
        inbox = EventInbox()
        inbox.put_token("r", 8, 1)
        taken = await inbox.get()
        inbox.put_token("r", 9, 2)
        assert list(taken.token_ids) == [8]
        assert list((await inbox.get()).token_ids) == [9]

    asyncio.run(body())


def test_a_waiting_reader_wakes_on_the_first_event() -> None:
    async def body() -> None:
        inbox = EventInbox()
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        assert not reader.done()
        inbox.put_token("r", 8, 1)
        inbox.put_token("r", 9, 2)  # before the reader ran: merged into the one it will take
        event = await asyncio.wait_for(reader, 1)
        assert (event.index, list(event.token_ids)) == (1, [8, 9]) and len(inbox) == 0

    asyncio.run(body())


def test_a_cancelled_reader_leaves_the_inbox_usable() -> None:
    async def body() -> None:
        inbox = EventInbox()
        reader = asyncio.ensure_future(inbox.get())
        await asyncio.sleep(0)
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        inbox.put_token("r", 8, 1)
        assert list((await asyncio.wait_for(inbox.get(), 1)).token_ids) == [8]

    asyncio.run(body())
