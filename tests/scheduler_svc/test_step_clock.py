"""When the engine sends a worker its next step (scheduler_svc.step_clock): shortly before the
step the worker computes should end, so that a request arriving meanwhile joins the next step
instead of the one after it, and still before the worker needs it. Against a real gRPC worker
that takes a fixed time per step (the null worker, slowed) and a real Redis."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
import pytest
import redis.asyncio as aioredis
from fleet_util import place, scenario, served, worker_info

from pagewire.config import SchedulerConfig
from pagewire.redis_keys import RedisKeys
from pagewire.v1 import worker_pb2
from scheduler_svc.batch import ScheduledBatch, ScheduledSeq
from scheduler_svc.discovery import attach_worker
from scheduler_svc.events import RouterConn
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request
from scheduler_svc.step_clock import MIN_SAMPLES, SHADE, StepClock
from scheduler_svc.step_loop import WorkerEngine
from worker_svc import step_join
from worker_svc.null_worker import NullWorker

STEP_S = 0.04


def batch(decodes: int, prefill: int = 0, position: int = 100) -> ScheduledBatch:
    b = ScheduledBatch()
    for _ in range(decodes):
        b.decodes.append(None)  # type: ignore[arg-type]  # only counted
        b.decode_positions.append(position)
    if prefill:
        b.seqs.append(ScheduledSeq(None, 0, prefill, [], True, True))  # type: ignore[arg-type]
    return b


def cost_ms(b: ScheduledBatch) -> float:
    """A worker whose step costs 2 ms, 0.1 per sequence, 0.02 per token, 0.5 per 1k positions."""
    tokens = len(b.decodes) + sum(s.num_tokens for s in b.seqs)
    context = sum(b.decode_positions) + sum(s.start + s.num_tokens for s in b.seqs)
    return 2 + 0.1 * b.num_seqs + 0.02 * tokens + 0.5 * context / 1000


def test_the_clock_learns_what_a_step_costs_and_predicts_it_shaded_down() -> None:
    """Fitted to the worker's reported times; shaded and capped so that a wrong guess errs
    early (the next step sent sooner than needed, never later)."""
    clock = StepClock()
    seen = [batch(d, p, pos) for d, p, pos in
            [(8, 0, 100), (16, 0, 200), (32, 0, 300), (4, 500, 50), (64, 0, 400), (1, 1000, 10),
             (20, 200, 250), (48, 0, 350), (2, 0, 20), (10, 100, 500)]]
    assert clock.predict_ms(seen[0]) is None, "nothing seen yet: no guess"
    for b in seen[:MIN_SAMPLES - 1]:
        clock.observe(b, cost_ms(b))
    assert clock.predict_ms(seen[0]) is None, "too few steps seen"
    for b in seen[MIN_SAMPLES - 1:]:
        clock.observe(b, cost_ms(b))
    for b in (batch(40, 0, 300), batch(12, 300, 150)):
        assert clock.predict_ms(b) == pytest.approx(SHADE * cost_ms(b), rel=1e-6)
    longest = max(cost_ms(b) for b in seen)
    assert clock.predict_ms(batch(0, 100_000)) == pytest.approx(SHADE * longest), (
        "never longer than the longest step seen")


def test_the_next_step_is_held_until_the_lead_before_the_running_one_should_end() -> None:
    clock = StepClock(lead_s=0.003)
    steady = batch(16)
    for _ in range(MIN_SAMPLES):
        clock.observe(steady, 40.0)
    expected = SHADE * 0.040 - 0.003
    assert clock.delay_s(steady, started=10.0, now=10.0) == pytest.approx(expected)
    assert clock.delay_s(steady, started=10.0, now=10.0 + expected + 0.001) == 0.0
    assert StepClock(lead_s=-1).delay_s(steady, 10.0, 10.0) == 0.0, "negative lead: no holding"


@dataclass
class Ran:
    step_id: int
    arrived: float  # when the step reached the worker
    started: float
    ended: float
    new_seq_ids: list[int]


class TimedWorker(NullWorker):
    """The null worker taking STEP_S per step, reported as its compute_ms; logs every step. Steps
    waiting behind the one it takes up that join it run inside it, as on a real worker."""

    def __init__(self, info: worker_pb2.WorkerInfo) -> None:
        super().__init__(info)
        self.ran: list[Ran] = []
        self.current = 0  # the step being computed
        self.received: set[int] = set()

    async def Execute(self, request_iterator: AsyncIterator[worker_pb2.Step],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[worker_pb2.StepResult]:
        inbox: deque[tuple[worker_pb2.Step, float]] = deque()
        more, closed = asyncio.Event(), asyncio.Event()

        async def receive() -> None:
            async for step in request_iterator:
                inbox.append((step, time.perf_counter()))
                self.received.add(step.step_id)
                more.set()
            closed.set()
            more.set()

        started: dict[int, tuple[worker_pb2.Step, list[worker_pb2.Step], float, float]] = {}

        async def steps() -> AsyncIterator[worker_pb2.Step]:
            while True:
                while not inbox and not closed.is_set():
                    more.clear()
                    await more.wait()
                if not inbox:
                    return
                step, arrived = inbox.popleft()
                joiners = step_join.take_joiners(step, deque(s for s, _ in inbox))
                for _ in joiners:
                    inbox.popleft()
                started[step.step_id] = (step, joiners, arrived, time.perf_counter())
                self.current = step.step_id
                yield step_join.merged(step, joiners)

        reader = asyncio.create_task(receive())
        try:
            async for result in super().Execute(steps(), context):
                step, joiners, arrived, began = started.pop(result.step_id)
                await asyncio.sleep(STEP_S)
                new = [s.seq_id for s in step_join.merged(step, joiners).seqs if s.new]
                self.ran.append(Ran(step.step_id, arrived, began, time.perf_counter(), new))
                if not joiners:
                    result.compute_ms = STEP_S * 1e3
                for part in step_join.split(result, joiners):
                    yield part
        finally:
            reader.cancel()


async def warm(fleet: Fleet, engine: WorkerEngine, worker: TimedWorker, conn: RouterConn) -> None:
    """A long request running, and enough steps done for the clock to predict."""
    place(fleet, engine, "steady", 1_000_000, conn)
    while len(worker.ran) < MIN_SAMPLES + 2:
        await asyncio.sleep(0.01)


async def steps_later(fleet: Fleet, engine: WorkerEngine, worker: TimedWorker, conn: RouterConn,
                      rid: str) -> int:
    """Place a request 10 ms into a step; how many steps after that one it first runs in."""
    done = len(worker.ran)
    while len(worker.ran) == done:  # a step just ended: the next one is starting
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    computing = worker.current
    req = place(fleet, engine, rid, 1, conn)
    while not any(req.seq_id in r.new_seq_ids for r in worker.ran):
        await asyncio.sleep(0.005)
    return next(r.step_id for r in worker.ran if req.seq_id in r.new_seq_ids) - computing


@pytest.mark.parametrize("lead_ms, later", [(5.0, 1), (-1.0, 2)])
def test_a_request_arriving_during_a_step_runs_in_the_next_one(redis_url: str, lead_ms: float,
                                                                later: int) -> None:
    """Held back (lead 5 ms), the next step is decided after the arrival: the request runs in
    the step after the one computing. Sent at once (negative lead), it was decided before: the
    request waits one more step."""
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet, conn = Fleet(), RouterConn()
        info = worker_info("w-a", num_blocks=256, max_model_len=1 << 20)
        worker = TimedWorker(info)
        async with served(fleet, r, keys, info, worker, lead_ms) as (engine, _):
            async with asyncio.timeout(60):
                await warm(fleet, engine, worker, conn)
                assert [await steps_later(fleet, engine, worker, conn, f"new-{i}")
                        for i in range(4)] == [later] * 4
                steady = [(a, b) for a, b in itertools.pairwise(worker.ran)
                          if a.step_id > MIN_SAMPLES + 1]
                on_time = sum(b.arrived <= a.ended for a, b in steady)
                assert on_time >= 0.9 * len(steady), (
                    f"held steps must still reach the worker before it is free: "
                    f"{on_time} of {len(steady)} did")

    scenario(redis_url, body)


async def steps_later_if_sent_ahead(worker: TimedWorker, place_one: Callable[[], Request]) -> int:
    """Place a request once the step after the one computing has reached the worker; how many
    steps after the one computing it first runs in."""
    done = len(worker.ran)
    while len(worker.ran) == done:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.005)
    computing = worker.current
    while computing + 1 not in worker.received:
        await asyncio.sleep(0.001)
    assert worker.current == computing, "the next step must arrive while this one computes"
    req = place_one()
    while not any(req.seq_id in r.new_seq_ids for r in worker.ran):
        await asyncio.sleep(0.005)
    return next(r.step_id for r in worker.ran if req.seq_id in r.new_seq_ids) - computing


@pytest.mark.parametrize("join, later", [(True, 1), (False, 2)])
def test_a_request_arriving_after_the_next_step_was_sent_joins_it(redis_url: str, join: bool,
                                                                   later: int) -> None:
    """Step N+1 reached the worker while it computes N; a request arriving now is sent at once
    as a step joining N+1, which the worker runs inside N+1: the request runs 1 step after the
    one computing. Not joining (GPU workers, or --no-join-new-requests), 2 steps after it."""
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet, conn = Fleet(), RouterConn()
        info = worker_info("w-a", num_blocks=256, max_model_len=1 << 20)
        worker = TimedWorker(info)
        async with served(fleet, r, keys, info, worker, 15.0) as (engine, _):
            engine.join_new_requests = join
            async with asyncio.timeout(60):
                await warm(fleet, engine, worker, conn)
                assert [await steps_later_if_sent_ahead(
                    worker, functools.partial(place, fleet, engine, f"new-{i}", 4, conn))
                    for i in range(4)] == [later] * 4

    scenario(redis_url, body)


@pytest.mark.parametrize("device, lead_s, hold", [("cpu", 0.004, True), ("cuda:0", -1.0, False)])
def test_only_cpu_workers_get_held_steps(redis_url: str, device: str, lead_s: float,
                                         hold: bool) -> None:
    """A GPU worker launches a step's host work while the previous one computes: it gets each
    step as soon as it may go, whatever --step-lead-ms and --hold-after-first-token say."""
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        cfg = SchedulerConfig(step_lead_ms=4.0, deployment=keys.deployment, model_name="m")
        info = worker_info("w-a")
        info.device = device
        engine, _ = await attach_worker(Fleet(), cfg, r, "addr-w-a", None, None, info)  # type: ignore[arg-type]
        assert engine.step_clock.lead_s == pytest.approx(lead_s)
        assert engine.hold_after_first_token is hold
        assert engine.join_new_requests is hold

    scenario(redis_url, body)


async def first_tokens(conn: RouterConn, arrived: dict[str, float]) -> None:
    """Read the router's stream for good, noting when each request's first token came."""
    while True:
        await conn.ready.wait()
        now = time.perf_counter()
        for b in conn.take():
            firsts = [e.request_id for e in b.events if e.index == 0]
            firsts += [rid for rid, i in zip(b.token_request_ids, b.token_indices, strict=True) if i == 0]
            for rid in firsts:
                arrived.setdefault(rid, now)


@pytest.mark.parametrize("hold", [True, False])
def test_after_a_first_token_the_worker_gets_nothing_until_the_router_has_it(redis_url: str,
                                                                              hold: bool) -> None:
    """Held (CPU workers), the step after one that gave a request its first token reaches the
    worker only once that token reached the router: the worker waits for it, once per request,
    while every other step still reaches it before it is free. Not held, that step was already
    waiting in the worker's inbox while the token was delivered."""
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet, conn = Fleet(), RouterConn()
        info = worker_info("w-a", num_blocks=256, max_model_len=1 << 20)
        worker = TimedWorker(info)
        firsts: dict[str, float] = {}
        reader = asyncio.create_task(first_tokens(conn, firsts))
        async with served(fleet, r, keys, info, worker, 5.0) as (engine, _):
            engine.hold_after_first_token = hold
            async with asyncio.timeout(60):
                await warm(fleet, engine, worker, conn)
                reqs = []
                for i in range(4):
                    reqs.append(place(fleet, engine, f"new-{i}", 1_000_000, conn))
                    while reqs[-1].request_id not in firsts:
                        await asyncio.sleep(0.005)
                    await asyncio.sleep(3 * STEP_S)
            by_id = {ran.step_id: ran for ran in worker.ran}
            held = []
            for req in reqs:
                first = next(ran for ran in worker.ran if req.seq_id in ran.new_seq_ids)
                after = by_id[first.step_id + 1]
                held.append(after.arrived > firsts[req.request_id] and after.arrived > first.ended)
            others = [(a, b) for a, b in itertools.pairwise(worker.ran)
                      if a.step_id > MIN_SAMPLES + 1 and not a.new_seq_ids]
            on_time = sum(b.arrived <= a.ended for a, b in others)
        reader.cancel()
        if hold:
            assert held == [True] * 4
        else:
            assert sum(held) <= 1, held
        assert on_time >= 0.9 * len(others), f"{on_time} of {len(others)} steps reached the worker in time"

    scenario(redis_url, body)
