"""Structured outputs through the runner: the grammar's mask on the model's own logits.

The reference walks transformers' logits position by position, masks them with a fresh xgrammar
matcher's bitmask through the plain-torch oracle (kernels.reference.apply_token_bitmask), and takes
the argmax: it shares neither the worker's matchers nor its fused masked fill.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from worker_steps import Driver, hf_logits

from kernels.reference import apply_token_bitmask
from pagewire.grammar import Compiler, matcher
from pagewire.structured import StructuredOutput
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.runner import ModelRunner

PROMPT = [0, 37, 37, 202, 37, 5, 88, 88, 19, 640, 3]
EOS = (1, 4)  # the test model's end-of-sequence ids (generation_config: end_of_text, im_end)
REGEX = StructuredOutput("regex", r"[a-z]{3,6}-[0-9]{2}")
CHOICE = StructuredOutput("choice", json.dumps(["alpha", "beta", "gamma delta"]))
SCHEMA = StructuredOutput("json_schema", json.dumps({
    "type": "object",
    "properties": {"k": {"enum": ["x", "y"]}, "n": {"type": "integer", "maximum": 99}},
    "required": ["k", "n"],
}))


@pytest.fixture(scope="module")
def compiler(runner: ModelRunner) -> Compiler:
    assert runner.constraints is not None
    tok = AutoTokenizer.from_pretrained(runner.constraints.model_dir)
    return Compiler(tok, runner.vocab_size, EOS)


def constrained(spec: StructuredOutput, **kw: float) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(structured=spec.to_proto(), **kw)  # type: ignore[arg-type]


def reference(hf: AutoModelForCausalLM, compiler: Compiler, spec: StructuredOutput,
              prompt: list[int], n: int) -> list[int]:
    """Greedy under the grammar, up to and including an EOS id (or n tokens)."""
    m, out = matcher(compiler.compile(spec)), []
    mask = torch.zeros(1, (compiler.vocab_size + 31) // 32, dtype=torch.int32)
    while len(out) < n and not m.is_terminated():
        logits = hf_logits(hf, prompt + out)[-1:].clone()
        m.fill_next_token_bitmask(mask, 0)
        apply_token_bitmask(logits, mask, torch.tensor([0]))
        out.append(int(logits.argmax()))
        assert m.accept_token(out[-1])
    return out


def greedy(hf: AutoModelForCausalLM, prompt: list[int], n: int) -> list[int]:
    out: list[int] = []
    for _ in range(n):
        out.append(int(hf_logits(hf, prompt + out)[-1].argmax()))
    return out


def text(runner: ModelRunner, ids: list[int]) -> str:
    assert runner.constraints is not None
    tok = AutoTokenizer.from_pretrained(runner.constraints.model_dir)
    end = next((i for i, t in enumerate(ids) if t in EOS), len(ids))
    return tok.decode(ids[:end])


@pytest.mark.parametrize("spec", [REGEX, CHOICE, SCHEMA], ids=["regex", "choice", "schema"])
def test_greedy_under_a_grammar_follows_the_masked_reference_and_ends_with_eos(
    runner: ModelRunner, hf: AutoModelForCausalLM, compiler: Compiler, spec: StructuredOutput
) -> None:
    expected = reference(hf, compiler, spec, PROMPT, 40)
    assert expected[-1] in EOS, "the grammar completes within 40 tokens"
    free = greedy(hf, PROMPT, len(expected))
    assert expected != free, "the mask changes the output"
    driver = Driver(runner)
    driver.add(1, PROMPT, constrained(spec, temperature=0.0))
    driver.add(2, [0, 4, 4, 4], common_pb2.SamplingParams(temperature=0.0))  # unconstrained
    out = driver.run(len(expected), chunk=4)
    assert out[1] == expected
    assert out[2] == greedy(hf, [0, 4, 4, 4], len(out[2])), "a free row beside it is untouched"


def test_sampled_outputs_always_match_the_constraint(runner: ModelRunner) -> None:
    driver = Driver(runner)
    for i in range(8):
        driver.add(i, PROMPT, constrained(REGEX, temperature=1.0, seed=i))
        driver.add(100 + i, PROMPT, constrained(CHOICE, temperature=1.0, seed=i))
    out = driver.run(24)
    for i in range(8):
        assert set(EOS) & set(out[i]) and re.fullmatch(REGEX.spec, text(runner, out[i]))
        assert text(runner, out[100 + i]) in json.loads(CHOICE.spec)


def test_a_preempted_constrained_sequence_replays_its_output_and_goes_on_unchanged(
    runner: ModelRunner, hf: AutoModelForCausalLM, compiler: Compiler
) -> None:
    expected = reference(hf, compiler, SCHEMA, PROMPT, 40)
    driver = Driver(runner)
    driver.add(1, PROMPT, constrained(SCHEMA, temperature=0.0))
    driver.run(5)
    driver.preempt(1)  # resent `new` with prompt + output as input, and output_ids to replay
    out = driver.run(len(expected), chunk=3)
    assert out[1] == expected
    json.loads(text(runner, out[1]))


def test_seeded_constrained_sampling_is_the_same_after_a_preemption(runner: ModelRunner) -> None:
    whole = Driver(runner)
    whole.add(1, PROMPT, constrained(SCHEMA, temperature=1.0, seed=7))
    expected = whole.run(30)[1]
    driver = Driver(runner)
    driver.add(1, PROMPT, constrained(SCHEMA, temperature=1.0, seed=7))
    driver.run(7)
    driver.preempt(1)
    assert driver.run(30)[1] == expected


def test_a_step_with_a_constrained_sequence_waits_for_the_one_before(runner: ModelRunner) -> None:
    driver = Driver(runner)
    driver.add(1, PROMPT, constrained(REGEX, temperature=0.0))
    driver.add(2, [0, 4, 4, 4], common_pb2.SamplingParams(temperature=0.0))
    driver.run(1)

    def decode(seq_id: int) -> worker_pb2.Step:
        return worker_pb2.Step(decodes=worker_pb2.DecodeBatch(seq_ids=[seq_id]))

    assert runner.depends_on_pending(decode(1)), "its mask needs the token just drawn"
    assert not runner.depends_on_pending(decode(2))
    driver.preempt(1)
    driver.step(only={2})  # the release reaches the worker
    assert not runner.depends_on_pending(decode(2)), "a released row no longer makes steps wait"
