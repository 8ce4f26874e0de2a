"""The step loop against a real gRPC null worker (``worker_svc.null_worker``: the worker's
service with no model, a token that depends only on the sequence and the output index) and a
real Redis: tokens reach the router in order, never before Redis has them; an aborted request
ends at once; a lost worker's requests finish on another."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import redis.asyncio as aioredis
from fleet_util import place, scenario, served, worker_info

from pagewire.redis_keys import RedisKeys
from pagewire.v1 import common_pb2
from scheduler_svc.events import RouterConn
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request
from scheduler_svc.step_loop import WorkerEngine
from scheduler_svc.step_write import unpack
from worker_svc.null_worker import FIRST_TOKEN, VOCAB, NullWorker


def null_token(req: Request, index: int) -> int:
    """What the null worker samples for ``req`` at output ``index``."""
    return FIRST_TOKEN + (req.seq_id * 31 + index) % (VOCAB - FIRST_TOKEN)


def null_worker(fleet: Fleet, r: aioredis.Redis, keys: RedisKeys, wid: str
                ) -> contextlib.AbstractAsyncContextManager[tuple[WorkerEngine, grpc.aio.Server]]:
    """A null worker serving on a free port, and its engine driving it (step loop running)."""
    info = worker_info(wid, num_blocks=256, max_model_len=4096)
    return served(fleet, r, keys, info, NullWorker(info))


async def stored_tokens(r: aioredis.Redis, keys: RedisKeys, wid: str, req: Request) -> int:
    """Output tokens of ``req`` Redis holds: its string, then its entries in the worker's log."""
    own = unpack(await r.get(keys.request_tokens(req.request_id)) or b"")
    log = unpack(await r.get(keys.token_log(wid)) or b"")
    return len(own) + sum(1 for handle in log[::2] if handle == req.seq_id)


async def collect(conn: RouterConn, reqs: dict[str, Request], until_done: set[str],
                  check=None) -> dict[str, list[tuple[int, int]]]:  # type: ignore[no-untyped-def]
    """(index, token) pairs per request as the router receives them, until every request of
    ``until_done`` has a finish reason; ``check(request, index)`` for every token on arrival."""
    got: dict[str, list[tuple[int, int]]] = {rid: [] for rid in reqs}
    reasons: dict[str, int] = {}
    async with asyncio.timeout(120):
        while not until_done <= set(reasons):
            await conn.ready.wait()
            for batch in conn.take():
                await received(batch, got, reasons, reqs, check)
    assert {reasons[rid] for rid in until_done} <= {common_pb2.FINISH_REASON_LENGTH,
                                                    common_pb2.FINISH_REASON_ABORT}
    return got


async def received(batch, got, reasons, reqs, check) -> None:  # type: ignore[no-untyped-def]
    """One EventBatch read the way the router reads it: full events, then the columns."""
    arrived = [(e.request_id, e.index + i, t) for e in batch.events
               for i, t in enumerate(e.token_ids)]
    arrived += zip(batch.token_request_ids, batch.token_indices, batch.token_ids, strict=True)
    for rid, index, token in arrived:
        got[rid].append((index, token))
        if check is not None:
            await check(reqs[rid], index)
    reasons.update({e.request_id: e.finish_reason for e in batch.events if e.finish_reason})




def test_tokens_reach_the_router_in_order_and_only_once_redis_has_them(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet, conn = Fleet(), RouterConn()
        async with null_worker(fleet, r, keys, "w-a") as (engine, _):
            reqs = {rid: place(fleet, engine, rid, 12, conn) for rid in ("x", "y", "z")}

            async def in_redis(req: Request, index: int) -> None:
                assert await stored_tokens(r, keys, "w-a", req) > index, (
                    f"{req.request_id}[{index}] reached the router before Redis had it")

            got = await collect(conn, reqs, set(reqs), in_redis)
            for rid, req in reqs.items():
                assert got[rid] == [(i, null_token(req, i)) for i in range(12)]
                assert req.output == [t for _, t in got[rid]]
            await engine.settle()
            assert len(fleet) == 0, "finished requests are forgotten once their events are out"
            assert not await r.smembers(keys.requests())
            assert await r.hget(keys.request("x"), "finish_reason") == b"%d" % (
                common_pb2.FINISH_REASON_LENGTH)

    scenario(redis_url, body)


def test_an_aborted_request_ends_with_abort_and_leaves_the_fleet(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet, conn = Fleet(), RouterConn()
        async with null_worker(fleet, r, keys, "w-a") as (engine, _):
            x = place(fleet, engine, "x", 100_000, conn)
            keep = place(fleet, engine, "keep", 30, conn)
            async with asyncio.timeout(60):
                while x.num_delivered < 3:
                    await asyncio.sleep(0.01)
            assert fleet.abort("x", conn)
            got = await collect(conn, {"x": x, "keep": keep}, {"keep"})
            assert x.finished and x.finish_reason == common_pb2.FINISH_REASON_ABORT
            assert len(got["keep"]) == 30 and len(x.output) < 1000
            await engine.settle()
            assert fleet.request("x") is None and fleet.request("keep") is None
            assert engine.scheduler.pool.num_used == 0

    scenario(redis_url, body)


def test_a_lost_workers_requests_finish_on_another_without_a_gap(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet, conn = Fleet(), RouterConn()
        async with (null_worker(fleet, r, keys, "w-a") as (a, server_a),
                    null_worker(fleet, r, keys, "w-b") as (b, _)):
            x = place(fleet, a, "x", 400, conn)
            async with asyncio.timeout(60):
                while x.num_delivered < 20:
                    await asyncio.sleep(0.01)
            await server_a.stop(0)  # the worker process is gone
            got = await collect(conn, {"x": x}, {"x"})
            assert got["x"] == [(i, null_token(x, i)) for i in range(400)]
            assert fleet.engine_of("x") in (b, None) and not a.connected

    scenario(redis_url, body)
