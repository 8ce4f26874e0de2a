"""Redis restarts (empty) mid-generation: the scheduler holds its events, rewrites its state from
memory when Redis is back, and every stream completes with no token lost or repeated. Redis
silent for longer than the scheduler's bound: its health says NOT_SERVING until Redis answers.

Runs against the null worker (the real Worker service without a model), which keeps hundreds of
steps per second going so the outage lands mid-stream; the model path is covered by the other
fault tests.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from e2e_util import assert_block_invariants
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.redis_server import start_redis
from pagewire.v1 import common_pb2, scheduler_pb2, scheduler_pb2_grpc

NUM_BLOCKS = 4096
REQUESTS = 16
MAX_TOKENS = 1500


async def stream_through_restart(address: str, restart: object) -> dict[str, list[int]]:
    """Submit on one Connect stream like a router; restart Redis once all are mid-stream."""
    indices: dict[str, list[int]] = {f"r{i}": [] for i in range(REQUESTS)}
    finished: dict[str, int] = {}
    outgoing: asyncio.Queue[scheduler_pb2.RouterMessage] = asyncio.Queue()
    for i, rid in enumerate(indices):
        outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=scheduler_pb2.SubmitRequest(
            request_id=rid, prompt_token_ids=[100 + i, 200, 300, 400, 500],
            sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
        )))

    async def messages() -> AsyncIterator[scheduler_pb2.RouterMessage]:
        while True:
            yield await outgoing.get()

    async with serving.insecure_channel(address) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).Connect(messages())

        async def consume() -> None:
            async for batch in call:
                for e in batch.events:
                    assert not e.error_code, e.error_message
                    indices[e.request_id] += range(e.index, e.index + len(e.token_ids))
                    if e.finish_reason:
                        finished[e.request_id] = e.finish_reason
                for rid, index in zip(batch.token_request_ids, batch.token_indices, strict=True):
                    indices[rid].append(index)
                if len(finished) == REQUESTS:
                    return

        consumer = asyncio.create_task(consume())
        while min(map(len, indices.values())) < 50:
            assert not consumer.done()
            await asyncio.sleep(0.01)
        assert max(map(len, indices.values())) < MAX_TOKENS, "the outage must come mid-stream"
        await asyncio.to_thread(restart)  # type: ignore[arg-type]
        await asyncio.wait_for(consumer, 120)
        call.cancel()
    assert set(finished.values()) == {common_pb2.FINISH_REASON_LENGTH}
    return indices


async def start_null_stack(stack: Stack, *scheduler_args: str) -> str:
    """A null worker and a scheduler over it; the scheduler's address."""
    port = free_port()
    worker = await stack.start_service(
        "worker", "worker_svc.null_worker",
        ["--port", str(port), "--worker-id", "null-0", "--num-blocks", str(NUM_BLOCKS)], port)
    sched = await stack.start_scheduler(
        [worker], ["--model-name", "null", "--check-invariants", *scheduler_args])
    return sched.address


def test_redis_restart_mid_generation_loses_and_repeats_nothing(tmp_path: Path) -> None:
    rs = start_redis()
    stack = Stack(model="null", redis_url=rs.url, log_dir=tmp_path)
    try:
        address = asyncio.run(start_null_stack(stack))
        indices = asyncio.run(stream_through_restart(address, rs.restart))
        for rid, seen in indices.items():
            assert seen == list(range(MAX_TOKENS)), f"{rid}: tokens lost or repeated"
        log = (tmp_path / "scheduler.log").read_text()
        assert "state rewritten" in log, "the outage was not noticed: the test proves nothing"
        assert_block_invariants(rs.url, Path("null"), "null-0", NUM_BLOCKS)
    finally:
        stack.stop()
        rs.stop()


def scheduler_health(address: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status


def test_redis_silent_past_the_bound_turns_scheduler_not_serving_until_it_answers(
    tmp_path: Path,
) -> None:
    """Redis frozen (SIGSTOP: connections open, no answers) for longer than --store-timeout-s:
    the scheduler's health says NOT_SERVING while its streams wait, SERVING once Redis answers,
    and the streams then finish with nothing lost or repeated."""
    rs = start_redis()
    stack = Stack(model="null", redis_url=rs.url, log_dir=tmp_path)
    try:
        address = asyncio.run(start_null_stack(stack, "--store-timeout-s", "1"))
        seen: list[int] = []

        def freeze() -> None:
            rs.process.send_signal(signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 10
                while scheduler_health(address) == health_pb2.HealthCheckResponse.SERVING:
                    assert time.monotonic() < deadline, "still SERVING with Redis silent"
                    time.sleep(0.1)
                seen.append(scheduler_health(address))
            finally:
                rs.process.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 10
            while scheduler_health(address) != health_pb2.HealthCheckResponse.SERVING:
                assert time.monotonic() < deadline, "not SERVING again with Redis back"
                time.sleep(0.1)

        indices = asyncio.run(stream_through_restart(address, freeze))
        assert seen == [health_pb2.HealthCheckResponse.NOT_SERVING]
        for rid, got in indices.items():
            assert got == list(range(MAX_TOKENS)), f"{rid}: tokens lost or repeated"
        assert_block_invariants(rs.url, Path("null"), "null-0", NUM_BLOCKS)
    finally:
        stack.stop()
        rs.process.send_signal(signal.SIGCONT)
        rs.stop()
