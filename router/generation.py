"""The one path every generation takes, whatever the front (gRPC ``Generate`` or OpenAI HTTP).

:meth:`Generator.prepare` validates and tokenizes (every refusal is a :class:`RequestError` raised
before anything is submitted, so an HTTP front can still answer with a status code);
:meth:`Generator.stream` submits and streams ``GenerateResponse`` messages.

A request with ``n > 1`` becomes n scheduler requests, ``<rid>-<i>``, each with ``seed + i`` when a
seed is set (so completions differ but each is reproducible), streamed interleaved as they come,
each message tagged with its completion's ``index``. Leaving the stream early (client cancel, an
error) aborts every completion still running; a completion ended by a stop string is aborted
downstream at once, since only the router knows it is done.

``best_of`` > n runs best_of candidates and keeps the n best (``router.best_of``). ``echo`` puts the
prompt on each completion's first message; with ``max_tokens`` 0 it is all there is: one token is
generated (the scheduler's requests always generate) and dropped, so the prompt's logprobs can
be scored (lm-eval-harness's loglikelihood).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass

import grpc
from opentelemetry.context import Context

from pagewire import tracing
from pagewire.metrics import RequestTimer, RouterMetrics
from pagewire.sampling import MAX_SEED, Limits, SamplingParams, ValidationError, validate
from pagewire.v1 import common_pb2, generation_pb2, scheduler_pb2
from router import best_of, tools, vllm_extras
from router.chat_output import OutputSpec
from router.completion import CompletionStream
from router.errors import RequestError
from router.event_inbox import EventInbox
from router.model import ServedModel
from router.placement import Placer
from router.scheduler_link import SchedulerLink

MAX_REQUEST_ID_CHARS = 128
MAX_PRIORITY = 1000
MAX_CACHE_SALT_CHARS = 1024


@dataclass(frozen=True)
class ValidatedRequest:
    """A validated request, ready to submit."""

    rid: str
    prompt: list[int]
    params: SamplingParams
    priority: int
    echo_text: str | None = None  # echo: the prompt's text, sent back with each completion
    prompt_only: bool = False  # echo with max_tokens 0: the generated token is dropped
    output: OutputSpec | None = None  # chat: reasoning and tool calls parsed out of the text
    images: tuple[common_pb2.ImageInput, ...] = ()  # the prompt's, by placeholder run
    cache_salt: bytes = b""  # mixed into the prompt's block hashes (pagewire.block_hash)
    return_prompt_ids: bool = False  # the prompt's ids on each completion's first message

    @property
    def candidates(self) -> int:
        """Completions run downstream: best_of of them when set, else n."""
        return self.params.best_of or self.params.n

    def completion_id(self, i: int) -> str:
        return self.rid if self.candidates == 1 else f"{self.rid}-{i}"

    def submit_request(self, i: int) -> scheduler_pb2.SubmitRequest:
        seed = None if self.params.seed is None else (self.params.seed + i) % (MAX_SEED + 1)
        logprobs = self.params.logprobs
        if self.candidates > self.params.n and logprobs is None:
            logprobs = 0  # best_of ranks candidates by their sampled tokens' logprobs
        one = dataclasses.replace(self.params, n=1, best_of=None, seed=seed, logprobs=logprobs)
        return scheduler_pb2.SubmitRequest(
            request_id=self.completion_id(i),
            prompt_token_ids=self.prompt,
            sampling=one.to_proto(),
            priority=self.priority,
            images=self.images,
            cache_salt=self.cache_salt,
        )


class Generator:
    def __init__(
        self,
        model: ServedModel,
        placer: Placer,
        limits: Limits,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self.model = model
        self.placer = placer  # the worker for a prompt, and the link to its scheduler
        self.limits = limits
        self.metrics = metrics
        self.draining = False  # SIGTERM: new requests are refused, those in flight finish

    async def prepare(
        self, request: generation_pb2.GenerateRequest, *, fill_context: bool = False
    ) -> ValidatedRequest:
        """Validate and tokenize. ``fill_context``: an unset max_tokens means "up to the model's
        context" (OpenAI's chat default) instead of the API's 16."""
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "", "router is shutting down")
        self.model.check_name(request.model)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError.invalid("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters")
        if not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
            raise RequestError.invalid(
                "priority", f"must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {request.priority}"
            )
        chat_tools = tools.check_tools(request.chat) if request.HasField("chat") else None
        template_tools = chat_tools.template_tools if chat_tools is not None else None
        prompt, images = await self.model.prompt(request, "prompt", template_tools)
        truncated = request.HasField("truncate_prompt_tokens")
        if truncated:
            prompt = vllm_extras.truncate(prompt, request.truncate_prompt_tokens, bool(images))
        if len(request.cache_salt) > MAX_CACHE_SALT_CHARS:
            raise RequestError.invalid("cache_salt", f"at most {MAX_CACHE_SALT_CHARS} characters")
        output = None
        if chat_tools is not None:
            tail = self.model.tokenizer.decode(prompt[-4:]) if self.model.reasoning_parser else ""
            output = tools.output_spec(
                chat_tools, self.model.tool_call_parser, self.model.reasoning_parser, tail
            )
        sampling = request.sampling
        constrained = tools.constrain(sampling, chat_tools) if chat_tools is not None else None
        if constrained is not None:  # validated below as a client's constraint is
            sampling = constrained
        sampling = vllm_extras.with_bad_words_ids(sampling, self.model.tokenizer)
        room = self.model.max_model_len - len(prompt)
        prompt_only = request.echo and sampling.HasField("max_tokens") and sampling.max_tokens == 0
        if prompt_only or (fill_context and not sampling.HasField("max_tokens") and prompt and room > 0):
            sampling = _copy(sampling)
            sampling.max_tokens = 1 if prompt_only else room
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
        if params.structured is not None:  # a spec the engine cannot compile: refused here
            try:
                await self.model.check_structured(params.structured)
            except RequestError as e:  # a tool's schema the engine cannot serve
                raise (e if constrained is None else e.renamed("tool_choice")) from None
        if output is not None and output.tool_parser == "mistral":
            # [TOOL_CALLS] is a control token: skipping special tokens would hide the calls.
            params = dataclasses.replace(params, skip_special_tokens=False)
        echo_text = None
        if request.echo:
            kind = request.WhichOneof("prompt")
            echo_text = (request.text if kind == "text" and not truncated
                         else self.model.tokenizer.decode(prompt))
        rid = request.request_id or uuid.uuid4().hex
        return ValidatedRequest(rid, prompt, params, request.priority, echo_text, prompt_only,
                                output, tuple(images), request.cache_salt.encode(),
                                request.return_prompt_token_ids)

    def stream(
        self, plan: ValidatedRequest, parent: Context | None = None
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        """Submit the plan's completions and yield their responses as they come (with best_of,
        the n best, once all candidates are done). Nothing is submitted before the first
        iteration.

        Close the iterator (``contextlib.aclosing``) when leaving early: that aborts the rest.
        ``parent``: the client's trace context; the router's span (the root of the scheduler's
        and worker's spans for this request) is its child.
        """
        responses = self._stream(plan, parent)
        if plan.candidates > plan.params.n:
            keep_logprobs = plan.params.logprobs is not None
            return best_of.select(responses, plan.params.n, keep_logprobs)
        return responses  # itself: a layer around it would cost each streamed token a hop

    async def _stream(
        self, plan: ValidatedRequest, parent: Context | None
    ) -> AsyncGenerator[generation_pb2.GenerateResponse, None]:
        n = plan.candidates
        span = tracing.start_span(tracing.ROUTER_SPAN, parent, {
            tracing.REQUEST_ID: plan.rid, tracing.PROMPT_TOKENS: len(plan.prompt),
        }, kind=tracing.SpanKind.SERVER)
        completions = [
            CompletionStream(plan.rid, i, plan.prompt, plan.params, self.model.tokenizer,
                             echo_text=plan.echo_text, prompt_only=plan.prompt_only,
                             output=plan.output, send_prompt_ids=plan.return_prompt_ids)
            for i in range(n)
        ]
        timers = [RequestTimer() for _ in range(n)]
        submits = [plan.submit_request(i) for i in range(n)]
        ids = [sub.request_id for sub in submits]
        try:
            self.placer.ids.claim(ids, plan.rid)
            try:
                placement = await self.placer.place(plan.prompt, plan.images, plan.cache_salt)
            except RequestError:
                self.placer.ids.release(ids)
                raise
        except RequestError as e:
            tracing.end_span(span, {}, error=e)
            raise
        link, worker_id = placement.link, placement.worker_id
        for sub in submits:
            sub.worker_id = worker_id
            sub.trace_context.update(tracing.inject(span))
        queues = [link.submit(sub) for sub in submits]
        events = _Merged(queues)
        error: BaseException | None = None
        try:
            while not all(c.done for c in completions):
                active = [i for i, c in enumerate(completions) if not c.done]
                for i, event in await events.next(active):
                    if event.error_code:
                        raise RequestError.from_code(event.error_code, event.error_message)
                    completion = completions[i]
                    response = completion.on_event(event)
                    if completion.done:  # a stop string: the scheduler does not know yet
                        _release(link, plan, completion)
                    if response is not None:
                        if response.token_ids:
                            timers[i].tokens_sent()
                        yield response
        except RequestError as e:
            error = e
            raise
        finally:
            events.close()
            for completion in completions:
                _release(link, plan, completion)
            self.placer.ids.release(ids)
            self._record(plan, span, completions, timers, error, worker_id)

    def _record(
        self,
        plan: ValidatedRequest,
        span: tracing.Span,
        completions: list[CompletionStream],
        timers: list[RequestTimer],
        error: BaseException | None,
        worker_id: str,
    ) -> None:
        """Metrics per completion, and the router's span, once the request has ended."""
        reasons = [
            common_pb2.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower()
            if c.done else ("error" if error is not None else "abort")
            for c in completions
        ]
        if self.metrics is not None:
            for c, timer, reason in zip(completions, timers, reasons, strict=True):
                self.metrics.observe_finished(timer, len(plan.prompt), c.completion, reason)
        tracing.end_span(span, {
            tracing.OUTPUT_TOKENS: sum(c.completion for c in completions),
            tracing.CACHED_TOKENS: min(c.cached_tokens for c in completions),
            tracing.FINISH_REASON: ",".join(reasons),
            tracing.WORKER_ID: worker_id,
        }, error=error)



def _copy(sampling: common_pb2.SamplingParams) -> common_pb2.SamplingParams:
    copy = common_pb2.SamplingParams()
    copy.CopyFrom(sampling)
    return copy


def _release(link: SchedulerLink, plan: ValidatedRequest, completion: CompletionStream) -> None:
    """Forget the completion; abort it downstream unless the scheduler finished it."""
    link.finish(plan.completion_id(completion.index), abort=not completion.scheduler_done)


class _Merged:
    """Several completions' event queues read as one stream, in arrival order.

    Each queue has at most one pending ``get`` at a time, so a completion's events stay in order.
    With one queue (n = 1, the common case) it is a plain ``get``, with no task per event.
    """

    def __init__(self, queues: list[EventInbox]) -> None:
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
