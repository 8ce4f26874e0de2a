"""Penalties, min_tokens, logprobs and seeds through the runner, against the model's own logits.

The references take transformers' logits of the whole sequence at each step and apply the
documented rule directly (worker_steps.penalize), so they share no code with worker_svc.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from worker_steps import Driver, hf_logits, penalize

from pagewire.v1 import common_pb2
from worker_svc.runner import ModelRunner

PROMPT = [0, 37, 37, 202, 37, 5, 88, 88, 19, 640, 3]
PENALTIES = {"presence": 0.8, "frequency": 0.6, "repetition": 1.5}


def params(**kw: float | int | bool) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**kw)  # type: ignore[arg-type]


def reference(hf: AutoModelForCausalLM, prompt: list[int], n: int, *, masked: tuple[int, ...] = (),
              min_tokens: int = 0, prompt_len: int | None = None, **penalties: float) -> list[int]:
    """Greedy over penalized logits; ``masked`` ids cannot be drawn before min_tokens."""
    out: list[int] = []
    cut = len(prompt) if prompt_len is None else prompt_len
    for i in range(n):
        seq = prompt + out
        logits = penalize(hf_logits(hf, seq)[-1], seq[:cut], seq[cut:], **penalties)
        if i < min_tokens and masked:
            logits[list(masked)] = float("-inf")
        out.append(int(logits.argmax()))
    return out


def greedy_penalized() -> common_pb2.SamplingParams:
    return params(temperature=0.0, presence_penalty=PENALTIES["presence"],
                  frequency_penalty=PENALTIES["frequency"],
                  repetition_penalty=PENALTIES["repetition"])


def test_penalties_follow_the_reference_on_the_model_logits(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    expected = reference(hf, PROMPT, 16, **PENALTIES)
    assert expected != reference(hf, PROMPT, 16), "the penalties must change the output"
    driver = Driver(runner)
    driver.add(1, PROMPT, greedy_penalized())
    driver.add(2, [0, 4, 4, 4], params(temperature=0.0))  # an unpenalized row beside it
    driver.add(3, PROMPT, greedy_penalized(), tell_prompt_len=False)  # prompt: all before a sample
    out = driver.run(16, chunk=4)
    assert out[1] == expected and out[3] == expected
    assert out[2] == reference(hf, [0, 4, 4, 4], 16)


def test_penalties_survive_a_preemption_that_resends_output_as_input(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    output_only = {"presence": 0.3, "frequency": 0.4}  # penalties that count output tokens only
    expected = reference(hf, PROMPT, 12, **output_only)
    # Were the resent output tokens taken for prompt, they would not be penalized:
    misread = expected[:4] + reference(hf, PROMPT + expected[:4], 8, **output_only)
    assert misread != expected, "the test must tell the two readings apart"
    driver = Driver(runner)
    driver.add(1, PROMPT, params(temperature=0.0, presence_penalty=0.3, frequency_penalty=0.4))
    driver.run(4)
    driver.preempt(1)
    out = driver.run(12, chunk=5)  # the recompute runs in chunks, the first one `new`
    assert out[1] == expected


@pytest.fixture(scope="module")
def first_greedy(hf: AutoModelForCausalLM) -> int:
    return int(hf_logits(hf, PROMPT)[-1].argmax())


@pytest.fixture(scope="module")
def eos_runner(runner: ModelRunner, first_greedy: int) -> ModelRunner:
    """The same model and KV memory, with greedy's first pick for PROMPT as the model's EOS."""
    return ModelRunner(runner.model, runner.kv_caches, runner.block_size, runner.backend,
                       runner.device, eos_token_ids=[first_greedy])


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached(
    eos_runner: ModelRunner, hf: AutoModelForCausalLM, first_greedy: int
) -> None:
    eos = first_greedy
    second = reference(hf, PROMPT, 1, masked=(eos,), min_tokens=1)[0]
    driver = Driver(eos_runner)
    driver.add(1, PROMPT, params(temperature=0.0, min_tokens=3, stop_token_ids=[second]))
    driver.add(2, PROMPT, params(temperature=0.0, min_tokens=3, ignore_eos=True))
    driver.add(3, PROMPT, params(temperature=0.0))
    out = driver.run(8)
    assert out[1] == reference(hf, PROMPT, 8, masked=(eos, second), min_tokens=3)
    assert out[1][0] not in (eos, second)
    assert out[2][0] == eos, "ignore_eos: EOS is not a stop token, so it is not masked"
    assert out[3][0] == eos


def test_logprobs_are_raw_with_ranks_and_top_alternatives(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    driver = Driver(runner)
    driver.add(1, PROMPT, params(temperature=1.0, seed=1, logprobs=5, repetition_penalty=1.2,
                                 top_k=50))
    driver.add(2, [0, 8, 9], params(temperature=0.0))
    driver.add(3, [0, 8, 9, 10], params(temperature=0.0, logprobs=0))
    out = driver.run(12, chunk=4)
    ranks = []
    for i, lp in enumerate(driver.tracks[1].logprobs):
        ref = hf_logits(hf, PROMPT + out[1][:i])[-1].log_softmax(-1)
        tok = out[1][i]
        assert lp.token_id == tok
        assert lp.logprob == pytest.approx(float(ref[tok]), abs=1e-4)
        assert lp.rank == 1 + int((ref > ref[tok]).sum())
        top = ref.topk(5)
        assert list(lp.top_token_ids) == top.indices.tolist()
        assert torch.allclose(torch.tensor(list(lp.top_logprobs)), top.values, atol=1e-4)
        ranks.append(lp.rank)
    assert len(ranks) == 12 and max(ranks) > 1, "sampled at T=1, not always the argmax"
    assert all(lp.ByteSize() == 0 for lp in driver.tracks[2].logprobs), "2 did not ask"
    only_sampled = driver.tracks[3].logprobs
    assert all(lp.rank == 1 and not lp.top_token_ids for lp in only_sampled)
    assert len(only_sampled) == 12


def test_seeded_sampling_is_unchanged_by_batch_composition(runner: ModelRunner) -> None:
    seeded = params(temperature=1.0, top_p=0.95, min_p=0.02, seed=1234)
    alone = Driver(runner)
    alone.add(1, PROMPT, seeded)
    expected = alone.run(12)[1]
    crowd = Driver(runner)
    crowd.add(7, [0, 3, 3], params(temperature=0.7, presence_penalty=1.0, logprobs=3))
    crowd.add(1, PROMPT, seeded)
    crowd.add(8, [0, 900, 1, 2, 3, 4, 5], params(temperature=1.3, min_tokens=5, top_k=5))
    crowd.add(9, [0, 44], params(temperature=0.0))
    assert crowd.run(12, chunk=3)[1] == expected


def test_logit_bias_steers_the_draw_and_leaves_logprobs_raw(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    """+100 on one token makes greedy pick it every step; -100 on the unbiased greedy token bans
    it; logprobs stay the raw model's (vLLM's default), so the forced token's is not ~0."""
    free = reference(hf, PROMPT, 4)
    forced = 640 if free[0] != 640 else 641
    driver = Driver(runner)
    driver.add(1, PROMPT, params(temperature=0.0, logprobs=0))
    driver.add(2, PROMPT, common_pb2.SamplingParams(temperature=0.0, logprobs=0,
                                                   logit_bias={forced: 100.0}))
    driver.add(3, PROMPT, common_pb2.SamplingParams(temperature=0.0,
                                                   logit_bias={free[0]: -100.0}))
    out = driver.run(4, chunk=4)
    assert out[1] == free, "an unbiased row beside biased ones is untouched"
    assert out[2] == [forced] * 4
    assert out[3][0] != free[0]
    raw = hf_logits(hf, PROMPT)[-1].log_softmax(-1)
    first = driver.tracks[2].logprobs[0]
    assert first.token_id == forced and abs(first.logprob - float(raw[forced])) < 1e-4


