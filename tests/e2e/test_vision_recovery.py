"""Faults mid-generation of image requests: SIGKILL the scheduler (restarted), SIGKILL a worker.

Eight chats with 0, 1 and 2 images stream through each fault and must end complete and equal to
transformers' greedy tokens, for each vision-language test model (LLaVA; Qwen2.5-VL, whose
M-RoPE offsets a recomputing worker rebuilds from the re-sent images): the scheduler's images
in Redis survive its restart, and a lost worker's requests recompute on the other worker with
their images re-sent.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import vlm_cases
from e2e_util import assert_block_invariants, launch, redis_keys, stream_into

from pagewire import serving
from pagewire.launcher import Stack
from pagewire.redis_client import sync_client
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

MAX_TOKENS = 120
CASES = [(f"Request {i}: what do you see?", [50 + 10 * i + j for j in range(i % 3)])
         for i in range(8)]


def request(i: int) -> generation_pb2.GenerateRequest:
    text, seeds = CASES[i]
    parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(
        data=vlm_cases.png(vlm_cases.image(s)))) for s in seeds]
    parts.append(generation_pb2.ContentPart(text=text))
    return generation_pb2.GenerateRequest(
        request_id=f"vis-{i}",
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", parts=parts)]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                           ignore_eos=True))


async def through_fault(stack: Stack, fault: object) -> list[list[int]]:
    outputs: list[list[int]] = [[] for _ in CASES]
    async with serving.insecure_channel(stack.router) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        tasks = [asyncio.create_task(stream_into(stub, request(i), out))
                 for i, out in enumerate(outputs)]
        while not all(len(o) >= 2 for o in outputs):
            assert not any(t.done() for t in tasks), "a stream ended before the fault"
            await asyncio.sleep(0.01)
        await fault()  # type: ignore[operator]
        finals = await asyncio.gather(*tasks)
    assert all(f.finish_reason == common_pb2.FINISH_REASON_LENGTH for f in finals)
    return outputs


def check(model: Path, outputs: list[list[int]]) -> None:
    for (text, seeds), got in zip(CASES, outputs, strict=True):
        inputs = vlm_cases.hf_inputs(model, text, [vlm_cases.image(s) for s in seeds])
        assert got == vlm_cases.hf_generate(model, inputs, MAX_TOKENS), (text, seeds)


def stored_image_counts(stack: Stack, model: Path) -> dict[str, int]:
    """Images Redis holds per in-flight request (what a restarted scheduler would re-send)."""
    keys, client = redis_keys(model), sync_client(stack.redis_url)
    try:
        out = {}
        for i in range(len(CASES)):
            data = client.get(keys.request_images(f"vis-{i}"))
            out[f"vis-{i}"] = len(common_pb2.ImageInputs.FromString(data or b"").images)
        return out
    finally:
        client.close()


def test_scheduler_sigkill_and_restart_mid_generation_of_image_requests(
    vlm_model: Path, tmp_path: Path
) -> None:
    stack = launch(vlm_model, tmp_path, worker_args=["--num-blocks", "512"],
                   scheduler_args=["--check-invariants", "--lease-ttl-s", "2"])
    stored: dict[str, int] = {}
    try:
        async def kill_and_restart() -> None:
            stored.update(stored_image_counts(stack, vlm_model))
            stack.service("scheduler").process.kill()
            stack.service("scheduler").process.wait()
            await stack.restart("scheduler")

        check(vlm_model, asyncio.run(through_fault(stack, kill_and_restart)))
        assert stored == {f"vis-{i}": len(seeds) for i, (_, seeds) in enumerate(CASES)}
        assert stored_image_counts(stack, vlm_model) == dict.fromkeys(stored, 0)  # finished
        assert_block_invariants(stack.redis_url, vlm_model, "worker-0", 512)
    finally:
        stack.stop()


def test_worker_sigkill_moves_image_requests_to_the_other_worker(
    vlm_model: Path, tmp_path: Path
) -> None:
    stack = launch(vlm_model, tmp_path, num_workers=2, worker_args=["--num-blocks", "512"],
                   scheduler_args=["--check-invariants", "--lease-ttl-s", "2"],
                   router_args=["--routing-policy", "round-robin"])
    try:
        async def kill_worker() -> None:
            stack.service("worker-1").process.kill()

        check(vlm_model, asyncio.run(through_fault(stack, kill_worker)))
        assert_block_invariants(stack.redis_url, vlm_model, "worker-0", 512)
        log = (tmp_path / "scheduler.log").read_text()
        assert "moved" in log and "off worker worker-1" in log
    finally:
        stack.stop()
