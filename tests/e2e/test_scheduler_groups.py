"""Two scheduler groups behind one router, through real processes.

Each group is a scheduler (``--group a`` / ``--group b``) driving its own worker; the router has no
``--scheduler`` and finds both in Redis. Which worker (so which group) served a prompt is read from
Redis: a worker's prefix index holds the hash of a prompt's first block only if that worker
computed it, and only its group's scheduler writes that index.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from e2e_util import (
    HFReference,
    assert_block_invariants,
    generate,
    greedy_request,
    launch_groups,
    redis_keys,
    run_concurrently,
)

from pagewire import serving
from pagewire.block_hash import prompt_block_hashes
from pagewire.launcher import Stack, free_port
from pagewire.v1 import generation_pb2_grpc

GROUPS = ["a", "b"]
WORKERS = [f"worker-{g}" for g in GROUPS]
BLOCK, NUM_BLOCKS = 16, 512
LEASE_TTL_S = 2.0

# Long shared prefixes (system prompts of different tenants), each several blocks long.
TENANTS = ["billing", "weather", "recipes", "chess", "travel", "poetry"]


def tenant_prefix(name: str) -> str:
    return f"You are the {name} assistant. Answer {name} questions briefly and politely. " * 3


@pytest.fixture(scope="module")
def groups(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = launch_groups(
        tiny_model, tmp_path_factory.mktemp("logs"), GROUPS,
        worker_args=["--num-blocks", str(NUM_BLOCKS), "--block-size", str(BLOCK)],
        scheduler_args=["--check-invariants", "--lease-ttl-s", str(LEASE_TTL_S)],
    )
    try:
        yield s
    finally:
        s.stop()


def served_by(stack: Stack, model: Path, hf: HFReference, prompt: str) -> set[str]:
    """The workers whose prefix index holds the prompt's first block: where it was computed."""
    first = prompt_block_hashes(hf.tokenizer.encode(prompt), BLOCK)[0]
    keys = redis_keys(model)
    client = redis.Redis.from_url(stack.redis_url)
    try:
        return {w for w in WORKERS if client.hexists(keys.prefix_index(w), first)}
    finally:
        client.close()


def check_invariants(stack: Stack, model: Path) -> None:
    for worker in WORKERS:
        assert_block_invariants(stack.redis_url, model, worker, NUM_BLOCKS)


def test_cold_prefixes_spread_over_both_groups_with_outputs_identical_to_transformers(
    groups: Stack, tiny_model: Path, hf_reference: HFReference
) -> None:
    prompts = [f"Cold prompt {i}: " + "tell me something new about the sea " * (1 + i % 3)
               for i in range(8)]
    results = asyncio.run(run_concurrently(groups.router, [greedy_request(p, 16) for p in prompts]))
    for prompt, (ids, _, last) in zip(prompts, results, strict=True):
        assert ids == hf_reference.greedy(hf_reference.tokenizer.encode(prompt), 16), prompt
        assert last.usage.cached_tokens == 0
    homes = [served_by(groups, tiny_model, hf_reference, p) for p in prompts]
    assert all(len(h) == 1 for h in homes), homes  # each prompt ran on exactly one worker
    assert {w for h in homes for w in h} == set(WORKERS), "both groups receive cold work"
    check_invariants(groups, tiny_model)


def test_repeated_prefix_goes_to_the_group_whose_worker_caches_it(
    groups: Stack, tiny_model: Path, hf_reference: HFReference
) -> None:
    tok = hf_reference.tokenizer
    first = {t: tenant_prefix(t) + "What can you do?" for t in TENANTS}
    for prompt in first.values():  # one at a time: an idle fleet, each prefix seen once
        [(ids, _, last)] = asyncio.run(run_concurrently(groups.router, [greedy_request(prompt, 8)]))
        assert last.usage.cached_tokens == 0
        assert ids == hf_reference.greedy(tok.encode(prompt), 8)
    home = {t: served_by(groups, tiny_model, hf_reference, p) for t, p in first.items()}
    assert sorted(len(h) for h in home.values()) == [1] * len(TENANTS)
    assert {w for h in home.values() for w in h} == set(WORKERS), (
        "each group must have seen some prefix first", home)

    for t in TENANTS:
        again = tenant_prefix(t) + "Tell me a fact, please."
        [(ids, _, last)] = asyncio.run(run_concurrently(groups.router, [greedy_request(again, 8)]))
        a, b = tok.encode(first[t]), tok.encode(again)
        shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
        assert last.usage.cached_tokens == shared // BLOCK * BLOCK > 0, t
        assert ids == hf_reference.greedy(b, 8)
        assert served_by(groups, tiny_model, hf_reference, again) == home[t], (
            f"{t}: the prefix must stay on the worker that caches it")
    check_invariants(groups, tiny_model)


