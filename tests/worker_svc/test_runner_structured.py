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


def decode_step(driver: Driver, seq_id: int, step_id: int) -> worker_pb2.Step:
    """The next decode of ``seq_id``, feeding the worker's own last sample (as the scheduler
    sends step N+1 before step N's result is back)."""
    t = driver.tracks[seq_id]
    new = driver._grow(t, t.fed + 1)
    step = worker_pb2.Step(step_id=step_id, decodes=worker_pb2.DecodeBatch(
        seq_ids=[seq_id], positions=[t.fed], new_block_ids=[new[0] if new else -1],
        output_indices=[len(t.output)]))
    t.fed += 1
    t.output.append(-1)  # its token is not known yet
    return step


def test_a_constrained_step_launched_before_the_last_one_finished_masks_with_its_token(
    runner: ModelRunner, hf: AutoModelForCausalLM, compiler: Compiler
) -> None:
    """Constrained steps do not make the pipeline drain: step N+1 is launched (forward queued)
    before step N is finished, and still samples under the mask that N's token leaves."""
    expected = reference(hf, compiler, SCHEMA, PROMPT, 12)
    driver = Driver(runner)
    driver.add(1, PROMPT, constrained(SCHEMA, temperature=0.0))
    driver.add(2, [0, 4, 4, 4], common_pb2.SamplingParams(temperature=0.0, presence_penalty=0.5))
    first = driver.step()  # prefills, and the first sample
    assert list(first.token_ids)[list(first.seq_ids).index(1)] == expected[0]
    out = [expected[0]]
    step_id = 10
    pending = runner.launch(decode_step(driver, 1, step_id))
    while len(out) < len(expected):
        step_id += 1
        follow = decode_step(driver, 1, step_id)
        assert not runner.depends_on_pending(follow), "a constrained decode does not drain"
        nxt = runner.launch(follow)  # launched before `pending` is finished
        out.extend(runner.finish(pending).token_ids)
        pending = nxt
    runner.finish(pending)
    assert out[: len(expected)] == expected
    penalized = worker_pb2.Step(decodes=worker_pb2.DecodeBatch(seq_ids=[2]))
    assert runner.depends_on_pending(penalized), "penalties still need the token history"
