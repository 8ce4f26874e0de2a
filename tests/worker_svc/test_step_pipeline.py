"""The worker's step loop launches step N+1 before finishing step N when N+1 has arrived and N's
tokens are not on the host yet, and still answers in step order with the tokens of a sequential run.

On the CPU a launch computes everything, so a step is ready at once; :class:`Lagging` makes each
step look unfinished until the loop waits for it, as a step on a GPU is, which forces the overlap.
The steps are sent the way the scheduler sends them with two in flight: decode steps that name no
token, feeding whatever the previous step sampled.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from worker_steps import BS

from pagewire.config import WorkerConfig
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc import compute_thread
from worker_svc.runner import ModelRunner, PendingStep
from worker_svc.server import build_runner
from worker_svc.step_pipeline import StepPipeline

PROMPTS = {1: [0, 5, 9, 300, 2], 2: [0, 77, 78], 3: [0, 1, 2, 3, 4, 5, 6, 7, 8]}
GREEDY = common_pb2.SamplingParams(temperature=0.0)
PENALIZED = common_pb2.SamplingParams(temperature=0.0, repetition_penalty=1.5,
                                      frequency_penalty=0.7)


def scheduled_steps(params: common_pb2.SamplingParams, decodes: int) -> list[worker_pb2.Step]:
    """One prefill step, then decode steps that need nothing from earlier results."""
    first = worker_pb2.Step(step_id=1)
    blocks: dict[int, list[int]] = {}
    fed: dict[int, int] = {}
    next_block = 0
    for sid, prompt in PROMPTS.items():
        n = -(-len(prompt) // BS)
        blocks[sid] = list(range(next_block, next_block + n))
        next_block += n
        fed[sid] = len(prompt)
        s = first.seqs.add(seq_id=sid, start_pos=0, token_ids=prompt, block_ids=blocks[sid],
                           sample=True, new=True, prompt_len=len(prompt))
        s.sampling.CopyFrom(params)
    steps = [first]
    for i in range(decodes):
        step = worker_pb2.Step(step_id=2 + i)
        d = step.decodes
        for sid in PROMPTS:
            new = -1
            if fed[sid] // BS >= len(blocks[sid]):
                new = next_block
                blocks[sid].append(new)
                next_block += 1
            d.seq_ids.append(sid)
            d.positions.append(fed[sid])
            d.new_block_ids.append(new)
            d.output_indices.append(i + 1)
            fed[sid] += 1
        steps.append(step)
    return steps


class LaggingTokens:
    """A step's tokens that look still on the device until someone waits for them."""

    def __init__(self, inner: object) -> None:
        self.inner, self.waited = inner, False

    def ready(self) -> bool:
        return self.waited

    def wait(self) -> None:
        self.waited = True

    def numpy(self) -> np.ndarray:
        return self.inner.numpy()  # type: ignore[attr-defined]


class Lagging:
    """The runner, logging its calls, with every step's tokens lagging."""

    def __init__(self, runner: ModelRunner) -> None:
        self.runner, self.calls = runner, []

    def launch(self, step: worker_pb2.Step) -> PendingStep:
        self.calls.append(("launch", step.step_id))
        pending = self.runner.launch(step)
        if pending.tokens is not None:
            pending.tokens = LaggingTokens(pending.tokens)  # type: ignore[assignment]
        return pending

    def finish(self, pending: PendingStep) -> worker_pb2.StepResult:
        self.calls.append(("finish", pending.step.step_id))
        return self.runner.finish(pending)

    def depends_on_pending(self, step: worker_pb2.Step) -> bool:
        return self.runner.depends_on_pending(step)


async def feed(steps: list[worker_pb2.Step]) -> AsyncIterator[worker_pb2.Step]:
    for step in steps:
        yield step


def run_pipeline(runner: object, steps: list[worker_pb2.Step]) -> list[worker_pb2.StepResult]:
    async def go() -> list[worker_pb2.StepResult]:
        return [r async for r in StepPipeline(runner).run(feed(steps))]  # type: ignore[arg-type]

    return asyncio.run(go())


@pytest.fixture(scope="module")
def runners(tiny_model: Path) -> tuple[ModelRunner, ModelRunner]:
    def make() -> ModelRunner:
        return build_runner(WorkerConfig(model=str(tiny_model), num_blocks=128, block_size=BS))[0]

    return make(), make()


def tokens(results: list[worker_pb2.StepResult]) -> list[tuple[int, list[int], list[int]]]:
    return [(r.step_id, list(r.seq_ids), list(r.token_ids)) for r in results]


