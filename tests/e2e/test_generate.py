"""Through all four processes: parity with transformers, aborts, blocks back in Redis, bad input."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
import redis
from e2e_util import (
    HFReference,
    assert_block_invariants,
    generate,
    greedy_request,
    launch,
    redis_keys,
    run_concurrently,
)

from pagewire import serving
from pagewire.launcher import Stack
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

PROMPTS = [
    "Once",
    "The quick brown fox",
    "In the beginning there was a small server that",
    "Numbers: 1, 2, 3, 5, 8, 13, 21,",
    "Café, naïve, 東京 and 🙂 walk into a bar.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "A much longer prompt that goes on and on, " * 12,
    "Le petit prince demanda encore une fois pourquoi les étoiles brillent la nuit, et",
]


def assert_all_blocks_free(stack: Stack, model: Path, num_blocks: int) -> None:
    """No request holds a block any more: all are free or cached-free, as Redis records them."""
    assert_block_invariants(stack.redis_url, model, "worker-0", num_blocks, idle=True)


def test_concurrent_greedy_outputs_match_transformers(
    stack: Stack, tiny_model: Path, hf_reference: HFReference
) -> None:
    max_tokens = 24
    results = asyncio.run(run_concurrently(stack.router, [greedy_request(p, max_tokens) for p in PROMPTS]))
    for prompt, (ids, text, last) in zip(PROMPTS, results, strict=True):
        prompt_ids = hf_reference.tokenizer.encode(prompt)
        expected = hf_reference.greedy(prompt_ids, max_tokens)
        assert ids == expected, f"prompt {prompt[:30]!r}"
        assert last.usage.prompt_tokens == len(prompt_ids)
        assert last.usage.completion_tokens == len(ids)
        assert last.finish_reason in (common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH)
        assert text == hf_reference.tokenizer.decode(
            expected[:-1] if last.finish_reason == common_pb2.FINISH_REASON_STOP else expected,
            skip_special_tokens=True,
        )
    assert_all_blocks_free(stack, tiny_model, 512)


def test_aborted_and_finished_requests_return_every_block(stack: Stack, tiny_model: Path) -> None:
    async def scenario() -> None:
        async with serving.insecure_channel(stack.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)

            async def cancel_after(n_tokens: int) -> int:
                call = stub.Generate(greedy_request("Abort me please", 400, ignore_eos=True))
                got = 0
                async for resp in call:
                    got += len(resp.token_ids)
                    if got >= n_tokens:
                        call.cancel()
                        break
                return got

            finishing = [generate(stub, greedy_request(p, 32, ignore_eos=True)) for p in PROMPTS[:4]]
            aborting = [cancel_after(n) for n in (1, 5, 9, 17)]
            results = await asyncio.gather(*finishing, *aborting)
            for ids, _, last in results[:4]:
                assert len(ids) == 32 and last.finish_reason == common_pb2.FINISH_REASON_LENGTH
            assert all(n >= 1 for n in results[4:])

    asyncio.run(scenario())
    assert_all_blocks_free(stack, tiny_model, 512)


def test_stop_string_ends_generation_and_is_excluded(stack: Stack) -> None:
    [(ids, text, _)] = asyncio.run(run_concurrently(stack.router, [greedy_request(PROMPTS[2], 32, ignore_eos=True)]))
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "the model's text should have something to stop on"
    [(_, stopped_text, last)] = asyncio.run(
        run_concurrently(stack.router, [greedy_request(PROMPTS[2], 32, ignore_eos=True, stop=[stop])])
    )
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.stop_string == stop
    assert stopped_text == text[: text.index(stop)]


BAD_INPUTS = [
    ({"text": ""}, "prompt"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(max_tokens=0)}, "max_tokens"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(max_tokens=-5)}, "max_tokens"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(temperature=-1.0)}, "temperature"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(top_p=0.0)}, "top_p"),
    ({"text": "hi", "sampling": common_pb2.SamplingParams(top_p=1.01)}, "top_p"),
    ({"text": "word " * 5000}, "prompt"),
    ({"token_ids": generation_pb2.TokenIds(ids=[5] * 4096)}, "prompt"),
    ({"token_ids": generation_pb2.TokenIds(ids=[10**6])}, "token_ids"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_INPUTS)
def test_bad_input_is_invalid_argument_naming_the_field(stack: Stack, fields: dict, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(run_concurrently(stack.router, [generation_pb2.GenerateRequest(**fields)]))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def test_unknown_model_is_not_found(stack: Stack) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        asyncio.run(run_concurrently(stack.router, [generation_pb2.GenerateRequest(model="nope", text="hi")]))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_tokenize_detokenize_and_list_models(stack: Stack, tiny_model: Path, hf_reference: HFReference) -> None:
    async def calls() -> None:
        async with serving.insecure_channel(stack.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            tok = await stub.Tokenize(generation_pb2.TokenizeRequest(text="Café 東京"))
            assert list(tok.token_ids) == hf_reference.tokenizer.encode("Café 東京")
            detok = await stub.Detokenize(generation_pb2.DetokenizeRequest(token_ids=tok.token_ids))
            assert detok.text == "Café 東京"
            models = await stub.ListModels(generation_pb2.ListModelsRequest())
            assert [m.name for m in models.models] == [tiny_model.resolve().name]
            assert models.models[0].max_model_len == 4096

    asyncio.run(calls())


def test_preemption_under_a_small_kv_pool_keeps_greedy_outputs(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    """8 requests whose full sequences need ~2x the KV pool: some are preempted and recomputed."""
    stack = launch(tiny_model, tmp_path, worker_args=["--num-blocks", "20", "--block-size", "8"],
                   scheduler_args=["--check-invariants"])
    try:
        prompts = PROMPTS[:6]
        results = asyncio.run(
            run_concurrently(stack.router, [greedy_request(p, 24, ignore_eos=True) for p in prompts])
        )
        for prompt, (ids, _, _) in zip(prompts, results, strict=True):
            expected = hf_reference.greedy(hf_reference.tokenizer.encode(prompt), 24, stop_at_eos=False)
            assert ids == expected, f"prompt {prompt[:30]!r}"
        load = redis.Redis.from_url(stack.redis_url).hgetall(
            redis_keys(tiny_model).worker_load("worker-0")
        )
        assert int(load[b"preemptions"]) > 0, "the pool was meant to be too small for all requests"
        assert_all_blocks_free(stack, tiny_model, 20)
    finally:
        stack.stop()
