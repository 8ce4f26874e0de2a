"""Prompt logprobs and pooled embeddings across chunked prefills, against transformers."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from worker_steps import Driver, hf_last_hidden, hf_logits

from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.runner import ModelRunner

PROMPT = [0, 71, 3, 3, 500, 12, 960, 44, 7, 7, 7, 301, 2]  # 13 tokens: indices 1..12 get logprobs
TOP = 3


def covered(chunks: list[worker_pb2.PromptLogprobs]) -> list[int]:
    return [c.start_index + i for c in chunks for i in range(len(c.positions))]


def assert_matches_reference(hf: AutoModelForCausalLM, chunks: list[worker_pb2.PromptLogprobs],
                             prompt: list[int]) -> None:
    ref = hf_logits(hf, prompt).log_softmax(-1)  # row i - 1 predicts prompt[i]
    for index, lp in zip(covered(chunks), (p for c in chunks for p in c.positions), strict=True):
        row, tok = ref[index - 1], prompt[index]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(row[tok]), abs=1e-4)
        assert lp.rank == 1 + int((row > row[tok]).sum())
        assert list(lp.top_token_ids) == row.topk(TOP).indices.tolist()


@pytest.mark.parametrize("chunk", [1, 4, 5, 13])
@pytest.mark.parametrize("tell_prompt_len", [True, False])
def test_prompt_logprobs_cover_each_prompt_index_once_across_chunks(
    runner: ModelRunner, hf: AutoModelForCausalLM, chunk: int, tell_prompt_len: bool
) -> None:
    driver = Driver(runner)
    driver.add(1, PROMPT, common_pb2.SamplingParams(temperature=0.0, prompt_logprobs=TOP),
               tell_prompt_len=tell_prompt_len)
    driver.add(2, [0, 9, 9, 9, 9, 9], common_pb2.SamplingParams(temperature=0.0))
    driver.run(3, chunk=chunk)
    chunks = driver.tracks[1].prompt_logprobs
    assert covered(chunks) == list(range(1, len(PROMPT)))
    assert_matches_reference(hf, chunks, PROMPT)
    assert not driver.tracks[2].prompt_logprobs


def test_a_recompute_reports_the_prompt_again_and_never_the_output(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    driver = Driver(runner)
    driver.add(1, PROMPT, common_pb2.SamplingParams(temperature=0.0, prompt_logprobs=TOP))
    driver.run(4)
    driver.tracks[1].prompt_logprobs.clear()
    driver.preempt(1)
    driver.run(6, chunk=6)  # 13 prompt + 4 output tokens resent in chunks of 6
    chunks = driver.tracks[1].prompt_logprobs
    assert covered(chunks) == list(range(1, len(PROMPT)))
    assert_matches_reference(hf, chunks, PROMPT)


@pytest.mark.parametrize("pooling", [common_pb2.POOLING_MEAN, common_pb2.POOLING_LAST])
@pytest.mark.parametrize("chunk", [3, 13])
def test_pooled_embedding_matches_transformers_final_hidden_states(
    runner: ModelRunner, hf: AutoModelForCausalLM, pooling: int, chunk: int
) -> None:
    driver = Driver(runner)
    driver.add(1, PROMPT, common_pb2.SamplingParams(), pooling=pooling)
    driver.add(2, [0, 5, 6], common_pb2.SamplingParams(temperature=0.0))
    driver.run(4, chunk=chunk)
    hidden = hf_last_hidden(hf, PROMPT)
    expected = hidden.mean(0) if pooling == common_pb2.POOLING_MEAN else hidden[-1]
    got = torch.tensor(driver.tracks[1].embedding)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4)
    assert driver.tracks[1].output == [], "an embedding sequence samples no token"
    assert len(driver.tracks[2].output) == 4