def run_both(
    runners: tuple[ModelRunner, ModelRunner], steps: list[worker_pb2.Step]
) -> tuple[Lagging, list[worker_pb2.StepResult]]:
    """The steps through the lagging pipeline, its results checked against a sequential run."""
    sequential, overlapped = runners
    sequential.reset()
    expected = [sequential.execute(s) for s in steps]
    overlapped.reset()
    lagging = Lagging(overlapped)
    results = run_pipeline(lagging, steps)
    assert tokens(results) == tokens(expected)
    return lagging, results


def test_launches_ahead_and_answers_in_step_order_with_sequential_tokens(
    runners: tuple[ModelRunner, ModelRunner],
) -> None:
    lagging, results = run_both(runners, scheduled_steps(GREEDY, decodes=10))
    assert [r.step_id for r in results] == list(range(1, 12))
    # Step N+1 went out before step N was answered, never more than two steps launched at once.
    assert lagging.calls[:4] == [("launch", 1), ("launch", 2), ("finish", 1), ("launch", 3)]
    launched = finished = 0
    for kind, _ in lagging.calls:
        launched += kind == "launch"
        finished += kind == "finish"
        assert launched - finished <= 2


def test_a_step_that_needs_the_host_history_waits_for_every_launched_step(
    runners: tuple[ModelRunner, ModelRunner],
) -> None:
    steps = scheduled_steps(PENALIZED, decodes=6)
    lagging, _ = run_both(runners, steps)
    # Penalties read the previous token from the host: no launch ahead of an unfinished step.
    for i in range(1, len(steps)):
        assert lagging.calls.index(("finish", i)) < lagging.calls.index(("launch", i + 1))


def test_on_the_cpu_a_finished_step_is_answered_before_the_next_is_launched(
    runners: tuple[ModelRunner, ModelRunner],
) -> None:
    _, runner = runners
    runner.reset()
    calls: list[tuple[str, int]] = []

    class Logged(Lagging):
        def launch(self, step: worker_pb2.Step) -> PendingStep:
            calls.append(("launch", step.step_id))
            return runner.launch(step)

        def finish(self, pending: PendingStep) -> worker_pb2.StepResult:
            calls.append(("finish", pending.step.step_id))
            return runner.finish(pending)

    run_pipeline(Logged(runner), scheduled_steps(GREEDY, decodes=3))
    assert calls == [(kind, i) for i in range(1, 5) for kind in ("launch", "finish")]


def test_on_the_cpu_a_step_is_launched_and_finished_in_one_call_to_the_compute_thread(
    runners: tuple[ModelRunner, ModelRunner], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A CPU step's tokens are on the host once it is launched: one hand-off to the compute
    thread a step, not one to launch it and one to finish it (each costs a thread wake-up)."""
    _, runner = runners
    runner.reset()
    handoffs: list[str] = []
    run = compute_thread.run

    async def counted(fn, *args):  # type: ignore[no-untyped-def]
        handoffs.append(getattr(fn, "__name__", "?"))
        return await run(fn, *args)

    monkeypatch.setattr(compute_thread, "run", counted)
    steps = scheduled_steps(GREEDY, decodes=5)
    results = run_pipeline(runner, steps)
    assert [r.step_id for r in results] == [s.step_id for s in steps]
    assert handoffs == ["_launch_and_finish"] * len(steps)


def test_on_the_cpu_every_step_runs_on_the_one_compute_thread(
    runners: tuple[ModelRunner, ModelRunner],
) -> None:
    """One thread for every launch and finish, across streams, and it is the thread the server
    loads the model on: a second thread running torch ops would be a second OpenMP team, and
    libgomp then parks its workers between parallel regions (worker_svc/compute_thread.py)."""
    _, runner = runners
    threads: set[int] = set()

    class Recorded(Lagging):
        def launch(self, step: worker_pb2.Step) -> PendingStep:
            threads.add(threading.get_ident())
            return runner.launch(step)

        def finish(self, pending: PendingStep) -> worker_pb2.StepResult:
            threads.add(threading.get_ident())
            return runner.finish(pending)

    for _ in range(2):  # two streams, as after a scheduler reconnects
        runner.reset()
        run_pipeline(Recorded(runner), scheduled_steps(GREEDY, decodes=3))
    assert threads == {compute_thread.call(threading.get_ident)}
    assert threading.get_ident() not in threads
