"""Qwen3 and Gemma 3 with sliding windows smaller than the prompts, through all four processes.

Eight prompts at once, each longer than the window, with a token budget that splits prefills
into chunks crossing the window edge and a KV pool small enough to preempt; then a repeat served
from the prefix cache. Every stream must equal transformers' greedy generation.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis
from e2e_util import (
    HFReference,
    greedy_ids_request,
    launch,
    redis_keys,
    run_concurrently,
    synthetic_prompts,
)

from pagewire.testmodel_arch import make_arch_model

WINDOW = 24
FAMILIES = {
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 2},
    "gemma3": {"sliding_window": WINDOW, "sliding_window_pattern": 2},  # local, global, ...
}
LENGTHS = [1, 9, 25, 40, 57, 70, 88, 120]
N_OUT = 12



@pytest.mark.parametrize("arch", list(FAMILIES))
def test_windowed_family_streams_match_transformers(arch: str, tmp_path: Path) -> None:
    model = make_arch_model(tmp_path / arch, arch, **FAMILIES[arch])
    hf = HFReference(model)
    prompts = synthetic_prompts(LENGTHS, 37, 11)
    expected = [hf.greedy(p, N_OUT, stop_at_eos=False) for p in prompts]
    # 32 blocks of 8 tokens: the two longest prompts with their outputs take 30 of them, the three
    # longest 41, so the burst preempts however its arrivals interleave (with 40 blocks it
    # preempted only 1-2 times, and once, on a loaded CI machine, not at all).
    stack = launch(model, tmp_path / "logs",
                   worker_args=["--num-blocks", "32", "--block-size", "8"],
                   scheduler_args=["--max-num-batched-tokens", "48", "--check-invariants"])
    try:
        results = asyncio.run(run_concurrently(stack.router, [greedy_ids_request(p, N_OUT) for p in prompts]))
        assert [ids for ids, _, _ in results] == expected
        load = redis.Redis.from_url(stack.redis_url).hgetall(
            redis_keys(model).worker_load("worker-0"))
        assert int(load[b"preemptions"]) > 0, "the pool was meant to be too small for all at once"
        # Which blocks of the burst stay cached depends on the order its requests finished in; a
        # prompt served alone is the most recently used, so its repeat must hit the cache.
        for _ in range(2):
            [(ids, _, final)] = asyncio.run(
                run_concurrently(stack.router, [greedy_ids_request(prompts[-1], N_OUT)]))
            assert ids == expected[-1]
        assert final.usage.cached_tokens > WINDOW
    finally:
        stack.stop()
