"""The router process: the public ``Generation`` API.

Validates, tokenizes, submits to the scheduler, turns the token stream back into text (UTF-8 safe,
stop strings applied) and streams deltas to the client. It keeps no state that must survive it.
Start: ``python -m router.server --model DIR --scheduler HOST:PORT``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagewire import config as pwconfig
from pagewire import serving
from pagewire.sampling import SamplingParams, ValidationError, validate
from pagewire.v1 import (
    common_pb2,
    generation_pb2,
    generation_pb2_grpc,
    scheduler_pb2,
)
from router.detokenizer import IncrementalDetokenizer
from router.scheduler_link import SchedulerLink
from router.stop_strings import StopStringMatcher

log = logging.getLogger("router")
SERVICE = "pagewire.v1.Generation"
MAX_REQUEST_ID_CHARS = 128
MAX_PRIORITY = 1000
TOKENIZE_IN_THREAD_CHARS = 16_384  # longer prompts are tokenized off the event loop


def _status(code: int) -> grpc.StatusCode:
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


class _OutputStream:
    """One request's token events turned into client responses: text deltas, stop strings, usage.

    Events carry their index in the output, so a replay after a scheduler restart is trimmed to
    what was not forwarded yet: nothing is lost or repeated.
    """

    def __init__(
        self, rid: str, prompt: list[int], params: SamplingParams, tokenizer: PreTrainedTokenizerBase
    ) -> None:
        self.rid = rid
        self.prompt_tokens = len(prompt)
        self.detok = IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop)
        self.completion = 0
        self.done = False

    def on_event(self, event: scheduler_pb2.TokenEvent) -> list[generation_pb2.GenerateResponse]:
        finished = event.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        if event.index + len(event.token_ids) <= self.completion and not finished:
            return []
        new_ids = list(event.token_ids)[max(self.completion - event.index, 0) :]
        self.completion += len(new_ids)
        text_ids = new_ids
        if finished and event.finish_reason == common_pb2.FINISH_REASON_STOP and new_ids:
            text_ids = new_ids[:-1]  # the stop / EOS token's text is not emitted
        text = self.detok.add(text_ids)
        if finished:
            text += self.detok.finish()
        matched = self.stops.feed(text)
        if not finished and not matched.stopped:
            if not matched.text and not new_ids:
                return []
            return [generation_pb2.GenerateResponse(request_id=self.rid, text=matched.text, token_ids=new_ids)]
        text = matched.text if matched.stopped else matched.text + self.stops.flush()
        self.done = True
        return [
            generation_pb2.GenerateResponse(
                request_id=self.rid,
                text=text,
                token_ids=new_ids,
                finish_reason=common_pb2.FINISH_REASON_STOP if matched.stopped else event.finish_reason,
                stop_string=matched.stop_string or "",
                usage=common_pb2.Usage(
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion,
                    cached_tokens=event.cached_tokens,
                ),
            )
        ]


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        cfg: pwconfig.RouterConfig,
        tokenizer: PreTrainedTokenizerBase,
        hf_config: dict,
        link: SchedulerLink,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.model_name = cfg.served_model_name or Path(cfg.model).resolve().name
        self.max_model_len = int(hf_config.get("max_position_embeddings", 4096))
        self.vocab_size = int(hf_config["vocab_size"])
        self.link = link

    async def _check_model(self, model: str, context: grpc.aio.ServicerContext) -> None:
        if model and model != self.model_name:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"model: unknown model {model!r}; served: {self.model_name!r}"
            )

    async def _prompt_ids(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> list[int]:
        kind = request.WhichOneof("prompt")
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"token_ids: each id must be in [0, {self.vocab_size}), got {bad}",
                )
            return ids
        text = request.text if kind == "text" else ""
        if not text:
            return []
        if len(text) > self.cfg.max_prompt_chars:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"text: prompt is {len(text)} characters; the limit is {self.cfg.max_prompt_chars}",
            )
        if len(text) > TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(self.tokenizer.encode, text)
        return self.tokenizer.encode(text)

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        await self._check_model(request.model, context)
        if len(request.request_id) > MAX_REQUEST_ID_CHARS:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request_id: at most {MAX_REQUEST_ID_CHARS} characters"
            )
        prompt = await self._prompt_ids(request, context)
        try:
            params = validate(
                request.sampling,
                prompt_len=len(prompt),
                max_model_len=self.max_model_len,
                vocab_size=self.vocab_size,
            )
        except ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        if not -MAX_PRIORITY <= request.priority <= MAX_PRIORITY:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"priority: must be in [-{MAX_PRIORITY}, {MAX_PRIORITY}], got {request.priority}",
            )
        rid = request.request_id or uuid.uuid4().hex
        stream = _OutputStream(rid, prompt, params, self.tokenizer)
        events = self.link.submit(
            scheduler_pb2.SubmitRequest(
                request_id=rid, prompt_token_ids=prompt, sampling=params.to_proto(),
                priority=request.priority,
            )
        )
        try:
            while not stream.done:
                event = await events.get()
                if event.error_code:
                    await context.abort(_status(event.error_code), event.error_message)
                for response in stream.on_event(event):
                    yield response
        finally:
            self.link.finish(rid, abort=not stream.done)

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        await self._check_model(request.model, context)
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        return generation_pb2.TokenizeResponse(
            token_ids=self.tokenizer.encode(request.text, add_special_tokens=add)
        )

    async def Detokenize(
        self, request: generation_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.DetokenizeResponse:
        await self._check_model(request.model, context)
        bad = next((t for t in request.token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"token_ids: each id must be in [0, {self.vocab_size}), got {bad}",
            )
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = self.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
        return generation_pb2.DetokenizeResponse(text=text)

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        info = generation_pb2.ModelInfo(
            name=self.model_name, max_model_len=self.max_model_len, vocab_size=self.vocab_size
        )
        return generation_pb2.ListModelsResponse(models=[info])


async def serve(cfg: pwconfig.RouterConfig) -> None:
    if not cfg.model or not cfg.scheduler:
        raise SystemExit("--model and --scheduler are required")
    tokenizer = AutoTokenizer.from_pretrained(cfg.model)
    hf_config = json.loads((Path(cfg.model) / "config.json").read_text())
    link = SchedulerLink(cfg.scheduler, cfg.resume_timeout_s)
    service = GenerationService(cfg, tokenizer, hf_config, link)
    server, health_servicer = serving.new_server([SERVICE])
    generation_pb2_grpc.add_GenerationServicer_to_server(service, server)
    port = server.add_insecure_port(f"{cfg.host}:{cfg.port}")
    await server.start()
    await serving.wait_healthy(cfg.scheduler, timeout=300)
    link_task = asyncio.create_task(link.run())
    await serving.set_serving(health_servicer, [SERVICE], True)
    log.info("router on %s:%d serving %s via scheduler %s", cfg.host, port, service.model_name, cfg.scheduler)

    try:
        await serving.run_until_signalled(server, health_servicer, [SERVICE])
    finally:
        link_task.cancel()
        await asyncio.gather(link_task, return_exceptions=True)


def main(argv: Sequence[str] | None = None) -> None:
    cfg = pwconfig.parse(pwconfig.RouterConfig, argv, prog="pagewire-router")
    serving.setup_logging(cfg.log_level, "router")
    serving.run_main(lambda: serve(cfg))


if __name__ == "__main__":
    main()
