"""Token events on their way to a router: packed columns for plain tokens, full events for the
rest, and an order the router (full events first, then columns, per batch) reads correctly."""

from __future__ import annotations

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc.events import RouterConn, deliver, replay_event, split_events
from scheduler_svc.request import Request, Status


def streaming(rid: str, conn: RouterConn) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(max_tokens=3), conn=conn)


def step(reqs: list[Request], token: int, finish: bool = False) -> None:
    """A step gave each request ``token`` (and finished them); its events are delivered."""
    for req in reqs:
        req.output.append(token)
        if finish:
            req.status, req.finish_reason = Status.FINISHED, common_pb2.FINISH_REASON_LENGTH
    deliver(*split_events(reqs, "w"))


def read_like_the_router(conn: RouterConn) -> list[tuple[str, int, int]]:
    out = []
    for batch in conn.take():
        out += [(e.request_id, e.index + i, t) for e in batch.events for i, t in enumerate(e.token_ids)]
        out += zip(batch.token_request_ids, batch.token_indices, batch.token_ids, strict=True)
    return out


def test_first_event_is_full_then_tokens_travel_in_columns() -> None:
    conn = RouterConn()
    a = streaming("a", conn)
    step([a], 10)
    step([a], 11)
    [batch] = conn.take()
    assert [(e.index, list(e.token_ids), e.prompt_tokens) for e in batch.events] == [(0, [10], 3)]
    assert (list(batch.token_request_ids), list(batch.token_indices)) == (["a"], [1])
    assert a.num_delivered == a.num_evented == 2


def test_a_last_event_after_plain_tokens_of_earlier_steps_is_read_after_them() -> None:
    conn = RouterConn()
    a, b = streaming("a", conn), streaming("b", conn)
    step([a, b], 10)
    conn.take()
    step([a, b], 11)  # plain: columns
    step([a], 12, finish=True)  # a's last event, before the stream sent the columns
    assert read_like_the_router(conn) == [("a", 1, 11), ("b", 1, 11), ("a", 2, 12)]
    assert not conn.pending


def test_a_request_no_router_listens_to_still_counts_its_tokens_delivered() -> None:
    conn = RouterConn()
    a = streaming("a", conn)
    step([a], 10)
    a.conn = None
    step([a], 11)
    assert a.num_delivered == 2 and read_like_the_router(conn) == [("a", 0, 10)]


def test_a_router_that_re_attaches_while_the_finishing_step_is_in_flight_gets_its_tokens() -> None:
    """After a restart the request runs before its router re-attaches. It finishes (stop token
    99) while that step's write is on its way to Redis; the router re-attaches then. The replay
    carries what was delivered and no finish; the finishing step's event, once its write lands,
    brings the stop token and the finish to the router now attached."""
    a = streaming("a", RouterConn())
    a.conn = None  # recovered: no router yet
    step([a], 10)
    a.output.append(99)
    a.status, a.finish_reason = Status.FINISHED, common_pb2.FINISH_REASON_STOP
    in_flight = split_events([a], "w")  # the finishing step, its write not landed yet
    router = RouterConn()
    a.conn = router
    replay = replay_event(a, 0)
    assert (list(replay.token_ids), replay.finish_reason) == ([10], common_pb2.FINISH_REASON_UNSPECIFIED)
    deliver(*in_flight)
    [batch] = router.take()
    assert [(e.index, list(e.token_ids), e.finish_reason) for e in batch.events] == [
        (1, [99], common_pb2.FINISH_REASON_STOP)]
    again = replay_event(a, 0)  # everything delivered: a replay now tells the finish
    assert (list(again.token_ids), again.finish_reason) == ([10, 99], common_pb2.FINISH_REASON_STOP)
