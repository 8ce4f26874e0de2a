"""The one path every generation takes, whatever the front (gRPC ``Generate`` or OpenAI HTTP).

:meth:`Generator.prepare` validates and tokenizes (every refusal is a :class:`RequestError` raised
before anything is submitted, so an HTTP front can still answer with a status code);
:meth:`Generator.stream` submits and streams ``GenerateResponse`` messages.

A request with ``n > 1`` becomes n scheduler requests, ``<rid>-<i>``, each with ``seed + i`` when a
seed is set (so completions differ but each is reproducible), streamed interleaved as they come,
each message tagged with its completion's ``index``. Leaving the stream early (client cancel, an
error) aborts every completion still running; a completion ended by a stop string is aborted
downstream at once, since only the router knows it is done.
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagewire.sampling import MAX_SEED, Limits, SamplingParams, ValidationError, validate
from pagewire.v1 import generation_pb2, scheduler_pb2
from router.completion import CompletionStream
from router.errors import RequestError
from router.model import ServedModel
from router.scheduler_link import SchedulerLink

MAX_REQUEST_ID_CHARS = 128
MAX_PRIORITY = 1000


@dataclass(frozen=True)
class Plan:
    """A validated request, ready to submit."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    priority: int

    def completion_id(self, i: int) -> str:
        return self.rid if self.params.n == 1 else f"{self.rid}-{i}"

    def submit_request(self, i: int) -> scheduler_pb2.SubmitRequest:
        seed = None if self.params.seed is None else (self.params.seed + i) % (MAX_SEED + 1)
        one = dataclasses.replace(self.params, n=1, seed=seed)
        return scheduler_pb2.SubmitRequest(
            request_id=self.completion_id(i),
            prompt_token_ids=self.prompt,
            sampling=one.to_proto(),
            priority=self.priority,
        )


class Generator:
    def __init__(self, model: ServedModel, link: SchedulerLink, limits: Limits) -> None:
        self.model = model
        self.link = link
        self.limits = limits

    async def prepare(
        self, request: generation_pb2.GenerateRequest, *, fill_context: bool = False
    ) -> Plan:
        """Validate and tokenize. ``fill_context``: an unset max_tokens means "up to the model's
        context" (OpenAI's chat default) instead of the API's 16."""
        self.model.check_name(request.model)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError.invalid("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
        if not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
            raise RequestError.invalid(
                "priority", f"must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {request.priority}"
            )
        prompt = await self.model.prompt_ids(request, "prompt")
        sampling = request.sampling
        room = self.model.max_model_len - len(prompt)
        if fill_context and not sampling.HasField("max_tokens") and prompt and room > 0:
            sampling = type(sampling)()
            sampling.CopyFrom(request.sampling)
            sampling.max_tokens = room
        try:
            params = validate(
                sampling,
                prompt_len=len(prompt),
                max_model_len=self.model.max_model_len,
                vocab_size=self.model.vocab_size,
                limits=self.limits,
            )
        except ValidationError as e:
            raise RequestError.from_validation(e) from None
        return Plan(request.request_id or uuid.uuid4().hex, prompt, params, request.priority)

    async def stream(self, plan: Plan) -> AsyncIterator[generation_pb2.GenerateResponse]:
        """Submit the plan's completions and yield their responses as they come.

        Close the iterator (``contextlib.aclosing``) when leaving early: that aborts the rest.
        """
        n = plan.params.n
        completions = [
            CompletionStream(plan.rid, i, plan.prompt, plan.params, self.model.tokenizer)
            for i in range(n)
        ]
        queues = [self.link.submit(plan.submit_request(i)) for i in range(n)]
        events = _Merged(queues)
        try:
            while not all(c.done for c in completions):
                active = [i for i, c in enumerate(completions) if not c.done]
                for i, event in await events.next(active):
                    if event.error_code:
                        raise RequestError.from_code(event.error_code, event.error_message)
                    completion = completions[i]
                    response = completion.on_event(event)
                    if completion.done:  # a stop string: the scheduler does not know yet
                        self._release(plan, completion)
                    if response is not None:
                        yield response
        finally:
            events.close()
            for completion in completions:
                self._release(plan, completion)

    def _release(self, plan: Plan, completion: CompletionStream) -> None:
        """Forget the completion; abort it downstream unless the scheduler finished it."""
        self.link.finish(plan.completion_id(completion.index), abort=not completion.scheduler_done)


class _Merged:
    """Several completions' event queues read as one stream, in arrival order.

    Each queue has at most one pending ``get`` at a time, so a completion's events stay in order.
    With one queue (n = 1, the common case) it is a plain ``get``, with no task per event.
    """

    def __init__(self, queues: list[asyncio.Queue[scheduler_pb2.TokenEvent]]) -> None:
        self.queues = queues
        self.getters: dict[int, asyncio.Future[scheduler_pb2.TokenEvent]] = {}

    async def next(self, active: list[int]) -> list[tuple[int, scheduler_pb2.TokenEvent]]:
        """The next event(s) of the ``active`` queues: at least one, each (queue index, event)."""
        if len(self.queues) == 1:
            return [(0, await self.queues[0].get())]
        for i in active:
            if i not in self.getters:
                self.getters[i] = asyncio.ensure_future(self.queues[i].get())
        pending = [self.getters[i] for i in active]
        done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        ready = [i for i in active if self.getters[i] in done]
        return [(i, self.getters.pop(i).result()) for i in ready]

    def close(self) -> None:
        for getter in self.getters.values():
            getter.cancel()
        self.getters.clear()
