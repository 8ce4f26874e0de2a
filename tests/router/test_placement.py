"""Placement over several scheduler groups against a real Redis: one link per live group, workers
mapped to their group's link, a standby's new address picked up, gone groups never chosen.

Links of groups whose scheduler is "gone" dial loopback ports where nothing listens; a running
scheduler is the real scheduler service with no workers (it accepts Connect streams), served in
the test's own event loop."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import grpc
import pytest
import redis.asyncio as aioredis

from pagewire.block_hash import prompt_block_hashes
from pagewire.config import SchedulerConfig
from pagewire.group_directory import publish_group
from pagewire.launcher import free_port
from pagewire.redis_keys import RedisKeys
from pagewire.v1 import scheduler_pb2, scheduler_pb2_grpc
from router.errors import RequestError
from router.placement import Placer
from router.routing import WorkerRouter
from router.schedulers import SchedulerGroups
from scheduler_svc.connect import SchedulerService

BS = 16
Body = Callable[[aioredis.Redis, RedisKeys, SchedulerGroups], Awaitable[None]]


def scenario(redis_url: str, body: Body) -> None:
    """Run ``body`` in its own key namespace with a SchedulerGroups it may refresh; its links
    dial loopback ports where nothing listens, and are all closed at the end."""

    async def run() -> None:
        r = aioredis.Redis.from_url(redis_url)
        keys = RedisKeys(f"placement-{uuid.uuid4().hex[:8]}", "m")
        groups = SchedulerGroups(r, keys, resume_timeout_s=60)
        try:
            await body(r, keys, groups)
        finally:
            await groups.close()
            await r.aclose()

    asyncio.run(run())


def nowhere() -> str:
    return f"127.0.0.1:{free_port()}"


async def running_scheduler() -> tuple[grpc.aio.Server, str]:
    """A scheduler that accepts Connect streams (it has no worker: submits are refused)."""
    service = SchedulerService(SchedulerConfig())
    service.ready = True
    server = grpc.aio.server()
    scheduler_pb2_grpc.add_SchedulerServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def connected(groups: SchedulerGroups, *names: str) -> None:
    """Until the links of ``names`` have their Connect streams open."""
    for _ in range(200):
        if all(n in groups.links and groups.links[n].connected for n in names):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"links of {names} never connected")


async def take_group(
    r: aioredis.Redis, k: RedisKeys, group: str, workers: list[str], address: str = ""
) -> str:
    """A scheduler takes the group's lease and publishes its entry, as scheduler_svc.server does."""
    token = uuid.uuid4().hex
    await r.set(k.scheduler_lease(group), token, px=60_000)
    address = address or nowhere()
    assert await publish_group(r, k, group, token, address, workers)
    return address


async def register(r: aioredis.Redis, k: RedisKeys, wid: str) -> None:
    """A worker's registry entry and heartbeat, as worker_svc.server.register writes them."""
    await r.sadd(k.workers(), wid)
    await r.hset(k.worker_info(wid), mapping={"block_size": BS, "num_blocks": 1000})
    await r.set(k.worker_alive(wid), f"addr-{wid}", px=60_000)


def sub(rid: str) -> scheduler_pb2.SubmitRequest:
    return scheduler_pb2.SubmitRequest(request_id=rid, prompt_token_ids=[1, 2, 3])


