"""The state store against a real Redis: what one step's flush leaves there, and reloading it."""

from __future__ import annotations

import asyncio
from array import array

import redis
import redis.asyncio as aioredis

from pagewire.redis_keys import RedisKeys
from pagewire.sampling import SamplingParams
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.state_store import StateStore

KEYS = RedisKeys("test", "model")


def run(redis_url: str, steps) -> None:  # type: ignore[no-untyped-def]
    async def body() -> None:
        client = aioredis.Redis.from_url(redis_url)
        try:
            await steps(StateStore(client, KEYS, "w0"))
        finally:
            await client.aclose()

    asyncio.run(body())


def unpacked(raw: bytes) -> list[int]:
    values = array("i")
    values.frombytes(raw)
    return values.tolist()


def sampled(store: StateStore, req: Request, tokens: list[int]) -> None:
    """The worker sampled ``tokens`` for ``req``: the engine appends them and queues the write."""
    req.output.extend(tokens)
    store.generated([req])
    req.num_delivered = len(req.output)


def test_one_flush_records_tables_tokens_and_block_places(redis_client: redis.Redis, redis_url: str) -> None:
    pool = BlockPool(8)
    a = Request("a", [1, 2, 3], SamplingParams(temperature=0.5, max_tokens=7, seed=3), priority=2,
                cache_salt=b"tenant-a")
    b = Request("b", [4, 5], SamplingParams())

    async def steps(store: StateStore) -> None:
        await store.reset("inst-1", 8)
        for req in (a, b):
            store.admitted(req)
            req.block_table = pool.allocate(2)
            store.table(req)
        store.appended(a, [a_extra := pool.allocate(1)[0]])
        a.block_table.append(a_extra)
        sampled(store, a, [10, 11])
        sampled(store, b, [20])
        sampled(store, a, [12])
        pool.register(a.block_table[0], b"h" * 16)
        store.blocks(pool)
        await store.flush()

    run(redis_url, steps)
    # A step's tokens are one append to the worker's token log, as (handle, token) pairs.
    log = array("i")
    log.frombytes(redis_client.get(KEYS.token_log("w0")))
    assert log.tolist() == [a.seq_id, 10, a.seq_id, 11, b.seq_id, 20, a.seq_id, 12]
    assert [int(x) for x in redis_client.lrange(KEYS.request_blocks("a"), 0, -1)] == a.block_table
    free = {int(x) for x in redis_client.smembers(KEYS.free_blocks("w0"))}
    assert free == set(range(8)) - set(a.block_table) - set(b.block_table)
    assert redis_client.hget(KEYS.prefix_index("w0"), b"h" * 16) == str(a.block_table[0]).encode()

    async def reload(store: StateStore) -> None:
        stored = await store.load()
        assert stored is not None and stored.instance_id == "inst-1" and stored.num_blocks == 8
        by_id = {r.request_id: r for r in stored.requests}
        assert by_id["a"].output == [10, 11, 12] and by_id["a"].block_table == a.block_table
        assert by_id["a"].params == a.params and by_id["a"].priority == 2
        assert by_id["b"].prompt == [4, 5]
        assert (by_id["a"].cache_salt, by_id["b"].cache_salt) == (b"tenant-a", b"")
        assert stored.index == {b"h" * 16: a.block_table[0]}

    run(redis_url, reload)


def test_finished_request_frees_blocks_but_keeps_output_for_a_while(
    redis_client: redis.Redis, redis_url: str
) -> None:
    pool = BlockPool(4)
    a = Request("a", [1], SamplingParams())

    async def steps(store: StateStore) -> None:
        await store.reset("i", 4)
        store.admitted(a)
        a.block_table = pool.allocate(1)
        store.table(a)
        sampled(store, a, [5])
        await store.flush()
        pool.release(a.block_table)
        a.finish_reason = 2
        sampled(store, a, [6])
        store.finished(a)
        store.blocks(pool)
        await store.flush()

    run(redis_url, steps)
    assert not redis_client.exists(KEYS.request_blocks("a"))
    assert redis_client.scard(KEYS.free_blocks("w0")) == 4
    assert unpacked(redis_client.get(KEYS.request_tokens("a"))) == [5, 6]
    assert 0 < redis_client.ttl(KEYS.request_tokens("a")) <= 120
    assert not redis_client.sismember(KEYS.requests(), "a")


def test_checkpoint_moves_logged_tokens_into_request_lists(redis_client: redis.Redis, redis_url: str) -> None:
    a = Request("a", [1, 2], SamplingParams())

    async def steps(store: StateStore) -> None:
        await store.reset("i", 4)
        store.admitted(a)
        sampled(store, a, [5, 6])
        await store.flush()
        store.checkpoint([a])
        sampled(store, a, [7])
        await store.flush()

    run(redis_url, steps)
    assert unpacked(redis_client.get(KEYS.request_tokens("a"))) == [5, 6]
    log = array("i")
    log.frombytes(redis_client.get(KEYS.token_log("w0")))
    assert log.tolist() == [a.seq_id, 7], "the log holds only what came after the checkpoint"

    async def reload(store: StateStore) -> None:
        stored = await store.load()
        assert stored is not None
        [req] = stored.requests
        assert req.output == [5, 6, 7] and req.num_checkpointed == 2

    run(redis_url, reload)
