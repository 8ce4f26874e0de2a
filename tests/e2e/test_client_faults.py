"""Clients that misbehave: a hundred that hang up mid-generation, one that stops reading.

Neither may cost the stack or other clients anything. A client that leaves (a cancelled gRPC
call, a closed gRPC connection, a dropped HTTP stream) aborts its request at once: no token is
generated for it a few steps later, every KV block is back in the pool (read from Redis, the
state of record), and the next request is served as before. A client that stops reading holds
back only its own stream (HTTP/2 flow control stops the router's writes to it): other clients
keep their latency, the request still finishes generating and frees its blocks, and when the
reader comes back every token is there.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import pytest
import redis
from e2e_util import assert_block_invariants, greedy_request, launch, redis_keys
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

NUM_BLOCKS, WORKER = 2048, "worker-0"  # 100 requests of 200 tokens need 1,300 blocks
CLIENTS, LONG = 100, 200
SLOW_TOKENS = 1500
# Every message of the slow stream repeats its request id: 1,500 messages of ~150 bytes, over
# three times the 64 KiB HTTP/2 window the reader opens with.
SLOW_REQUEST_ID = "s" * 128
# The reader's window stays at its initial size: no BDP probing to grow it.
SLOW_READER_OPTIONS = [*serving.CHANNEL_OPTIONS, ("grpc.http2.bdp_probe", 0)]


@dataclass
class FaultStack:
    stack: Stack
    http: str  # the router's OpenAI HTTP API
    metrics_port: int  # the scheduler's Prometheus endpoint
    reference: list[int]  # greedy tokens of "after the storm", taken before any fault

    def generated_tokens(self) -> float:
        """Tokens the scheduler has generated since it started, all requests together."""
        samples = scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")
        return sum(s.value for s in samples if s.name == "pagewire:generation_tokens_total")

    def ended(self) -> dict[str, float]:
        """Requests the router has seen end, by finish reason (stop, length, abort, error)."""
        samples = scrape(f"{self.http}/metrics")
        return {
            s.labels["finished_reason"]: s.value
            for s in samples
            if s.name == "pagewire:request_success_total"
        }


def scrape(url: str) -> list[Sample]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


@pytest.fixture(scope="module")
def fault_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    metrics_port, http_port = free_port(), free_port()
    stack = launch(
        tiny_model,
        tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", str(NUM_BLOCKS), "--block-size", "16"],
        scheduler_args=["--check-invariants", "--metrics-port", str(metrics_port)],
        router_args=["--http-port", str(http_port)],
    )  # fmt: skip
    try:
        reference = asyncio.run(greedy(stack.router, "after the storm", 16))
        yield FaultStack(stack, f"http://127.0.0.1:{http_port}", metrics_port, reference)
    finally:
        stack.stop()


def load_figures(stack: Stack, model: Path) -> dict[str, int]:
    """The load the scheduler publishes for the worker in Redis: running, waiting..."""
    client = redis.Redis.from_url(stack.redis_url)
    try:
        raw = client.hgetall(redis_keys(model).worker_load(WORKER))
    finally:
        client.close()
    return {k.decode(): int(float(v)) for k, v in raw.items()}


async def wait_until(check: Callable[[], bool], timeout: float) -> float:
    """Seconds until ``check()`` held; fails the test past ``timeout``."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < timeout, f"not true after {timeout} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


def idle(stack: Stack, model: Path) -> bool:
    figures = load_figures(stack, model)
    return figures.get("running") == 0 and figures.get("waiting") == 0


@dataclass
class Answer:
    ids: list[int]
    text: str
    last: generation_pb2.GenerateResponse
    wire_bytes: int  # serialized size of every message


async def first_token(call: grpc.aio.UnaryStreamCall) -> list[generation_pb2.GenerateResponse]:
    """Read until the first token (the request is running); the messages read."""
    responses = []
    while not any(r.token_ids for r in responses):
        response = await call.read()
        assert response is not grpc.aio.EOF, "stream ended before its first token"
        responses.append(response)
    return responses


