"""A fleet of engines as discovery.attach_worker makes them, without their step loops (unless a
test runs one), over a real Redis in a key namespace of the test's own."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import redis.asyncio as aioredis

from pagewire import guarded_service
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from pagewire.v1 import scheduler_pb2, worker_pb2
from scheduler_svc.events import RouterConn
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request
from scheduler_svc.scheduler import SchedulerLimits
from scheduler_svc.state_store import StateStore
from scheduler_svc.step_loop import WorkerEngine

BS = 4


def worker_info(wid: str, num_blocks: int = 64, max_model_len: int = 512) -> worker_pb2.WorkerInfo:
    return worker_pb2.WorkerInfo(worker_id=wid, block_size=BS, num_blocks=num_blocks,
                                 max_model_len=max_model_len, eos_token_ids=[1],
                                 instance_id=uuid.uuid4().hex)


def attach(fleet: Fleet, r: aioredis.Redis, keys: RedisKeys, wid: str, *, connected: bool = True,
           address: str = "", info: worker_pb2.WorkerInfo | None = None) -> WorkerEngine:
    """An engine added to ``fleet``, marked connected (as its step stream would)."""
    info = info or worker_info(wid)
    limits = SchedulerLimits(8, 64, BS, info.max_model_len, eos_token_ids=tuple(info.eos_token_ids))
    engine = WorkerEngine(address or f"addr-{wid}", info, StateStore(r, keys, wid), limits, fleet)
    engine.connected = connected
    fleet.adopt(engine, [])
    return engine


@contextlib.asynccontextmanager
async def served(fleet: Fleet, r: aioredis.Redis, keys: RedisKeys, info: worker_pb2.WorkerInfo,
                 servicer: object, step_lead_ms: float = 3.0
                 ) -> AsyncIterator[tuple[WorkerEngine, grpc.aio.Server]]:
    """``servicer`` (a Worker service) serving on a free port, and its engine driving it over real
    gRPC (step loop running)."""
    server = grpc.aio.server()
    guarded_service.add_service(server, worker_pb2.DESCRIPTOR.services_by_name["Worker"], servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    engine = attach(fleet, r, keys, info.worker_id, connected=False, address=f"127.0.0.1:{port}",
                    info=info)
    engine.step_clock.lead_s = step_lead_ms / 1e3
    await engine.recover(await engine.store.load())
    loop = asyncio.create_task(engine.run(r, 0.2))
    try:
        yield engine, server
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        assert_engine_stopped()
        with contextlib.suppress(TimeoutError):  # a server the test stopped already may not answer
            await asyncio.wait_for(server.stop(0), 5)


def place(fleet: Fleet, engine: WorkerEngine, rid: str, max_tokens: int, conn: RouterConn) -> Request:
    """A greedy request of a 5-token prompt placed on ``engine``."""
    req = Request(rid, [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=max_tokens,
                                                      ignore_eos=True), conn=conn)
    fleet.place(req, engine)
    return req


def submit(rid: str, worker_id: str = "", prompt_len: int = 3, max_tokens: int = 8,
           **fields: object) -> scheduler_pb2.SubmitRequest:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens).to_proto()
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=list(range(5, 5 + prompt_len)),
                                       sampling=sampling, worker_id=worker_id, **fields)


def scenario(redis_url: str, body: Callable[[aioredis.Redis, RedisKeys], Awaitable[None]]) -> None:
    """Run ``body`` with its own key namespace, so tests sharing the server never meet."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        try:
            await body(r, RedisKeys(f"fleet-{uuid.uuid4().hex[:8]}", "m"))
        finally:
            await r.aclose()

    asyncio.run(run())


def assert_engine_stopped() -> None:
    """No task is left running an engine's step stream or heartbeat watch: cancelling its loop
    stops both (a step stream that outlived it would go on driving the worker)."""
    names = {"_run_stream", "watch_heartbeat"}
    left = [t.get_name() for t in asyncio.all_tasks()
            if not t.done() and getattr(t.get_coro(), "__name__", "") in names]
    if left:
        raise AssertionError(f"the engine's loop left {left} running")