def test_allowed_token_ids_restrict_only_their_row(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    """Greedy over the allowed ids only (the model's logits, argmax among them), beside an
    unrestricted row that is untouched."""
    free = reference(hf, PROMPT, 4)
    allowed = [3, 88, 202, 640]
    expected: list[int] = []
    for _ in range(4):
        logits = hf_logits(hf, PROMPT + expected)[-1]
        expected.append(allowed[int(logits[allowed].argmax())])
    driver = Driver(runner)
    driver.add(1, PROMPT, params(temperature=0.0))
    driver.add(2, PROMPT, common_pb2.SamplingParams(temperature=0.0, allowed_token_ids=allowed))
    out = driver.run(4, chunk=4)
    assert out[1] == free and expected != free  # the restriction changed the answer
    assert out[2] == expected


def test_bad_words_ban_a_words_last_token_after_its_other_tokens(
    runner: ModelRunner, hf: AutoModelForCausalLM
) -> None:
    """The unrestricted greedy output's second and third tokens as a two-token bad word, and its
    fifth token as a one-token word: the reference draws greedily with vLLM's rule applied to the
    model's logits at each step."""
    free = reference(hf, PROMPT, 6)
    words = [(free[1], free[2]), (free[4],)]
    expected: list[int] = []
    for _ in range(6):
        logits = hf_logits(hf, PROMPT + expected)[-1].clone()
        for w in words:
            if len(w) == 1 or expected[len(expected) - len(w) + 1 :] == list(w[:-1]):
                logits[w[-1]] = float("-inf")
        expected.append(int(logits.argmax()))
    driver = Driver(runner)
    driver.add(1, PROMPT, params(temperature=0.0))
    banned = common_pb2.SamplingParams(
        temperature=0.0, bad_words_token_ids=[common_pb2.TokenSequence(ids=w) for w in words])
    driver.add(2, PROMPT, banned)
    out = driver.run(6, chunk=4)
    assert out[1] == free and expected != free
    assert out[2] == expected
