"""A request id reused while its request is in flight: the second request is refused, and the
first one is not harmed -- whether the duplicate comes through the same router (gRPC or HTTP
``X-Request-Id``) or from another router straight to the scheduler."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from e2e_util import HFReference, assert_block_invariants, launch, stream_into

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
    scheduler_pb2_grpc,
)

MAX_TOKENS = 600
PROMPT = "The one request whose id a retrying gateway reused"


@pytest.fixture(scope="module")
def http_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    port = free_port()
    stack = launch(tiny_model, tmp_path_factory.mktemp("logs"),
                   worker_args=["--num-blocks", "256"], scheduler_args=["--check-invariants"],
                   router_args=["--http-port", str(port)])
    try:
        yield stack, port
    finally:
        stack.stop()


def post_completion(port: int, rid: str) -> tuple[int, dict]:
    body = json.dumps({"prompt": "another prompt", "max_tokens": 4}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", body, method="POST",
                                 headers={"Content-Type": "application/json", "X-Request-Id": rid})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


async def duplicate_at_scheduler(address: str, rid: str) -> scheduler_pb2.TokenEvent:
    """What a second router does with a duplicate id: submit it, get refused, abort it."""
    outgoing: asyncio.Queue[scheduler_pb2.RouterMessage] = asyncio.Queue()
    outgoing.put_nowait(scheduler_pb2.RouterMessage(submit=scheduler_pb2.SubmitRequest(
        request_id=rid, prompt_token_ids=[5, 6, 7],
        sampling=common_pb2.SamplingParams(max_tokens=4))))

    async def messages() -> AsyncIterator[scheduler_pb2.RouterMessage]:
        while True:
            yield await outgoing.get()

    async with serving.insecure_channel(address) as ch:
        call = scheduler_pb2_grpc.SchedulerStub(ch).Connect(messages())
        batch = await asyncio.wait_for(call.read(), 30)
        refusal = batch.events[0]
        outgoing.put_nowait(scheduler_pb2.RouterMessage(abort=scheduler_pb2.AbortRequest(request_id=rid)))
        await asyncio.sleep(0.3)  # let the abort arrive before this "router" goes away
        call.cancel()
    return refusal


def test_reused_in_flight_request_id_is_refused_and_first_stream_completes(
    http_stack: tuple[Stack, int], tiny_model: Path, hf_reference: HFReference
) -> None:
    stack, http_port = http_stack
    rid = "reused-id-1"
    first = generation_pb2.GenerateRequest(
        text=PROMPT, request_id=rid,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True))

    async def run() -> tuple[list[int], generation_pb2.GenerateResponse]:
        got: list[int] = []
        async with serving.insecure_channel(stack.router) as ch:
            stub = generation_pb2_grpc.GenerationStub(ch)
            task = asyncio.create_task(stream_into(stub, first, got))
            while len(got) < 3:
                assert not task.done(), "the first stream ended before the duplicate was sent"
                await asyncio.sleep(0.01)
            refusal = await duplicate_at_scheduler(stack.service("scheduler").address, rid)
            assert refusal.error_code == grpc.StatusCode.ALREADY_EXISTS.value[0]
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Generate(first).read()
            assert refused.value.code() == grpc.StatusCode.ALREADY_EXISTS
            assert "request_id" in refused.value.details()
            status, body = await asyncio.to_thread(post_completion, http_port, rid)
            assert status == 409, body
            assert len(got) < MAX_TOKENS, "the duplicates must come mid-stream"
            last = await asyncio.wait_for(task, 120)
        return got, last

    got, last = asyncio.run(run())
    expected = hf_reference.greedy(hf_reference.tokenizer.encode(PROMPT), MAX_TOKENS, stop_at_eos=False)
    assert got == expected
    assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 256)
