"""The seconds after an outage, through real processes: Redis restarting empty, a scheduler away.

- Redis restarted empty, twice in a row, while two streams run: both workers stay attached
  (a heartbeat key gone before its TTL is Redis's loss, not the worker's), nothing recomputes,
  every stream (cut a little after the restarts) is identical to transformers so far.
- Right after an empty restart, before any worker has beaten again, a new request is served
  (the router's registry is empty, and the scheduler places it), and Redis's block bookkeeping
  is whole again even though the scheduler was idle when Redis lost it.
- With its scheduler down, a router refuses a new request UNAVAILABLE at once (it would hold it
  until the resume timeout); once the scheduler is back, requests are served again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from e2e_util import (
    HFReference,
    assert_block_invariants,
    greedy_request,
    launch,
    run_concurrently,
    stream_into,
)

from pagewire import serving
from pagewire.launcher import Stack
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

NUM_BLOCKS = 256
PROMPTS = ["Through the outage, a first stream", "and a second one beside it"]
# Far more than the first test waits for: its streams are cut once they are AFTER tokens past the
# restarts, so the restarts come mid-stream however fast the machine generates.
MAX_TOKENS = 1500
AFTER = 40


@pytest.fixture(scope="module")
def outage_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Two workers beating every 4 s (TTL 12 s) under a scheduler that checks every 0.5 s: after
    an empty restart, a check always comes before the workers' next beat."""
    stack = launch(tiny_model, tmp_path_factory.mktemp("logs"), num_workers=2,
                   worker_args=["--num-blocks", str(NUM_BLOCKS), "--heartbeat-s", "4"],
                   scheduler_args=["--check-invariants", "--heartbeat-check-s", "0.5"])
    try:
        yield stack
    finally:
        stack.stop()


def scheduler_log(stack: Stack) -> str:
    assert stack.log_dir is not None
    return (stack.log_dir / "scheduler.log").read_text()


def test_empty_redis_restarts_keep_healthy_workers_attached(
    outage_stack: Stack, hf_reference: HFReference
) -> None:
    stack = outage_stack
    assert stack.redis is not None
    requests = [generation_pb2.GenerateRequest(text=p, sampling=common_pb2.SamplingParams(
        temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)) for p in PROMPTS]

    async def run() -> list[list[int]]:
        got: list[list[int]] = [[] for _ in requests]
        async with serving.insecure_channel(stack.router) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            tasks = [asyncio.create_task(stream_into(stub, r, g)) for r, g in zip(requests, got, strict=True)]

            async def until(least: list[int]) -> None:
                while any(len(g) < n for g, n in zip(got, least, strict=True)):
                    assert not any(t.done() for t in tasks), "a stream ended early"
                    await asyncio.sleep(0.01)

            await until([3] * len(got))
            for _ in range(2):
                await asyncio.to_thread(stack.redis.restart)  # type: ignore[union-attr]
                await asyncio.sleep(0.6)
            await until([len(g) + AFTER for g in got])  # and they go on after
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return [list(g) for g in got]

    got = asyncio.run(run())
    for prompt, ids in zip(PROMPTS, got, strict=True):
        assert AFTER < len(ids) < MAX_TOKENS
        assert ids == hf_reference.greedy(hf_reference.tokenizer.encode(prompt), len(ids),
                                          stop_at_eos=False)
    log = scheduler_log(stack)
    assert "state rewritten" in log, "no restart was noticed: the test proves nothing"
    assert "lost:" not in log and "moved" not in log, "a healthy worker was declared lost"


def test_new_request_right_after_an_empty_redis_restart_is_served(
    outage_stack: Stack, tiny_model: Path
) -> None:
    stack = outage_stack
    assert stack.redis is not None
    asyncio.run(run_concurrently(stack.router, [greedy_request("warm up", 4)]))
    time.sleep(1.0)  # the scheduler is idle: no write is in flight to notice the restart
    stack.redis.restart()
    [(ids, _, last)] = asyncio.run(run_concurrently(stack.router, [greedy_request("just after", 8)]))
    assert last.finish_reason in (common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP)
    assert ids
    for worker in ("worker-0", "worker-1"):  # rewritten from the scheduler's memory
        assert_block_invariants(stack.redis_url, tiny_model, worker, NUM_BLOCKS, timeout=10)
    assert "lost:" not in scheduler_log(stack)


def test_router_without_its_scheduler_refuses_at_once_and_serves_once_it_is_back(
    outage_stack: Stack,
) -> None:
    stack = outage_stack
    scheduler = stack.service("scheduler")
    scheduler.process.kill()
    scheduler.process.wait()
    time.sleep(0.5)  # the router's stream breaks
    start = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(run_concurrently(stack.router, [greedy_request("nobody schedules this", 4)]))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "scheduler" in refused.value.details()
    assert time.monotonic() - start < 5, "held instead of refused"
    asyncio.run(stack.restart("scheduler"))
    deadline = time.monotonic() + 30
    while True:  # the router reconnects within a fraction of a second of the scheduler serving
        try:
            [(ids, _, _)] = asyncio.run(run_concurrently(stack.router, [greedy_request("back", 4)]))
            break
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline
            time.sleep(0.2)
    assert ids
