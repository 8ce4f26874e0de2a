"""The Redis client layer against real servers: the right client per URL, and one clear line for
each way a store can be misconfigured -- never the password."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from pagewire import redis_client
from pagewire.redis_cluster import RedisCluster


def connect(url: str) -> redis_client.Client:
    async def run() -> redis_client.Client:
        r = await redis_client.connect(url)
        await r.aclose()
        return r

    return asyncio.run(run())


def refusal(url: str) -> str:
    with pytest.raises(redis_client.RedisSetupError) as e:
        connect(url)
    return str(e.value)


def test_the_url_chooses_the_client(cluster: RedisCluster, redis_url: str) -> None:
    assert isinstance(connect(cluster.url(1)), aioredis.RedisCluster)
    assert type(connect(redis_url)) is aioredis.Redis


def test_a_cluster_node_behind_a_plain_url_is_refused_naming_the_cluster_url(
    cluster: RedisCluster,
) -> None:
    text = refusal(cluster.url(2).replace("redis+cluster://", "redis://"))
    assert "is a Redis Cluster node" in text and cluster.url(2) in text


def test_a_cluster_url_to_a_plain_server_is_refused(cluster: RedisCluster, redis_url: str) -> None:
    assert "over TCP" in refusal(redis_url.replace("unix://", "redis+cluster://"))


def test_an_unreachable_store_says_where(cluster: RedisCluster) -> None:
    dead = cluster.url(0).rsplit(":", 1)[0] + ":1"
    assert refusal(dead).startswith(f"cannot reach Redis at {dead}")


def test_the_password_is_never_printed() -> None:
    assert redis_client.redact("redis://:hunter2@h:1/0") == "redis://:***@h:1/0"
    assert redis_client.redact("unix:///s.sock?db=0&password=hunter2") == "unix:///s.sock?db=0&password=***"
    assert "hunter2" not in refusal("redis+cluster://:hunter2@127.0.0.1:1")
