"""Admission: what a SubmitRequest becomes (a request for a chosen worker) or why it is refused,
decided before anything is placed."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis
from fleet_util import attach, scenario, submit, worker_info

from pagewire.redis_keys import RedisKeys
from pagewire.v1 import common_pb2
from scheduler_svc.admission import Admitted, Refusal, admit
from scheduler_svc.events import RouterConn
from scheduler_svc.fleet import Fleet


def admit_one(fleet: Fleet, sub, shutting_down: bool = False, max_queue: int = 8):  # type: ignore[no-untyped-def]
    return admit(sub, fleet, RouterConn(), group="g", max_queue=max_queue,
                 shutting_down=shutting_down)


def refused(found: Admitted | Refusal, code: grpc.StatusCode, *words: str) -> None:
    assert isinstance(found, Refusal), found
    assert found.code == code, found
    for word in words:
        assert word in found.text, found


def test_admitted_request_goes_to_the_routers_choice_with_its_fields(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        attach(fleet, r, keys, "w-a")
        b = attach(fleet, r, keys, "w-b")
        sub = submit("x", "w-b", priority=3, trace_context={"traceparent": "t"})
        found = admit_one(fleet, sub)
        assert isinstance(found, Admitted) and found.engine is b
        req = found.request
        assert (req.request_id, req.prompt, req.priority) == ("x", [5, 6, 7], 3)
        assert req.params.max_tokens == 8 and req.trace_context == {"traceparent": "t"}
        assert fleet.request("x") is None, "admission places nothing"

    scenario(redis_url, body)


def test_embedding_request_samples_nothing(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        attach(fleet, r, keys, "w-a")
        found = admit_one(fleet, submit("e", pooling=common_pb2.POOLING_MEAN))
        assert isinstance(found, Admitted)
        assert found.request.params.max_tokens == 1 and found.request.pooling == common_pb2.POOLING_MEAN

    scenario(redis_url, body)


@pytest.mark.parametrize(("sub", "code", "words"), [
    (submit(""), grpc.StatusCode.INVALID_ARGUMENT, ("request_id",)),
    (submit("p", prompt_len=0), grpc.StatusCode.INVALID_ARGUMENT, ("prompt_token_ids",)),
    (submit("long", prompt_len=500, max_tokens=20), grpc.StatusCode.INVALID_ARGUMENT,
     ("max_tokens", "<= 512")),
])
def test_malformed_and_too_long_requests_are_invalid_argument(
    redis_url: str, sub, code: grpc.StatusCode, words: tuple[str, ...],  # type: ignore[no-untyped-def]
) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        attach(fleet, r, keys, "w-a")
        refused(admit_one(fleet, sub), code, *words)

    scenario(redis_url, body)


def test_request_that_could_never_fit_the_kv_pool_names_the_blocks(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        attach(fleet, r, keys, "w-a", info=worker_info("w-a", num_blocks=4))
        # 3 + 14 = 17 tokens: 5 blocks of 4, the worker has 4.
        refused(admit_one(fleet, submit("big", max_tokens=14)), grpc.StatusCode.INVALID_ARGUMENT,
                "max_tokens", "needs 5 KV blocks", "w-a has 4")
        assert isinstance(admit_one(fleet, submit("fits", max_tokens=13)), Admitted)

    scenario(redis_url, body)


def test_duplicate_id_is_already_exists_and_shutdown_is_unavailable(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        attach(fleet, r, keys, "w-a")
        found = admit_one(fleet, submit("x"))
        assert isinstance(found, Admitted)
        fleet.place(*found)
        refused(admit_one(fleet, submit("x")), grpc.StatusCode.ALREADY_EXISTS, "'x' is in flight")
        refused(admit_one(fleet, submit("y"), shutting_down=True), grpc.StatusCode.UNAVAILABLE,
                "shutting down")

    scenario(redis_url, body)


def test_no_worker_or_every_worker_draining_is_unavailable(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        refused(admit_one(fleet, submit("x")), grpc.StatusCode.UNAVAILABLE, "no worker available")
        a = attach(fleet, r, keys, "w-a")
        fleet.set_serving(a, serving=False)
        refused(admit_one(fleet, submit("x")), grpc.StatusCode.UNAVAILABLE,
                "every worker of group 'g' is draining", "retry")

    scenario(redis_url, body)


def test_full_queue_is_resource_exhausted(redis_url: str) -> None:
    async def body(r: aioredis.Redis, keys: RedisKeys) -> None:
        fleet = Fleet()
        attach(fleet, r, keys, "w-a")
        for i in range(2):
            fleet.place(*admit_one(fleet, submit(f"q{i}"), max_queue=2))
        refused(admit_one(fleet, submit("q2"), max_queue=2), grpc.StatusCode.RESOURCE_EXHAUSTED,
                "queue full: 2 requests waiting")

    scenario(redis_url, body)
