"""The fleet: where a request goes, where it goes when its worker is lost or draining, and when
it is forgotten. Engines over a real Redis; their step loops are not run here."""

from __future__ import annotations

import redis.asyncio as aioredis
from fleet_util import attach, scenario, submit

from pagewire import config as pwconfig
from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from scheduler_svc.connect import SchedulerService
from scheduler_svc.events import RouterConn
from scheduler_svc.fleet import Fleet
from scheduler_svc.request import Request


def request(rid: str, prompt_len: int = 3, max_tokens: int = 8) -> Request:
    return Request(rid, list(range(5, 5 + prompt_len)), SamplingParams(max_tokens=max_tokens))


def test_pick_takes_the_routers_choice_else_the_least_loaded_serving_worker(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        a, b = attach(fleet, r, keys, "w-a"), attach(fleet, r, keys, "w-b")
        fleet.place(request("big", prompt_len=40), a)
        assert fleet.pick("w-a") is a, "the router's choice, loaded or not"
        assert fleet.pick("") is b and fleet.pick("nobody") is b, "else the least loaded"
        a.connected = False
        assert fleet.pick("w-a") is b, "a worker whose stream is down is not chosen"
        fleet.set_serving(b, serving=False)
        assert fleet.pick("w-b") is a, "nor is a draining one, while another takes work"
        assert fleet.pick("", exclude=a) is None

    scenario(redis_url, body)


def test_the_index_finds_a_placed_request_and_forgets_it_when_done(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        a = attach(fleet, r, keys, "w-a")
        x = request("x")
        fleet.place(x, a)
        assert fleet.request("x") is x and fleet.engine_of("x") is a and len(fleet) == 1
        assert a.scheduler.waiting == [x]
        fleet.request_done(Request("x", [1], SamplingParams()))  # another request of that id
        assert fleet.request("x") is x, "only the request itself is forgotten"
        fleet.request_done(x)
        assert fleet.request("x") is None and len(fleet) == 0

    scenario(redis_url, body)


def test_only_the_owning_stream_aborts_a_request(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        a = attach(fleet, r, keys, "w-a")
        owner, other = RouterConn(), RouterConn()
        x = request("x")
        x.conn = owner
        fleet.place(x, a)
        assert fleet.owned_by(owner) == [x] and fleet.owned_by(other) == []
        assert not fleet.abort("x", other), "a duplicate's router must not end the first request"
        assert not x.finished
        assert fleet.abort("x", owner) and x.aborted and x.conn is None
        assert not fleet.abort("nobody")

    scenario(redis_url, body)


def test_a_lost_workers_requests_recompute_on_the_others(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        a, b = attach(fleet, r, keys, "w-a"), attach(fleet, r, keys, "w-b")
        x, y = request("x"), request("y")
        fleet.place(x, a)
        fleet.place(y, a)
        fleet.worker_lost(a, a.scheduler.take_all())
        assert fleet.engine_of("x") is b and fleet.engine_of("y") is b
        assert b.scheduler.waiting == [x, y]
        fleet.worker_lost(b, b.scheduler.take_all())
        assert fleet.engine_of("x") is a, "back where they came from: a is the only other"

    scenario(redis_url, body)


def test_hand_over_moves_unstarted_requests_off_a_draining_worker(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        a, b = attach(fleet, r, keys, "w-a"), attach(fleet, r, keys, "w-b")
        waiting, aborted = request("waiting"), request("aborted")
        for req in (waiting, aborted):
            fleet.place(req, a)
        fleet.set_serving(a, serving=False)
        assert a.draining and not b.draining
        hand_over = fleet.hand_over(a)
        assert hand_over is not None
        a.abort(aborted)  # while the move is written: it is not placed anywhere
        await hand_over
        assert fleet.engine_of("waiting") is b and b.scheduler.waiting == [waiting]
        assert not a.scheduler.waiting
        assert a._release_ids == [waiting.seq_id], "a lets the worker release what moved"
        await b.store.flush()
        assert await r.hget(keys.request("waiting"), "worker") == b"w-b"

    scenario(redis_url, body)


def test_no_hand_over_without_a_connected_serving_worker(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        a, b = attach(fleet, r, keys, "w-a"), attach(fleet, r, keys, "w-b", connected=False)
        fleet.place(request("x"), a)
        fleet.set_serving(a, serving=False)
        assert fleet.hand_over(a) is None, "b is not connected: what a accepted runs there"
        b.connected = True
        fleet.set_serving(b, serving=False)
        assert fleet.hand_over(a) is None, "b is draining too"

    scenario(redis_url, body)


def test_submit_through_the_servicer_places_what_admission_accepts(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        service = SchedulerService(pwconfig.SchedulerConfig())
        a = attach(service.fleet, r, keys, "w-a")
        conn = RouterConn()
        assert service.submit(submit("x"), conn) is None
        assert service.fleet.engine_of("x") is a and service.fleet.request("x").conn is conn
        assert service.submit(submit("x"), conn) is not None

    scenario(redis_url, body)
