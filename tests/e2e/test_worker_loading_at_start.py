"""A scheduler that starts while one of its workers is still loading serves with the others at
once, and attaches the late worker (in the background) the moment it serves."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import redis
from e2e_util import (
    HFReference,
    assert_block_invariants,
    greedy_request,
    redis_keys,
    run_concurrently,
)

from pagewire.launcher import Stack, free_port
from pagewire.redis_server import start_redis

PROMPTS = [f"Late worker, request {i}: " + "go on " * i for i in range(6)]
MAX_TOKENS = 16
NUM_BLOCKS = 256


def test_scheduler_serves_at_once_and_attaches_a_worker_that_was_loading(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    stack = Stack(model=str(tiny_model), log_dir=tmp_path)
    workers = [f"worker-{i}" for i in range(2)]
    blocks = ["--num-blocks", str(NUM_BLOCKS)]

    async def scenario() -> tuple[float, list]:
        stack.redis_url = os.environ.get("REDIS_URL", "")
        if not stack.redis_url:
            stack.redis = start_redis()
            stack.redis_url = stack.redis.url
        up = await stack.start_worker(workers[0], blocks)
        late_port, port = free_port(), free_port()
        start = time.monotonic()
        scheduler = await stack.start_service("scheduler", "scheduler_svc.server", [
            "--port", str(port), "--redis-url", stack.redis_url, "--check-invariants",
            "--workers", f"{up.address},127.0.0.1:{late_port}",  # nothing listens there yet
        ], port, timeout=60)
        started = time.monotonic() - start
        await stack.start_router(scheduler, extra=["--routing-policy", "round-robin"])
        await stack.start_service("worker-1", "worker_svc.server", [
            "--model", stack.model, "--port", str(late_port), "--worker-id", workers[1],
            "--redis-url", stack.redis_url, *blocks], late_port, timeout=300)
        deadline = time.monotonic() + 10
        while "attached worker worker-1" not in (tmp_path / "scheduler.log").read_text():
            assert time.monotonic() < deadline, "the late worker was not attached"
            await asyncio.sleep(0.1)
        requests = [greedy_request(p, MAX_TOKENS, ignore_eos=True) for p in PROMPTS]
        for i, r in enumerate(requests):
            r.request_id = f"late-{i}"
        return started, await run_concurrently(stack.router, requests)

    try:
        started, results = asyncio.run(scenario())
        assert started < 10, f"the scheduler took {started:.1f} s to serve"
        for prompt, (ids, _, _) in zip(PROMPTS, results, strict=True):
            assert ids == hf_reference.greedy(hf_reference.tokenizer.encode(prompt), MAX_TOKENS,
                                              stop_at_eos=False)
        keys = redis_keys(tiny_model)
        with redis.Redis.from_url(stack.redis_url) as client:
            placed = {(client.hget(keys.request(f"late-{i}"), "worker") or b"").decode()
                      for i in range(len(PROMPTS))}
        assert placed == set(workers), f"round-robin over both workers once attached: {placed}"
        for w in workers:
            assert_block_invariants(stack.redis_url, tiny_model, w, NUM_BLOCKS)
    finally:
        stack.stop()