def test_standby_scheduler_takes_a_group_over_mid_generation(
    groups: Stack, tiny_model: Path, hf_reference: HFReference
) -> None:
    """SIGKILL group a's scheduler mid-generation: new work goes to group b while a has no
    scheduler; a standby at another address takes a's lease, the router follows it there, and
    every stream of both groups completes with nothing lost or repeated."""
    max_tokens = 96
    prompts = [f"Takeover {i}: " + "a story about two ships " * (1 + i % 4) for i in range(8)]
    keys = redis_keys(tiny_model)
    client = redis.Redis.from_url(groups.redis_url)

    async def scenario() -> tuple[list[list[int]], list[str]]:
        outputs: list[list[int]] = [[] for _ in prompts]
        async with serving.insecure_channel(groups.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)

            async def stream(prompt: str, out: list[int]) -> None:
                async for resp in stub.Generate(greedy_request(prompt, max_tokens, ignore_eos=True)):
                    out.extend(resp.token_ids)

            tasks = [asyncio.create_task(stream(p, o)) for p, o in zip(prompts, outputs, strict=True)]
            while not all(len(o) >= 2 for o in outputs):
                assert not any(t.done() for t in tasks), "a stream ended before the fault"
                await asyncio.sleep(0.01)
            old = groups.service("scheduler-a")
            old.process.kill()
            old.process.wait()
            assert all(len(o) < max_tokens for o in outputs), "the fault must come mid-generation"
            deadline = time.monotonic() + 5 * LEASE_TTL_S
            while client.exists(keys.scheduler_lease("a")):
                assert time.monotonic() < deadline, "group a's lease never lapsed"
                await asyncio.sleep(0.1)
            await asyncio.sleep(2.5)  # past the router's next read of the group directory
            # Group a has no scheduler: new prompts complete at once, so none went to it.
            fresh = [f"While a is down {i}: " + "what is a lighthouse? " * 2 for i in range(3)]
            done = await asyncio.wait_for(
                asyncio.gather(*(generate(stub, greedy_request(p, 8)) for p in fresh)), 60)
            assert [ids for ids, _, _ in done] == [
                hf_reference.greedy(hf_reference.tokenizer.encode(p), 8) for p in fresh]
            port = free_port()
            await groups.start_service(
                "scheduler-a-standby", "scheduler_svc.server",
                ["--port", str(port), "--redis-url", groups.redis_url, "--workers",
                 groups.service("worker-a").address, "--group", "a", "--check-invariants",
                 "--lease-ttl-s", str(LEASE_TTL_S)], port)
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
        return outputs, fresh

    try:
        outputs, fresh = asyncio.run(scenario())
    finally:
        client.close()
    for prompt, ids in zip(prompts, outputs, strict=True):
        expected = hf_reference.greedy(hf_reference.tokenizer.encode(prompt), max_tokens, stop_at_eos=False)
        assert ids == expected, f"{prompt!r}: {len(ids)} tokens, lost or repeated across the takeover"
    assert all(served_by(groups, tiny_model, hf_reference, p) == {"worker-b"} for p in fresh)
    on_a = [p for p in prompts if served_by(groups, tiny_model, hf_reference, p) == {"worker-a"}]
    assert on_a, "some streams must have run on group a through the takeover"
    # The router sends group a's work to the standby now: a cached prefix there is found.
    [(ids, _, last)] = asyncio.run(run_concurrently(groups.router, [greedy_request(on_a[0], 4)]))
    assert last.usage.cached_tokens > 0
    assert ids == hf_reference.greedy(hf_reference.tokenizer.encode(on_a[0]), 4)
    check_invariants(groups, tiny_model)
    log = (groups.log_dir / "router.log").read_text()  # type: ignore[operator]
    assert "scheduler group a moved from" in log