async def read_all(
    call: grpc.aio.UnaryStreamCall, read: list[generation_pb2.GenerateResponse] | None = None
) -> Answer:
    """The whole answer: the messages ``read`` already, then the rest of the stream."""
    responses = list(read or [])
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return Answer(
        ids=[t for r in responses for t in r.token_ids],
        text="".join(r.text for r in responses),
        last=responses[-1],
        wire_bytes=sum(r.ByteSize() for r in responses),
    )


async def greedy(address: str, prompt: str, max_tokens: int) -> list[int]:
    async with serving.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return (await read_all(stub.Generate(greedy_request(prompt, max_tokens)))).ids


async def aftermath(fault_stack: FaultStack, model: Path, tokens_at_hang_up: float) -> float:
    """Wait for the scheduler to go idle and its token count to stop; the tokens generated
    after the clients hung up.

    The scheduler runs one step ahead of the worker, so a step already sent when the aborts
    land still completes (its tokens are dropped): the count settles a step or two later.
    """
    await wait_until(lambda: idle(fault_stack.stack, model), timeout=5)
    last = fault_stack.generated_tokens()
    while True:
        await asyncio.sleep(0.5)
        now = fault_stack.generated_tokens()
        if now == last:
            return now - tokens_at_hang_up
        assert now - tokens_at_hang_up < CLIENTS * LONG // 10, "generation goes on"
        last = now


def assert_served_normally(
    fault_stack: FaultStack, model: Path, tokens_after: float, ended_before: dict[str, float]
) -> None:
    """Every client's request ended as an abort, the scheduler stopped generating for them within
    a few steps, every block is back, and the next request is served as before."""
    ended = fault_stack.ended()
    assert ended.get("abort", 0) - ended_before.get("abort", 0) == CLIENTS
    assert ended.get("length", 0) == ended_before.get("length", 0)
    # Finishing would have taken ~199 more tokens each (19,900). A step is 100 tokens; the aborts
    # usually land within 2-8 steps, but a stalled core on a 2-core machine has stretched that
    # to 28 (the router's cancellations wait for its event loop).
    assert tokens_after < CLIENTS * LONG // 4, f"{tokens_after} tokens after the clients left"
    stack = fault_stack.stack
    assert_block_invariants(stack.redis_url, model, WORKER, NUM_BLOCKS)
    assert asyncio.run(greedy(stack.router, "after the storm", 16)) == fault_stack.reference


@pytest.mark.parametrize("hang_up", ["cancel", "close_connection"])
def test_grpc_clients_that_hang_up_mid_generation_are_aborted_and_their_blocks_freed(
    fault_stack: FaultStack, tiny_model: Path, hang_up: str
) -> None:
    ended_before = fault_stack.ended()

    async def scenario() -> tuple[list[grpc.StatusCode], float]:
        channels = [serving.insecure_channel(fault_stack.stack.router) for _ in range(CLIENTS)]
        try:
            calls = [
                generation_pb2_grpc.GenerationStub(ch).Generate(
                    greedy_request(f"client {i} tells a long story", LONG, ignore_eos=True))
                for i, ch in enumerate(channels)
            ]  # fmt: skip
            await asyncio.gather(*(first_token(c) for c in calls))
            tokens_at_hang_up = fault_stack.generated_tokens()
            if hang_up == "cancel":
                for call in calls:
                    call.cancel()
            else:
                await asyncio.gather(*(ch.close() for ch in channels))
            codes = [await call.code() for call in calls]
        finally:
            await asyncio.gather(*(ch.close() for ch in channels))
        return codes, await aftermath(fault_stack, tiny_model, tokens_at_hang_up)

    codes, tokens_after = asyncio.run(scenario())
    assert codes == [grpc.StatusCode.CANCELLED] * CLIENTS
    assert_served_normally(fault_stack, tiny_model, tokens_after, ended_before)


