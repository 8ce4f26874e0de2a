"""Automatic prefix caching through the real processes: reuse, reporting, unchanged outputs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from e2e_util import HFReference, assert_block_invariants, greedy_request, run_concurrently

from pagewire.launcher import Stack
from pagewire.v1 import common_pb2, generation_pb2

SYSTEM = "You are a careful assistant who answers in short sentences. " * 6
BLOCK = 16


def test_shared_prefix_is_served_from_cache_with_identical_outputs(
    stack: Stack, tiny_model: Path, hf_reference: HFReference
) -> None:
    questions = [SYSTEM + q for q in ("What is a cache?", "Why is the sky blue?")]
    prompt_ids = [hf_reference.tokenizer.encode(q) for q in questions]
    shared = next(i for i, (a, b) in enumerate(zip(*prompt_ids, strict=False)) if a != b)
    [(first_ids, _, first)] = asyncio.run(run_concurrently(stack.router, [greedy_request(questions[0], 12)]))
    [(ids, _, again)] = asyncio.run(run_concurrently(stack.router, [greedy_request(questions[0], 12)]))
    [(other_ids, _, other)] = asyncio.run(run_concurrently(stack.router, [greedy_request(questions[1], 12)]))

    assert first.usage.cached_tokens == 0
    # The repeat finds every full block; its last token is still computed for its logits.
    full = len(prompt_ids[0]) // BLOCK * BLOCK
    assert again.usage.cached_tokens == min(full, len(prompt_ids[0]) - 1)
    # The other question shares the system prompt's full blocks only.
    assert other.usage.cached_tokens == shared // BLOCK * BLOCK > 0
    assert ids == first_ids == hf_reference.greedy(prompt_ids[0], 12)
    assert other_ids == hf_reference.greedy(prompt_ids[1], 12)
    assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 512)


def test_prompt_of_exact_block_multiple_fully_cached_still_generates(
    stack: Stack, hf_reference: HFReference
) -> None:
    ids = hf_reference.tokenizer.encode(SYSTEM)[: 4 * BLOCK]
    req = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=8),
    )
    runs = [asyncio.run(run_concurrently(stack.router, [req]))[0] for _ in range(2)]
    assert runs[1][2].usage.cached_tokens == 4 * BLOCK - 1
    assert runs[0][0] == runs[1][0] == hf_reference.greedy(ids, 8)
