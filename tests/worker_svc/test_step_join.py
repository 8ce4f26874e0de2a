"""A step that joins the one before it (``Step.joins``) runs inside that step when the worker has
not begun it -- one forward pass, a result for each, the same tokens as run one after the other --
and after it, as any step, when the worker has."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from worker_steps import BS

from pagewire.config import WorkerConfig
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc.runner import ModelRunner, PendingStep
from worker_svc.server import build_runner
from worker_svc.step_join import split
from worker_svc.step_pipeline import StepPipeline

PROMPTS = {1: [0, 5, 9, 300, 2], 2: [0, 77, 78], 3: [0, 1, 2, 3, 4, 5, 6, 7, 8]}
GREEDY = common_pb2.SamplingParams(temperature=0.0)


def prefill(step: worker_pb2.Step, sid: int, first_block: int) -> None:
    prompt = PROMPTS[sid]
    blocks = list(range(first_block, first_block + -(-(len(prompt) + 1) // BS)))
    s = step.seqs.add(seq_id=sid, start_pos=0, token_ids=prompt, block_ids=blocks, sample=True,
                      new=True, prompt_len=len(prompt))
    s.sampling.CopyFrom(GREEDY)


def three_steps() -> list[worker_pb2.Step]:
    """Prompts 1 and 2, then their decodes (step 2), and prompt 3 arriving as a joiner of step 2."""
    first = worker_pb2.Step(step_id=1)
    prefill(first, 1, 0)
    prefill(first, 2, 10)
    second = worker_pb2.Step(step_id=2)
    d = second.decodes
    for sid in (1, 2):
        d.seq_ids.append(sid)
        d.positions.append(len(PROMPTS[sid]))
        d.new_block_ids.append(-1)
        d.output_indices.append(1)
    joiner = worker_pb2.Step(step_id=3, joins=2)
    prefill(joiner, 3, 20)
    return [first, second, joiner]


class Recorded:
    """The runner, noting the steps and sequences of every pass it runs."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.passes = runner, []
        self.began = threading.Event()  # step 2's pass began

    def launch(self, step: worker_pb2.Step) -> PendingStep:
        seqs = [*step.decodes.seq_ids, *(s.seq_id for s in step.seqs)]
        self.passes.append((step.step_id, sorted(seqs)))
        self.began.set() if step.step_id == 2 else None
        return self.runner.launch(step)

    def finish(self, pending: PendingStep) -> worker_pb2.StepResult:
        return self.runner.finish(pending)

    def depends_on_pending(self, step: worker_pb2.Step) -> bool:
        return self.runner.depends_on_pending(step)


@pytest.fixture(scope="module")
def runner(tiny_model: Path) -> ModelRunner:
    return build_runner(WorkerConfig(model=str(tiny_model), num_blocks=64, block_size=BS))[0]


def sequential(runner: ModelRunner, steps: list[worker_pb2.Step]) -> list[tuple[int, list, list]]:
    runner.reset()
    alone = []
    for step in steps:
        plain = worker_pb2.Step()
        plain.CopyFrom(step)
        plain.joins = 0
        alone.append(runner.execute(plain))
    return [(r.step_id, list(r.seq_ids), list(r.token_ids)) for r in alone]


def run(recorded: Recorded, steps: AsyncIterator[worker_pb2.Step]) -> list[worker_pb2.StepResult]:
    async def go() -> list[worker_pb2.StepResult]:
        return [r async for r in StepPipeline(recorded).run(steps)]  # type: ignore[arg-type]

    recorded.runner.reset()
    return asyncio.run(go())


def test_a_joiner_waiting_behind_its_step_runs_inside_it_with_the_same_tokens(
    runner: ModelRunner,
) -> None:
    steps = three_steps()
    expected = sequential(runner, steps)

    async def at_once() -> AsyncIterator[worker_pb2.Step]:
        for step in steps:
            yield step

    recorded = Recorded(runner)
    results = run(recorded, at_once())
    assert recorded.passes == [(1, [1, 2]), (2, [1, 2, 3])]  # two passes for three steps
    assert [(r.step_id, list(r.seq_ids), list(r.token_ids)) for r in results] == expected
    assert results[0].compute_ms > 0
    assert results[1].compute_ms == results[2].compute_ms == 0  # no one step's time


def test_a_joiner_that_arrives_after_its_step_began_runs_after_it(runner: ModelRunner) -> None:
    steps = three_steps()
    expected = sequential(runner, steps)
    recorded = Recorded(runner)

    async def late() -> AsyncIterator[worker_pb2.Step]:
        yield steps[0]
        yield steps[1]
        await asyncio.to_thread(recorded.began.wait)
        yield steps[2]

    results = run(recorded, late())
    assert recorded.passes == [(1, [1, 2]), (2, [1, 2]), (3, [3])]
    assert [(r.step_id, list(r.seq_ids), list(r.token_ids)) for r in results] == expected


def test_a_merged_result_is_split_by_sequence() -> None:
    merged = worker_pb2.StepResult(step_id=7, seq_ids=[1, 2, 3, 4], token_ids=[10, 20, 30, 40],
                                   compute_ms=50.0)
    merged.logprobs.add()  # sequences 1 and 2 (step 7's) asked for no logprobs; 3 did
    merged.logprobs.add()
    merged.logprobs.add(token_id=30, logprob=-0.5, rank=1)
    merged.logprobs.add()
    merged.prompt_logprobs.add(seq_id=3, start_index=1)
    merged.embeddings.add(seq_id=2, values=[0.5])
    joiners = [worker_pb2.Step(step_id=8, joins=7), worker_pb2.Step(step_id=9, joins=7)]
    joiners[0].seqs.add(seq_id=3)
    joiners[1].seqs.add(seq_id=4)
    head, first, second = split(merged, joiners)
    assert (head.step_id, list(head.seq_ids), list(head.token_ids)) == (7, [1, 2], [10, 20])
    assert (first.step_id, list(first.seq_ids), list(first.token_ids)) == (8, [3], [30])
    assert (second.step_id, list(second.seq_ids), list(second.token_ids)) == (9, [4], [40])
    assert not head.logprobs and not second.logprobs  # none of theirs asked
    assert [e.token_id for e in first.logprobs] == [30]
    assert [c.seq_id for c in first.prompt_logprobs] == [3] and not head.prompt_logprobs
    assert [e.seq_id for e in head.embeddings] == [2]
    assert head.compute_ms == first.compute_ms == second.compute_ms == 0

    failed = worker_pb2.StepResult(step_id=7, unknown_seq_ids=[2])
    head, first, second = split(failed, joiners)
    assert list(head.unknown_seq_ids) == [2]
    assert list(first.unknown_seq_ids) == [3] and list(second.unknown_seq_ids) == [4]
    assert split(merged, []) == [merged]
