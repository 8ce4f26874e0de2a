"""The sampling API end to end, each feature against a direct reference computation.

n (fan-out, seeds, cancel), min_tokens with stop strings, include_stop_str_in_output, logprobs and
prompt logprobs (against transformers' log-softmax), penalties (greedy against a plain torch loop
over transformers' logits) and min_p.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from e2e_util import (
    HFReference,
    assert_block_invariants,
    generate,
    greedy_request,
    run_concurrently,
)

from pagewire import serving
from pagewire.launcher import Stack
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

PROMPT = "In the beginning there was a small server that"
LENGTH, STOP = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP


def request(prompt: str = PROMPT, **sampling: object) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        text=prompt, sampling=common_pb2.SamplingParams(**sampling)
    )


async def collect(
    address: str, req: generation_pb2.GenerateRequest
) -> list[generation_pb2.GenerateResponse]:
    async with serving.insecure_channel(address) as channel:
        return [r async for r in generation_pb2_grpc.GenerationStub(channel).Generate(req)]


def by_index(
    responses: list[generation_pb2.GenerateResponse],
) -> dict[int, list[generation_pb2.GenerateResponse]]:
    out: dict[int, list[generation_pb2.GenerateResponse]] = {}
    for r in responses:
        out.setdefault(r.index, []).append(r)
    return out


def ids_of(responses: list[generation_pb2.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def log_softmax(hf: HFReference, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
    with torch.inference_mode():
        logits = hf.model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_logprobs_match(
    entry: common_pb2.Logprobs, row: torch.Tensor, token: int, k: int
) -> None:
    assert entry.token_id == token
    assert entry.logprob == pytest.approx(row[token].item(), abs=1e-3)
    assert entry.rank == 1 + int((row > row[token] + 1e-4).sum())
    top = torch.topk(row, k)
    assert list(entry.top_token_ids) == top.indices.tolist()
    assert list(entry.top_logprobs) == pytest.approx(top.values.tolist(), abs=1e-3)


# ---- n ------------------------------------------------------------------------------------
def test_n_greedy_completions_are_each_transformers_greedy(
    stack: Stack, hf_reference: HFReference
) -> None:
    prompt_ids = hf_reference.tokenizer.encode(PROMPT)
    expected = hf_reference.greedy(prompt_ids, 10, stop_at_eos=False)
    responses = asyncio.run(
        collect(stack.router, request(temperature=0, max_tokens=10, n=3, ignore_eos=True))
    )
    completions = by_index(responses)
    assert sorted(completions) == [0, 1, 2]
    for msgs in completions.values():
        assert ids_of(msgs) == expected
        last = msgs[-1]
        assert last.finish_reason == LENGTH  # usage rides on each completion's last message
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt_ids), 10)
        assert all(not m.HasField("usage") for m in msgs[:-1])
    assert len({r.request_id for r in responses}) == 1


def test_n_seeded_completions_are_the_single_requests_with_seed_plus_index(stack: Stack) -> None:
    sampling = {"temperature": 1.0, "max_tokens": 12, "ignore_eos": True}
    fanned = by_index(asyncio.run(collect(stack.router, request(n=3, seed=100, **sampling))))
    singles = asyncio.run(
        run_concurrently(stack.router, [request(seed=100 + i, **sampling) for i in range(3)])
    )
    for i, (ids, _, _) in enumerate(singles):
        assert ids_of(fanned[i]) == ids
    assert len({tuple(ids) for ids, _, _ in singles}) > 1, "different seeds should differ"


def test_cancelling_an_n_request_aborts_every_completion(stack: Stack, tiny_model: Path) -> None:
    async def cancel_after_a_few_tokens() -> int:
        async with serving.insecure_channel(stack.router) as channel:
            call = generation_pb2_grpc.GenerationStub(channel).Generate(
                request(temperature=1.0, max_tokens=3000, ignore_eos=True, n=4, seed=1)
            )
            seen: set[int] = set()
            async for r in call:
                seen.add(r.index)
                if len(seen) == 4:
                    call.cancel()
                    break
            return len(seen)

    assert asyncio.run(cancel_after_a_few_tokens()) == 4
    # Each completion had ~3000 tokens to go: only an abort frees their blocks this soon.
    assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 512, idle=True, timeout=3.0)


# ---- stop strings -------------------------------------------------------------------------
def greedy_text(stack: Stack, max_tokens: int) -> tuple[list[int], str]:
    [(ids, text, _)] = asyncio.run(
        run_concurrently(stack.router, [greedy_request(PROMPT, max_tokens, ignore_eos=True)])
    )
    return ids, text


def test_stop_string_ended_completion_is_aborted_downstream(stack: Stack, tiny_model: Path) -> None:
    _, text = greedy_text(stack, 8)
    stop = text[2:5]
    [(_, got, last)] = asyncio.run(
        run_concurrently(stack.router, [greedy_request(PROMPT, 3000, ignore_eos=True, stop=[stop])])
    )
    assert last.finish_reason == STOP and got == text[: text.index(stop)]
    assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 512, idle=True, timeout=3.0)


def test_include_stop_str_in_output_keeps_the_stop_string(stack: Stack) -> None:
    _, text = greedy_text(stack, 24)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    [(_, got, last)] = asyncio.run(
        run_concurrently(
            stack.router,
            [
                greedy_request(
                    PROMPT, 24, ignore_eos=True, stop=[stop], include_stop_str_in_output=True
                )
            ],
        )
    )
    assert last.stop_string == stop
    assert got == text[: text.index(stop) + len(stop)]


def test_min_tokens_defers_stop_strings(stack: Stack, hf_reference: HFReference) -> None:
    ids, text = greedy_text(stack, 32)
    stop = text[1:3]  # occurs within the first tokens' text
    assert text.index(stop) < len(hf_reference.tokenizer.decode(ids[:2]))
    min_tokens = 16
    before = len(hf_reference.tokenizer.decode(ids[:min_tokens]))
    [(got_ids, got, last)] = asyncio.run(
        run_concurrently(
            stack.router,
            [greedy_request(PROMPT, 32, ignore_eos=True, stop=[stop], min_tokens=min_tokens)],
        )
    )
    assert len(got_ids) > min_tokens
    later = text.find(stop, before)  # the first match lying wholly after the first min_tokens
    if later < 0:
        assert (got, last.finish_reason) == (text, LENGTH)
    else:
        assert (got, last.stop_string) == (text[:later], stop)


# ---- logprobs -----------------------------------------------------------------------------
def test_logprobs_are_transformers_log_softmax_of_each_sampled_token(
    stack: Stack, hf_reference: HFReference
) -> None:
    responses = asyncio.run(
        collect(stack.router, request(temperature=0, max_tokens=8, ignore_eos=True, logprobs=3))
    )
    out = ids_of(responses)
    entries = [e for r in responses for e in r.logprobs]
    assert all(len(r.logprobs) == len(r.token_ids) for r in responses)
    prompt_ids = hf_reference.tokenizer.encode(PROMPT)
    rows = log_softmax(hf_reference, prompt_ids + out)[len(prompt_ids) - 1 : -1]
    for entry, row, token in zip(entries, rows, out, strict=True):
        assert_logprobs_match(entry, row, token, k=3)
        assert entry.rank == 1  # greedy picks the likeliest


def test_logprobs_are_raw_whatever_the_temperature(stack: Stack, hf_reference: HFReference) -> None:
    """vLLM's default: logprobs of the model's distribution, before temperature and filters."""
    responses = asyncio.run(
        collect(
            stack.router,
            request(temperature=1.7, top_k=5, seed=3, max_tokens=6, ignore_eos=True, logprobs=0),
        )
    )
    out = ids_of(responses)
    prompt_ids = hf_reference.tokenizer.encode(PROMPT)
    rows = log_softmax(hf_reference, prompt_ids + out)[len(prompt_ids) - 1 : -1]
    entries = [e for r in responses for e in r.logprobs]
    for entry, row, token in zip(entries, rows, out, strict=True):
        assert_logprobs_match(entry, row, token, k=0)


def test_prompt_logprobs_are_transformers_log_softmax_of_each_prompt_token(
    stack: Stack, hf_reference: HFReference
) -> None:
    responses = asyncio.run(
        collect(stack.router, request(temperature=0, max_tokens=2, prompt_logprobs=2))
    )
    assert responses[0].prompt_logprobs and all(not r.prompt_logprobs for r in responses[1:])
    prompt_ids = hf_reference.tokenizer.encode(PROMPT)
    rows = log_softmax(hf_reference, prompt_ids)
    entries = list(responses[0].prompt_logprobs)
    assert len(entries) == len(prompt_ids) - 1
    for i, entry in enumerate(entries):
        assert_logprobs_match(entry, rows[i], prompt_ids[i + 1], k=2)


# ---- penalties and filters ----------------------------------------------------------------
def penalized_greedy(
    hf: HFReference,
    prompt_ids: list[int],
    steps: int,
    repetition: float = 1.0,
    presence: float = 0.0,
    frequency: float = 0.0,
) -> list[int]:
    """vLLM's order: the repetition penalty over prompt and output, then presence and frequency
    over the output; then argmax."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = hf.model(torch.tensor([prompt_ids + out])).logits[0, -1].float()
            seen = torch.tensor(sorted(set(prompt_ids + out)))
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / repetition, picked * repetition)
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel())
            logits -= frequency * counts.float() + presence * (counts > 0).float()
            out.append(int(logits.argmax()))
    return out


