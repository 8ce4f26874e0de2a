"""Every model family through all four processes: eight prompts of 1 to 1,500 tokens at once,
prefills chunked at 512 tokens (so windowed families' chunks cross their 64-token windows),
greedy tokens identical to transformers' ``generate`` on the same directory (float32, CPU path).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e_util import (
    HFReference,
    greedy_ids_request,
    launch,
    run_concurrently,
    synthetic_prompts,
)

from pagewire.testmodel_arch import ARCHS, make_arch_model

LENGTHS = [1, 7, 64, 130, 300, 611, 1024, 1500]
N_OUT = 8



@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_family_serves_transformers_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model = make_arch_model(tmp_path / arch, arch)
    hf = HFReference(model)
    prompts = synthetic_prompts(LENGTHS, 53, 7)
    expected = [hf.greedy(p, N_OUT, stop_at_eos=False) for p in prompts]
    stack = launch(model, tmp_path / "logs", worker_args=["--num-blocks", "1024"],
                   scheduler_args=["--max-num-batched-tokens", "512"])
    try:
        results = asyncio.run(run_concurrently(stack.router, [greedy_ids_request(p, N_OUT) for p in prompts]))
        assert [ids for ids, _, _ in results] == expected
    finally:
        stack.stop()
