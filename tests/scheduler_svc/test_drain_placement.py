"""A draining worker, seen from its scheduler: it gets no new requests, its waiting requests that
never started move to a worker that takes new work, and with no such worker new requests are
refused with UNAVAILABLE. Real Redis for the state store, a real gRPC server for health."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import redis.asyncio as aioredis
from test_scheduler import make, req, run_step

from pagewire import config as pwconfig
from pagewire import serving
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.connect import SchedulerService
from scheduler_svc.events import RouterConn
from scheduler_svc.scheduler import SchedulerLimits
from scheduler_svc.state_store import StateStore
from scheduler_svc.step_loop import WorkerEngine
from scheduler_svc.worker_health import WORKER_SERVICE, watch_health

BS = 4


def attach(service: SchedulerService, r: aioredis.Redis, keys: RedisKeys, wid: str) -> WorkerEngine:
    """An engine as discovery.attach_worker makes it, marked connected (its step stream is not run here)."""
    info = worker_pb2.WorkerInfo(worker_id=wid, block_size=BS, num_blocks=64, max_model_len=512,
                                 instance_id=uuid.uuid4().hex)
    limits = SchedulerLimits(8, 64, BS, 512, eos_token_ids=(0,))
    engine = WorkerEngine(f"addr-{wid}", info, StateStore(r, keys, wid), limits, service.fleet)
    engine.connected = True
    service.fleet.adopt(engine, [])
    return engine


def submit(rid: str, worker_id: str = "") -> scheduler_pb2.SubmitRequest:
    sampling = SamplingParams(temperature=0, max_tokens=8).to_proto()
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=[5, 6, 7], sampling=sampling,
                                       worker_id=worker_id)


def scenario(redis_url: str, body: Callable[[aioredis.Redis, RedisKeys], Awaitable[None]]) -> None:
    """Run ``body`` with its own key namespace, so tests sharing the server never meet."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            await body(r, RedisKeys(f"drain-{uuid.uuid4().hex[:8]}", "m"))
        finally:
            await r.aclose()

    asyncio.run(run())


def test_take_unstarted_leaves_running_and_preempted_requests_with_output() -> None:
    s = make(num_blocks=4, bs=4)
    a, c = req("a", 7, max_tokens=20), req("c", 7, max_tokens=20)
    s.add(a)
    s.add(c)
    run_step(s)
    assert a.output and c.output, "both prefilled, two blocks each: the pool is full"
    while c not in s.waiting:  # they grow until a needs c's blocks: c is preempted with output
        run_step(s)
    assert c.output and a in s.running
    b = req("b", 3)
    s.add(b)
    assert s.has_unstarted()
    assert s.take_unstarted() == [b]
    assert s.waiting == [c] and a in s.running
    assert not s.has_unstarted()
    s.check_invariants()


def test_new_requests_go_around_a_draining_worker_and_unstarted_ones_follow(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        service = SchedulerService(pwconfig.SchedulerConfig())
        a, b = attach(service, r, keys, "w-a"), attach(service, r, keys, "w-b")
        conn = RouterConn()
        assert service.submit(submit("early", "w-a"), conn) is None
        assert service.fleet.engine_of("early") is a
        service.fleet.set_serving(a, serving=False)
        assert a.draining and not b.draining
        # The router still named w-a (its view of Redis lags): the scheduler places it on w-b.
        assert service.submit(submit("late", "w-a"), conn) is None
        assert service.fleet.engine_of("late") is b
        hand_over = service.fleet.hand_over(a)
        assert hand_over is not None
        await hand_over
        assert service.fleet.engine_of("early") is b and not a.scheduler.waiting
        assert {r.request_id for r in b.scheduler.waiting} == {"early", "late"}
        await b.store.flush()
        assert await r.hget(keys.request("early"), "worker") == b"w-b", (
            "Redis, the state of record, names the worker that will run it")

    scenario(redis_url, body)


def test_with_every_worker_draining_new_requests_are_refused_and_queued_ones_stay(
    redis_url: str,
) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        service = SchedulerService(pwconfig.SchedulerConfig())
        a = attach(service, r, keys, "w-a")
        conn = RouterConn()
        assert service.submit(submit("queued"), conn) is None
        service.fleet.set_serving(a, serving=False)
        error = service.submit(submit("new"), conn)
        assert error is not None
        code, text = error
        assert code == grpc.StatusCode.UNAVAILABLE and "draining" in text
        assert service.fleet.hand_over(a) is None, "no other worker: what it accepted runs there"
        assert [r.request_id for r in a.scheduler.waiting] == ["queued"]
        service.fleet.set_serving(a, serving=True)  # a new instance came up
        assert service.submit(submit("again"), conn) is None

    scenario(redis_url, body)


def test_health_watch_reports_the_worker_turning_not_serving() -> None:
    async def watch() -> None:
        server, health = serving.new_server([WORKER_SERVICE])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await serving.set_serving(health, [WORKER_SERVICE], True)
        seen: list[bool] = []
        watcher = asyncio.create_task(watch_health(f"127.0.0.1:{port}", None, seen.append))
        try:
            for want in ([True], [True, False]):
                async with asyncio.timeout(5):
                    while seen != want:
                        await asyncio.sleep(0.01)
                if want == [True]:
                    await serving.set_serving(health, [WORKER_SERVICE], False)  # SIGTERM's first act
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
            await server.stop(0)

    asyncio.run(watch())
