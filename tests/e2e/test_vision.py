"""Images in, text out, through Redis, scheduler, worker and router, for each vision-language
test model (LLaVA; Qwen2.5-VL, whose images become placeholder runs of different lengths).

Greedy chat completions with 0, 1 and 2 images of different sizes, sent at once, must be
transformers' own tokens on the same directory; the prefix cache must hit on the same image and
text, and never on the same text with another image; the official ``openai`` client sends an
image as a data URL.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
import vlm_cases
from e2e_util import launch, run_concurrently

from pagewire.launcher import Stack, free_port
from pagewire.v1 import common_pb2, generation_pb2

N_OUT = 10
TEXTS = ("What is in this picture?", "Describe it.", "Compare them.", "A story, please.")


@pytest.fixture(scope="module")
def vision_stack(vlm_model: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[Stack, str]]:
    http_port = free_port()
    # Small steps: prefills are chunked through placeholder runs (36 tokens per LLaVA image,
    # 6 to 48 per Qwen2.5-VL image), and 16-token blocks split them.
    stack = launch(vlm_model, tmp_path_factory.mktemp("logs"),
                   worker_args=["--num-blocks", "512", "--block-size", "16"],
                   scheduler_args=["--max-num-batched-tokens", "48", "--max-encoder-tokens", "40"],
                   router_args=["--http-port", str(http_port)])
    try:
        yield stack, f"http://127.0.0.1:{http_port}/v1"
    finally:
        stack.stop()


def chat_request(text: str, pngs: list[bytes], max_tokens: int = N_OUT
                 ) -> generation_pb2.GenerateRequest:
    parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=p)) for p in pngs]
    parts.append(generation_pb2.ContentPart(text=text))
    return generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", parts=parts)]),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                           ignore_eos=True))


def expected(model: Path, text: str, seeds: list[int]) -> list[int]:
    images = [vlm_cases.image(s) for s in seeds]
    return vlm_cases.hf_generate(model, vlm_cases.hf_inputs(model, text, images), N_OUT)


def test_eight_chats_with_0_1_2_images_match_transformers(
    vision_stack: tuple[Stack, str], vlm_model: Path
) -> None:
    stack, _ = vision_stack
    cases = [(TEXTS[i % 4], [10 * i + j for j in range(i % 3)]) for i in range(8)]
    requests = [chat_request(t, [vlm_cases.png(vlm_cases.image(s)) for s in seeds])
                for t, seeds in cases]
    results = asyncio.run(run_concurrently(stack.router, requests))
    assert [ids for ids, _, _ in results] == [expected(vlm_model, t, s) for t, s in cases]


def test_same_image_and_text_hits_the_prefix_cache(
    vision_stack: tuple[Stack, str], vlm_model: Path
) -> None:
    stack, _ = vision_stack
    request = chat_request("Tell me about it, in detail.", [vlm_cases.png(vlm_cases.image(101))])
    (first,) = asyncio.run(run_concurrently(stack.router, [request]))
    (again,) = asyncio.run(run_concurrently(stack.router, [request]))
    assert again[0] == first[0] == expected(vlm_model, "Tell me about it, in detail.", [101])
    assert first[2].usage.cached_tokens == 0
    # Every full block but the last, whose logits are needed, is served from the cache.
    assert again[2].usage.cached_tokens >= first[2].usage.prompt_tokens - 16


def test_same_text_with_another_image_shares_no_image_block(
    vision_stack: tuple[Stack, str], vlm_model: Path
) -> None:
    stack, _ = vision_stack
    text = "And what about this one?"
    a = chat_request(text, [vlm_cases.png(vlm_cases.image(201))])
    b = chat_request(text, [vlm_cases.png(vlm_cases.image(202))])
    (ra,) = asyncio.run(run_concurrently(stack.router, [a]))
    (rb,) = asyncio.run(run_concurrently(stack.router, [b]))
    assert ra[0] == expected(vlm_model, text, [201])
    assert rb[0] == expected(vlm_model, text, [202])
    assert ra[0] != rb[0]
    # Only the blocks before the image's first placeholder may be shared (chat preamble).
    ids = vlm_cases.hf_inputs(vlm_model, text, [vlm_cases.image(201)])["input_ids"][0].tolist()
    first_placeholder = ids.index(vlm_cases.hf_model(vlm_model).config.image_token_id)
    assert rb[2].usage.cached_tokens <= first_placeholder // 16 * 16


def test_openai_client_sends_an_image_chat(
    vision_stack: tuple[Stack, str], vlm_model: Path
) -> None:
    from openai import OpenAI

    _, base_url = vision_stack
    png = vlm_cases.png(vlm_cases.image(7))
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    client = OpenAI(base_url=base_url, api_key="unused", max_retries=0)
    reply = client.chat.completions.create(
        model="", temperature=0.0, max_tokens=N_OUT,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": TEXTS[0]},
        ]}],
        extra_body={"ignore_eos": True},
    )
    proc = vlm_cases.processor(vlm_model)
    want = expected(vlm_model, TEXTS[0], [7])
    assert reply.choices[0].message.content == proc.tokenizer.decode(want, skip_special_tokens=True)
    assert reply.usage.completion_tokens == N_OUT


def test_repeated_image_chat_routes_to_the_worker_holding_its_blocks(
    vlm_model: Path, tmp_path: Path
) -> None:
    from e2e_util import worker_of

    from pagewire.redis_client import sync_client

    stack = launch(vlm_model, tmp_path, num_workers=2, worker_args=["--num-blocks", "256"])
    client = sync_client(stack.redis_url)
    try:
        first, again = {}, {}
        for rnd, into in (("a", first), ("b", again)):
            for i in range(4):
                request = chat_request(TEXTS[i], [vlm_cases.png(vlm_cases.image(300 + i))])
                request.request_id = f"route-{rnd}-{i}"
                ((ids, _, last),) = asyncio.run(run_concurrently(stack.router, [request]))
                into[i] = (worker_of(client, vlm_model, request.request_id),
                           last.usage.cached_tokens, ids)
        for i in range(4):
            assert again[i][0] == first[i][0], f"chat {i} went to another worker"
            inputs = vlm_cases.hf_inputs(vlm_model, TEXTS[i], [vlm_cases.image(300 + i)])
            ids = inputs["input_ids"][0].tolist()
            first_placeholder = ids.index(vlm_cases.hf_model(vlm_model).config.image_token_id)
            assert first[i][1] == 0 and again[i][1] > first_placeholder  # image blocks hit
            assert again[i][2] == first[i][2]
    finally:
        client.close()
        stack.stop()
