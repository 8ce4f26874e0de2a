"""Every model family through all four processes: eight prompts of 1 to 1,500 tokens at once,
prefills chunked at 512 tokens (so windowed families' chunks cross their 64-token windows),
greedy tokens identical to transformers' ``generate`` on the same directory (float32, CPU path).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from e2e_util import HFReference, launch, run_concurrently

from pagewire.testmodel_arch import ARCHS, make_arch_model
from pagewire.v1 import common_pb2, generation_pb2

LENGTHS = [1, 7, 64, 130, 300, 611, 1024, 1500]
N_OUT = 8


def request(ids: list[int]) -> generation_pb2.GenerateRequest:
    return generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=ids),
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=N_OUT, ignore_eos=True))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_family_serves_transformers_greedy_tokens(arch: str, tmp_path: Path) -> None:
    model = make_arch_model(tmp_path / arch, arch)
    hf = HFReference(model)
    prompts = [[0, *((i * 53 + n * 7) % 900 + 20 for i in range(n - 1))] for n in LENGTHS]
    expected = [hf.greedy(p, N_OUT, stop_at_eos=False) for p in prompts]
    stack = launch(model, tmp_path / "logs", worker_args=["--num-blocks", "1024"],
                   scheduler_args=["--max-num-batched-tokens", "512"])
    try:
        results = asyncio.run(run_concurrently(stack.router, [request(p) for p in prompts]))
        assert [ids for ids, _, _ in results] == expected
    finally:
        stack.stop()
