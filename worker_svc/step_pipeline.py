"""The worker's step loop: launch step N+1 while step N is still on the device.

The scheduler keeps two steps in flight, so step N+1 often arrives while step N computes. Launching
it at once (layout, input copy, kernel launches) lets the host work of N+1 overlap the GPU work of
N, and the GPU goes from N to N+1 without waiting for Python. Results still leave in step order,
each as soon as its tokens are on the host:

- a finished step is answered before anything else is launched (on the CPU, where a launch is the
  whole computation, this keeps the loop exactly sequential: no result waits behind a later step);
- a step that reads host state an unfinished step writes (penalties need the token history) waits
  until every launched step is finished;
- at most ``depth`` steps are launched and unanswered at once;
- steps waiting right behind the one launched that join it (:mod:`worker_svc.step_join`) run
  inside it, and each gets its own result.

Where a launch only queues device work (CUDA) it runs on the event loop's own thread, as does a
finish, which runs once the tokens are on the host: a thread hand-off costs more than either.
Only the wait for the device runs in a thread, so that a step arriving meanwhile is launched. On
the CPU, where a launch is the whole forward pass, launches and finishes run on the worker's one
compute thread (:mod:`worker_svc.compute_thread`) so the server stays responsive, and a step
launched with none before it unanswered is finished in the same call: each hand-off to that
thread and back costs 0.2-0.5 ms on a 2-vCPU VM, up to a tenth of a one-sequence decode step.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import torch

from pagewire.v1 import worker_pb2
from worker_svc import compute_thread, step_join
from worker_svc.runner import PendingStep


class Runner(Protocol):
    device: torch.device

    def launch(self, step: worker_pb2.Step) -> PendingStep: ...
    def finish(self, pending: PendingStep) -> worker_pb2.StepResult: ...
    def depends_on_pending(self, step: worker_pb2.Step) -> bool: ...


class StepPipeline:
    """Steps in, results out in the same order; launch and finish interleaved as above."""

    def __init__(self, runner: Runner, depth: int = 2,
                 on_result: Callable[[PendingStep], None] | None = None) -> None:
        self.runner, self.depth, self.on_result = runner, depth, on_result
        self.inline = getattr(runner, "device", torch.device("cpu")).type == "cuda"
        self.inbox: deque[worker_pb2.Step] = deque()
        self.arrived = asyncio.Event()
        self.closed = False
        self.pending: deque[PendingStep] = deque()
        self.joined: dict[int, list[worker_pb2.Step]] = {}  # step id -> the steps run inside it

    async def run(self, steps: AsyncIterator[worker_pb2.Step]) -> AsyncIterator[worker_pb2.StepResult]:
        reader = asyncio.create_task(self._read(steps))
        try:
            while True:
                if self.pending and self.pending[0].ready():
                    for result in await self._finish():
                        yield result
                elif self.inbox and len(self.pending) < self.depth:
                    step = self._take_step()
                    if self.pending and self.runner.depends_on_pending(step):
                        while self.pending:
                            for result in await self._finish():
                                yield result
                    for result in await self._launch(step):
                        yield result
                elif self.pending:
                    await self._wait_head()
                elif self.closed:
                    break
                else:
                    self.arrived.clear()
                    await self.arrived.wait()
            reader.result()  # the request stream's error, if it broke
        finally:
            reader.cancel()

    async def _read(self, steps: AsyncIterator[worker_pb2.Step]) -> None:
        try:
            async for step in steps:
                self.inbox.append(step)
                self.arrived.set()
        finally:
            self.closed = True
            self.arrived.set()

    async def _wait_head(self) -> None:
        """Until the oldest step's tokens are on the host, or (with room) a new step arrives."""
        head = asyncio.ensure_future(asyncio.to_thread(self.pending[0].wait))
        if len(self.pending) >= self.depth or self.closed:
            await head
            return
        self.arrived.clear()
        if self.inbox:
            head.cancel()  # the thread finishes its wait on its own; nothing depends on it
            return
        arrival = asyncio.ensure_future(self.arrived.wait())
        await asyncio.wait({head, arrival}, return_when=asyncio.FIRST_COMPLETED)
        arrival.cancel()

    async def _launch(self, step: worker_pb2.Step) -> list[worker_pb2.StepResult]:
        """Launch ``step``; its results where it was also finished. On the CPU, with nothing
        launched before it unanswered, it is finished in the same call to the compute thread
        (its tokens are on the host once it is launched): one thread hand-off a step, not two."""
        if self.inline or self.pending:
            self.pending.append(await self._call(self.runner.launch, step))
            return []
        pending, result = await compute_thread.run(self._launch_and_finish, step)
        if result is None:  # its tokens are not on the host yet
            self.pending.append(pending)
            return []
        return self._answered(pending, result)

    async def _call(self, fn: Callable[..., Any], arg: Any) -> Any:
        return fn(arg) if self.inline else await compute_thread.run(fn, arg)

    def _take_step(self) -> worker_pb2.Step:
        """The next step to launch, with the steps that join it merged in."""
        step = self.inbox.popleft()
        joiners = step_join.take_joiners(step, self.inbox)
        if not joiners:
            return step
        self.joined[step.step_id] = joiners
        return step_join.merged(step, joiners)

    async def _finish(self) -> list[worker_pb2.StepResult]:
        """The oldest launched step's result; one per step if others ran inside it."""
        pending = self.pending.popleft()
        return self._answered(pending, await self._call(self.runner.finish, pending))

    def _launch_and_finish(
        self, step: worker_pb2.Step
    ) -> tuple[PendingStep, worker_pb2.StepResult | None]:
        """On the compute thread: launch ``step`` and, where its tokens are then on the host (a
        CPU step), finish it in the same call."""
        pending = self.runner.launch(step)
        return pending, self.runner.finish(pending) if pending.ready() else None

    def _answered(self, pending: PendingStep,
                  result: worker_pb2.StepResult) -> list[worker_pb2.StepResult]:
        if self.on_result is not None:
            self.on_result(pending)
        return step_join.split(result, self.joined.pop(result.step_id, []))
