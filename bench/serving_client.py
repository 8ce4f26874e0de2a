"""Drive a pagewire router with a request set and record when every token arrived.

The client keeps timing honest the way vLLM's serving benchmark does: arrivals follow the
schedule (Poisson or burst) regardless of how the server keeps up, a semaphore caps how many
requests are in flight, and a request's clock starts when it is actually sent (after the cap lets
it through), so queueing inside the server shows up in TTFT while queueing in the client does not.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

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


async def run_requests(
    addr: str,
    requests: list[BenchRequest],
    offsets: list[float],
    max_concurrency: int = 0,
    label: str = "pagewire",
    progress: bool = True,
) -> RunResult:
    """Send ``requests`` at ``offsets`` (seconds from start), at most ``max_concurrency`` at once."""
    cap = asyncio.Semaphore(max_concurrency if max_concurrency > 0 else len(requests) or 1)
    bar = tqdm(total=len(requests), desc=label, unit="req", disable=not progress, leave=False)
    async with serving.insecure_channel(addr) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        start = time.perf_counter()

        async def scheduled(req: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
            async with cap:
                rec = await send_one(stub, req)
            bar.update(1)
            return rec

        records = await asyncio.gather(
            *(scheduled(r, o) for r, o in zip(requests, offsets, strict=True))
        )
    bar.close()
    sent = min((r.send_s for r in records), default=start)
    wall = max((r.end_s for r in records), default=sent) - sent
    return RunResult(list(records), wall)


async def warm_up(addr: str, requests: list[BenchRequest]) -> None:
    """A few short requests first, so one-time costs (allocations, first forward) stay out."""
    few = [BenchRequest(r.prompt_ids[:16], 4, r.images[:1], r.text[:40]) for r in requests[:4]]
    await run_requests(addr, few, [0.0] * len(few), progress=False)