def test_one_link_per_live_group_and_each_worker_maps_to_its_groups_link(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        a = await take_group(r, k, "a", ["w1"])
        b = await take_group(r, k, "b", ["w2", "w3"])
        await groups.refresh()
        assert {g: link.address for g, link in groups.links.items()} == {"a": a, "b": b}
        assert groups.eligible == {"w1", "w2", "w3"}
        assert groups.link_for("w1") is groups.links["a"]
        assert groups.link_for("w3") is groups.links["b"]
        assert groups.link_for("w9") is None  # driven by no scheduler

    scenario(redis_url, body)


def test_standby_taking_a_group_over_keeps_its_link_and_requests(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        await take_group(r, k, "a", ["w1"])
        await groups.refresh()
        link = groups.links["a"]
        link.submit(sub("in-flight"))
        await r.delete(k.scheduler_lease("a"))  # the holder died; its lease lapsed
        await groups.refresh()
        assert groups.link_for("w1") is None and groups.links["a"] is link  # busy: kept
        standby = await take_group(r, k, "a", ["w1"])
        await groups.refresh()
        assert groups.links["a"] is link and link.address == standby
        assert "in-flight" in link.submits  # re-attached there once the old stream is gone
        assert groups.link_for("w1") is link

    scenario(redis_url, body)


def test_idle_link_of_a_gone_group_is_closed_and_made_again_when_it_returns(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        await take_group(r, k, "a", ["w1"])
        await take_group(r, k, "b", ["w2"])
        await groups.refresh()
        groups.links["b"].submit(sub("busy"))
        await r.delete(k.scheduler_lease("a"), k.scheduler_lease("b"))
        await groups.refresh()
        assert set(groups.links) == {"b"} and groups.eligible == frozenset()
        assert groups.fallback() is None  # no live group to send anything new to
        groups.links["b"].finish("busy", abort=True)
        await groups.refresh()
        assert groups.links == {}
        server, address = await running_scheduler()
        try:
            await take_group(r, k, "a", ["w1"], address)
            await groups.refresh()
            await connected(groups, "a")
            assert set(groups.links) == {"a"} and groups.fallback() is groups.links["a"]
        finally:
            await server.stop(None)

    scenario(redis_url, body)


def test_prompt_goes_to_the_group_whose_worker_caches_its_prefix(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        for w in ("w1", "w2"):
            await register(r, k, w)
        server, address = await running_scheduler()
        try:
            await take_group(r, k, "a", ["w1"], address)
            await take_group(r, k, "b", ["w2"], address)
            prompt = list(range(100, 100 + 6 * BS))
            hashes = prompt_block_hashes(prompt, BS)
            await r.hset(k.prefix_index("w2"), mapping={h: i for i, h in enumerate(hashes[:4])})
            await groups.refresh()
            await connected(groups, "a", "b")
            placer = Placer(groups, WorkerRouter(r, k))
            placement = await placer.place(prompt)
            assert (placement.worker_id, placement.link) == ("w2", groups.links["b"])
        finally:
            await server.stop(None)

    scenario(redis_url, body)


def test_group_whose_scheduler_is_gone_is_not_chosen(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        for w in ("w1", "w2"):
            await register(r, k, w)
        server, address = await running_scheduler()
        try:
            await take_group(r, k, "a", ["w1"], address)
            await take_group(r, k, "b", ["w2"])
            prompt = list(range(100, 100 + 6 * BS))
            hashes = prompt_block_hashes(prompt, BS)
            await r.hset(k.prefix_index("w2"), mapping={h: i for i, h in enumerate(hashes)})
            await r.delete(k.scheduler_lease("b"))  # w2 still beats and caches the prompt
            await groups.refresh()
            await connected(groups, "a")
            placer = Placer(groups, WorkerRouter(r, k))
            for _ in range(5):
                placement = await placer.place(prompt)
                assert (placement.worker_id, placement.link) == ("w1", groups.links["a"])
        finally:
            await server.stop(None)  # a's scheduler is gone too: its stream breaks
        await r.delete(k.scheduler_lease("a"))
        for _ in range(100):
            if not groups.links["a"].connected:
                break
            await asyncio.sleep(0.05)
        await groups.refresh()
        with pytest.raises(RequestError) as e:
            await placer.place(prompt)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE

    scenario(redis_url, body)


def test_without_an_answer_from_redis_a_live_group_takes_the_request(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        await register(r, k, "w1")
        server, address = await running_scheduler()
        # Redis went away (a socket nobody listens on: refused at once, whatever else runs here)
        away = aioredis.Redis.from_url(f"unix:///tmp/pagewire-gone-{uuid.uuid4().hex}.sock")
        try:
            await take_group(r, k, "a", ["w1"], address)
            await groups.refresh()
            await connected(groups, "a")
            placement = await Placer(groups, WorkerRouter(away, k)).place([1] * 40)
        finally:
            await away.aclose()
            await server.stop(None)
        assert (placement.worker_id, placement.link) == ("", groups.links["a"])

    scenario(redis_url, body)


def test_redis_restarted_empty_a_connected_group_keeps_taking_requests(redis_url: str) -> None:
    """An empty Redis lists no group and no worker until the next publish and beats; a group
    whose scheduler is still connected stays live, and its scheduler places the request."""

    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        await register(r, k, "w1")
        server, address = await running_scheduler()
        try:
            await take_group(r, k, "a", ["w1"], address)
            await groups.refresh()
            await connected(groups, "a")
            placer = Placer(groups, WorkerRouter(r, k))
            assert (await placer.place([1] * 40)).worker_id == "w1"
            await r.delete(*(await r.keys(f"*{k.deployment}*")))  # what an empty restart leaves
            await groups.refresh()
            assert groups.eligible == {"w1"}
            placement = await placer.place([1] * 40)
            assert (placement.worker_id, placement.link) == ("", groups.links["a"])
        finally:
            await server.stop(None)

    scenario(redis_url, body)


def test_no_connected_scheduler_refuses_at_once(redis_url: str) -> None:
    async def body(r: aioredis.Redis, k: RedisKeys, groups: SchedulerGroups) -> None:
        await register(r, k, "w1")
        await take_group(r, k, "a", ["w1"])  # its scheduler is not listening
        await groups.refresh()
        with pytest.raises(RequestError) as e:
            await asyncio.wait_for(Placer(groups, WorkerRouter(r, k)).place([1] * 40), 5)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert "no scheduler is reachable" in str(e.value)

    scenario(redis_url, body)