def test_http_clients_that_drop_the_connection_mid_stream_are_aborted_and_their_blocks_freed(
    fault_stack: FaultStack, tiny_model: Path
) -> None:
    url = f"{fault_stack.http}/v1/completions"
    ended_before = fault_stack.ended()

    async def first_event(session: aiohttp.ClientSession, i: int) -> None:
        body = {"prompt": f"client {i} streams a long story", "max_tokens": LONG,
                "ignore_eos": True, "temperature": 0, "stream": True}  # fmt: skip
        response = await session.post(url, json=body)
        assert response.status == 200
        while not (await response.content.readline()).startswith(b"data: "):
            pass

    async def scenario() -> float:
        sessions = [aiohttp.ClientSession() for _ in range(CLIENTS)]  # a connection each
        try:
            await asyncio.gather(*(first_event(s, i) for i, s in enumerate(sessions)))
            tokens_at_hang_up = fault_stack.generated_tokens()
        finally:
            await asyncio.gather(*(s.close() for s in sessions))
        return await aftermath(fault_stack, tiny_model, tokens_at_hang_up)

    tokens_after = asyncio.run(scenario())
    assert_served_normally(fault_stack, tiny_model, tokens_after, ended_before)


async def others_latencies(channel: grpc.aio.Channel, n: int = 8) -> list[float]:
    """Seconds each of ``n`` concurrent short requests takes, start to last message."""
    stub = generation_pb2_grpc.GenerationStub(channel)

    async def one(i: int) -> float:
        start = time.monotonic()
        answer = await read_all(stub.Generate(greedy_request(f"other {i}", 32)))
        assert len(answer.ids) == 32
        assert answer.last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        return time.monotonic() - start

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def test_a_client_that_stops_reading_delays_no_one_and_loses_nothing(
    fault_stack: FaultStack, tiny_model: Path
) -> None:
    stack = fault_stack.stack
    request = greedy_request("a slow reader's story", SLOW_TOKENS, ignore_eos=True)
    request.request_id = SLOW_REQUEST_ID

    async def read_normally() -> tuple[Answer, list[float]]:
        """The long request read as it comes, and the others' latency meanwhile."""
        async with serving.insecure_channel(stack.router) as reader, \
                serving.insecure_channel(stack.router) as others:  # fmt: skip
            call = generation_pb2_grpc.GenerationStub(reader).Generate(request)
            reading = asyncio.create_task(read_all(call, await first_token(call)))
            latencies = await others_latencies(others)
            return await reading, latencies

    async def read_late() -> tuple[Answer, list[float]]:
        """The long request left unread until it has finished generating."""
        async with grpc.aio.insecure_channel(stack.router, options=SLOW_READER_OPTIONS) as reader, \
                serving.insecure_channel(stack.router) as others:  # fmt: skip
            call = generation_pb2_grpc.GenerationStub(reader).Generate(request)
            read = await first_token(call)
            latencies = await others_latencies(others)
            await wait_until(lambda: idle(stack, tiny_model), timeout=120)
            # Generation is over and every block is back, though the client has read nothing.
            await asyncio.to_thread(
                assert_block_invariants, stack.redis_url, tiny_model, WORKER, NUM_BLOCKS)
            return await read_all(call, read), latencies

    normal, baseline = asyncio.run(read_normally())
    late, latencies = asyncio.run(read_late())

    assert normal.wire_bytes > 3 * 65536, "the stream must overrun the reader's HTTP/2 window"
    assert len(normal.ids) == normal.last.usage.completion_tokens == SLOW_TOKENS
    assert (late.ids, late.text) == (normal.ids, normal.text), "the late reader lost tokens"
    assert late.last.finish_reason == normal.last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert late.last.usage.completion_tokens == SLOW_TOKENS
    assert max(latencies) < 3 * max(baseline) + 2.0, (latencies, baseline)
    assert_block_invariants(stack.redis_url, tiny_model, WORKER, NUM_BLOCKS)