@pytest.mark.parametrize(
    "penalties",
    [
        {"repetition_penalty": 1.8},
        {"repetition_penalty": 0.7},
        {"presence_penalty": 1.5, "frequency_penalty": 0.8},
        {"repetition_penalty": 1.3, "presence_penalty": -0.5, "frequency_penalty": 1.2},
    ],
)
def test_penalized_greedy_matches_a_direct_torch_computation(
    stack: Stack, hf_reference: HFReference, penalties: dict[str, float]
) -> None:
    prompt = "the the the cat sat on the mat and the"
    prompt_ids = hf_reference.tokenizer.encode(prompt)
    expected = penalized_greedy(
        hf_reference,
        prompt_ids,
        16,
        repetition=penalties.get("repetition_penalty", 1.0),
        presence=penalties.get("presence_penalty", 0.0),
        frequency=penalties.get("frequency_penalty", 0.0),
    )
    assert expected != hf_reference.greedy(prompt_ids, 16, stop_at_eos=False), (
        "penalties should matter"
    )
    [(ids, _, _)] = asyncio.run(
        run_concurrently(stack.router, [greedy_request(prompt, 16, ignore_eos=True, **penalties)])
    )
    assert ids == expected


def test_min_p_of_one_leaves_only_the_likeliest_token(
    stack: Stack, hf_reference: HFReference
) -> None:
    expected = hf_reference.greedy(hf_reference.tokenizer.encode(PROMPT), 12, stop_at_eos=False)
    [(ids, _, _)] = asyncio.run(
        run_concurrently(
            stack.router,
            [request(temperature=1.5, min_p=1.0, seed=5, max_tokens=12, ignore_eos=True)],
        )
    )
    assert ids == expected


def test_one_request_may_mix_every_feature(stack: Stack) -> None:
    """n, seed, penalties, logprobs, prompt logprobs, min_tokens and stop strings together."""

    async def run() -> list[generation_pb2.GenerateResponse]:
        async with serving.insecure_channel(stack.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            req = request(
                temperature=0.9,
                top_p=0.95,
                top_k=50,
                min_p=0.05,
                seed=11,
                n=2,
                max_tokens=20,
                min_tokens=4,
                stop=["."],
                repetition_penalty=1.1,
                presence_penalty=0.2,
                frequency_penalty=0.2,
                logprobs=2,
                prompt_logprobs=1,
            )
            ids, _, _ = await generate(stub, req)
            assert ids
            return [r async for r in stub.Generate(req)]

    completions = by_index(asyncio.run(run()))
    assert sorted(completions) == [0, 1]
    for msgs in completions.values():
        assert len(ids_of(msgs)) >= 4
        assert sum(len(m.logprobs) for m in msgs) == len(ids_of(msgs))
        assert msgs[0].prompt_logprobs and msgs[-1].finish_reason in (STOP, LENGTH)
