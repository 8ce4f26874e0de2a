"""Drive a server with a request set and record when every token arrived: a pagewire router over
its gRPC API, or any OpenAI-compatible server (pagewire's HTTP API, vLLM) over streamed
``/v1/completions``.

The client keeps timing honest the way vLLM's serving benchmark does: arrivals follow the
schedule (Poisson or burst) regardless of how the server keeps up, a semaphore caps how many
requests are in flight, and a request's clock starts when it is actually sent (after the cap lets
it through), so queueing inside the server shows up in TTFT while queueing in the client does not.

Over HTTP every chunk's tokens are counted exactly, not assumed to be one: the request asks for
vLLM's ``stream_options.continuous_usage_stats``, so each chunk carries the output tokens so far
(a server may merge several tokens into one chunk when its reader falls behind). A server that
sends a chunk without it fails the request rather than being counted by guess.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
import grpc
from serving_data import BenchRequest
from tqdm import tqdm

from pagewire import serving
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc


@dataclass
class RequestRecord:
    """What one request saw: its send time and, per streamed message, arrival time and token count.

    Times are ``time.perf_counter()`` seconds. A message may carry several tokens (pagewire
    batches token ids per step), so the arrivals are kept per message and split per token later.
    """

    input_len: int
    expected_output_len: int
    send_s: float = 0.0
    end_s: float = 0.0
    chunks: list[tuple[float, int]] = field(default_factory=list)
    finish_reason: str = ""
    error: str = ""
    cached_tokens: int = 0

    @property
    def output_len(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ok(self) -> bool:
        return not self.error and self.output_len == self.expected_output_len


@dataclass(frozen=True)
class OpenAITarget:
    """An OpenAI-compatible server: ``base_url`` without ``/v1`` (as ``vllm bench serve`` takes
    it) and the model name its requests use."""

    base_url: str
    model: str


Target = str | OpenAITarget  # a router's gRPC address, or an OpenAI server


@dataclass
class RunResult:
    """All records of one benchmark run and its wall time (first send to last completion)."""

    records: list[RequestRecord]
    wall_s: float


def to_proto(req: BenchRequest) -> generation_pb2.GenerateRequest:
    """Greedy with ignore_eos, so the request produces exactly ``output_len`` tokens."""
    sampling = common_pb2.SamplingParams(temperature=0.0, max_tokens=req.output_len,
                                         ignore_eos=True)
    if req.images:
        parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=png))
                 for png in req.images]
        parts.append(generation_pb2.ContentPart(text=req.text))
        chat = generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", parts=parts)])
        return generation_pb2.GenerateRequest(chat=chat, sampling=sampling)
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=list(req.prompt_ids)), sampling=sampling)


async def send_one(stub: generation_pb2_grpc.GenerationStub, req: BenchRequest) -> RequestRecord:
    """Stream one request to completion, recording each message's arrival."""
    rec = RequestRecord(input_len=req.input_len, expected_output_len=req.output_len)
    rec.send_s = time.perf_counter()
    try:
        async for resp in stub.Generate(to_proto(req)):
            now = time.perf_counter()
            if resp.token_ids:
                rec.chunks.append((now, len(resp.token_ids)))
            if resp.finish_reason:
                rec.finish_reason = common_pb2.FinishReason.Name(resp.finish_reason)
                rec.input_len = resp.usage.prompt_tokens or rec.input_len
                rec.cached_tokens = resp.usage.cached_tokens
    except grpc.aio.AioRpcError as err:
        rec.error = f"{err.code().name}: {err.details()}"
    rec.end_s = time.perf_counter()
    return rec


def openai_body(model: str, req: BenchRequest) -> dict:
    """The streamed completions request: the prompt's ids, greedy, exactly ``output_len`` tokens."""
    if req.images:
        raise ValueError("the OpenAI client sends token-id prompts only, not image chats")
    return {"model": model, "prompt": list(req.prompt_ids), "max_tokens": req.output_len,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}


async def send_one_openai(session: aiohttp.ClientSession, target: OpenAITarget,
                          req: BenchRequest) -> RequestRecord:
    """Stream one completion over HTTP, recording each chunk's arrival and its token count."""
    rec = RequestRecord(input_len=req.input_len, expected_output_len=req.output_len)
    body = openai_body(target.model, req)
    rec.send_s = time.perf_counter()
    try:
        async with session.post(target.base_url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
            else:
                await _read_chunks(resp, rec)
    except aiohttp.ClientError as err:
        rec.error = f"{type(err).__name__}: {err}"
    rec.end_s = time.perf_counter()
    return rec


async def _read_chunks(resp: aiohttp.ClientResponse, rec: RequestRecord) -> None:
    streamed = 0  # output tokens so far, by the chunks' running usage
    async for line in resp.content:
        if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
            continue
        now = time.perf_counter()
        chunk = json.loads(line[6:])
        usage = chunk.get("usage")
        if "error" in chunk:
            rec.error = str(chunk["error"].get("message", chunk["error"]))[:200]
            return
        if chunk.get("choices"):
            if usage is None:
                rec.error = "a chunk without usage: the server ignored continuous_usage_stats"
                return
            if usage["completion_tokens"] > streamed:
                rec.chunks.append((now, usage["completion_tokens"] - streamed))
                streamed = usage["completion_tokens"]
            rec.finish_reason = chunk["choices"][0].get("finish_reason") or rec.finish_reason
        elif usage is not None:  # the last chunk: the whole request's usage
            rec.input_len = usage.get("prompt_tokens") or rec.input_len
            rec.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0


@asynccontextmanager
async def connected(target: Target) -> AsyncIterator[Callable[[BenchRequest], Awaitable[RequestRecord]]]:
    """A function that sends one request to ``target``, over one channel or HTTP session."""
    if isinstance(target, OpenAITarget):
        unlimited = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=unlimited,
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:
            yield lambda req: send_one_openai(session, target, req)
        return
    async with serving.insecure_channel(target) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        yield lambda req: send_one(stub, req)


async def run_requests(
    target: Target,
    requests: list[BenchRequest],
    offsets: list[float],
    max_concurrency: int = 0,
    label: str = "pagewire",
    progress: bool = True,
) -> RunResult:
    """Send ``requests`` at ``offsets`` (seconds from start), at most ``max_concurrency`` at once."""
    cap = asyncio.Semaphore(max_concurrency if max_concurrency > 0 else len(requests) or 1)
    bar = tqdm(total=len(requests), desc=label, unit="req", disable=not progress, leave=False)
    async with connected(target) as send:
        start = time.perf_counter()

        async def scheduled(req: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with cap:
                rec = await send(req)
            bar.update(1)
            return rec

        records = await asyncio.gather(
            *(scheduled(r, o) for r, o in zip(requests, offsets, strict=True))
        )
    bar.close()
    sent = min((r.send_s for r in records), default=start)
    wall = max((r.end_s for r in records), default=sent) - sent
    return RunResult(list(records), wall)


async def warm_up(target: Target, requests: list[BenchRequest]) -> None:
    """A few short requests first, so one-time costs (allocations, first forward) stay out."""
    few = [BenchRequest(r.prompt_ids[:16], 4, r.images[:1], r.text[:40]) for r in requests[:4]]
    await run_requests(target, few, [0.0] * len(few), progress=False)
