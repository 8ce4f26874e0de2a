"""Helpers for the end-to-end tests: launching real stacks, the transformers oracle."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import redis
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pagewire import serving
from pagewire.launcher import Stack, start_stack
from pagewire.redis_client import sync_client
from pagewire.redis_keys import RedisKeys
from pagewire.redis_server import start_redis
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc


def launch(model: Path, log_dir: Path, **kwargs: object) -> Stack:
    return asyncio.run(start_stack(str(model), log_dir=log_dir, **kwargs))  # type: ignore[arg-type]


def launch_groups(
    model: Path, log_dir: Path, groups: list[str], worker_args: list[str], scheduler_args: list[str],
    redis_url: str = "",
) -> Stack:
    """Redis (``redis_url``, else REDIS_URL, else a private one), then per group a worker
    ``worker-<g>`` and its scheduler ``scheduler-<g>`` (``--group g``), then one router with no
    fixed scheduler: it finds the groups in Redis."""

    async def start() -> Stack:
        stack = Stack(model=str(model), log_dir=log_dir)
        try:
            stack.redis_url = redis_url or os.environ.get("REDIS_URL", "")
            if not stack.redis_url:
                stack.redis = start_redis()
                stack.redis_url = stack.redis.url
            for g in groups:
                worker = await stack.start_worker(f"worker-{g}", worker_args)
                await stack.start_scheduler(
                    [worker], [*scheduler_args, "--group", g], name=f"scheduler-{g}")
            await stack.start_router(None)
        except BaseException:
            stack.stop()
            raise
        return stack

    return asyncio.run(start())


def redis_keys(model: Path) -> RedisKeys:
    return RedisKeys("default", model.resolve().name)


class HFReference:
    """transformers' own greedy generation on the same model directory: the oracle."""

    def __init__(self, model: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = True) -> list[int]:
        extra = {} if stop_at_eos else {"eos_token_id": None}
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                **extra,
            )
        return out[0, len(prompt_ids) :].tolist()


def assert_block_invariants(
    redis_url: str, model: Path, worker_id: str, num_blocks: int, idle: bool = True,
    timeout: float = 5.0,
) -> None:
    """Check, from Redis (the state of record), that every block is in exactly one place.

    free, cached-free and in-use (named by a live request's block table) partition the pool;
    cached blocks are all in the prefix index; when ``idle``, no request holds anything.
    """
    keys = redis_keys(model)
    client = sync_client(redis_url)  # a cluster URL too
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                _check_blocks(client, keys, worker_id, num_blocks, idle)
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        client.close()


def _check_blocks(client: redis.Redis | redis.RedisCluster, keys: RedisKeys, worker_id: str, num_blocks: int, idle: bool) -> None:
    free = {int(b) for b in client.smembers(keys.free_blocks(worker_id))}
    cached = {int(b) for b in client.zrange(keys.cached_blocks(worker_id), 0, -1)}
    index = {h: int(b) for h, b in client.hgetall(keys.prefix_index(worker_id)).items()}
    live = [r.decode() for r in client.smembers(keys.requests())]
    tables = []
    for rid in live:
        if client.hget(keys.request(rid), "worker") == worker_id.encode():
            tables.append([int(b) for b in client.lrange(keys.request_blocks(rid), 0, -1)])
    in_use = {b for t in tables for b in t}
    assert not free & cached, "a block both free and cached"
    assert not in_use & (free | cached), "a block both in use and free"
    assert free | cached | in_use == set(range(num_blocks)), (
        f"{num_blocks - len(free | cached | in_use)} blocks are nowhere"
    )
    assert cached <= set(index.values()), "a cached block missing from the prefix index"
    assert len(set(index.values())) == len(index), "two hashes name one block"
    for t in tables:
        assert len(set(t)) == len(t), "a block twice in one block table"
    if idle:
        assert not live, f"requests still live: {live}"
        assert not in_use


async def generate(
    stub: generation_pb2_grpc.GenerationStub, request: generation_pb2.GenerateRequest
) -> tuple[list[int], str, generation_pb2.GenerateResponse]:
    ids: list[int] = []
    text = ""
    last = generation_pb2.GenerateResponse()
    async for resp in stub.Generate(request):
        ids.extend(resp.token_ids)
        text += resp.text
        last = resp
    return ids, text, last


def greedy_request(prompt: str, max_tokens: int, **sampling: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        text=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, **sampling),
    )


def greedy_ids_request(ids: list[int], max_tokens: int) -> generation_pb2.GenerateRequest:
    """Greedy over token ids, exactly ``max_tokens`` out (EOS ignored)."""
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))


def synthetic_prompts(lengths: list[int], mul: int, add: int) -> list[list[int]]:
    """Deterministic token-id prompts of the given lengths, each starting with id 0."""
    return [[0, *((i * mul + n * add) % 900 + 20 for i in range(n - 1))] for n in lengths]


async def run_concurrently(address: str, requests: list[generation_pb2.GenerateRequest]) -> list:
    async with serving.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return await asyncio.gather(*(generate(stub, r) for r in requests))


async def stream_into(
    stub: generation_pb2_grpc.GenerationStub, req: generation_pb2.GenerateRequest, got: list[int]
) -> generation_pb2.GenerateResponse:
    """Stream ``req``, appending its tokens to ``got`` as they arrive (so a test can act
    mid-stream); returns the last message."""
    last = generation_pb2.GenerateResponse()
    async for resp in stub.Generate(req):
        got.extend(resp.token_ids)
        last = resp
    return last


def worker_of(client: redis.Redis, model: Path, rid: str) -> str:
    """The worker Redis records for a request (kept a while after it finishes)."""
    return (client.hget(redis_keys(model).request(rid), "worker") or b"").decode()
