"""OpenAI-compatible HTTP API, served by the router beside gRPC (``--http-port``).

A thin translation: JSON bodies become the same ``GenerateRequest`` / ``EmbedRequest`` messages a
gRPC client sends (``router.openai_requests``) and go down the same path (validation, n, stop
strings, detokenization); responses are shaped back (``router.openai_responses``). Errors use
OpenAI's JSON shape: 400 for bad input (``param`` names the field), 401 for a missing or wrong
bearer token (``invalid_api_key``), 404 for an unknown model (``model_not_found``) or an unknown
path (``unknown_url``), 405, 409, 413, 429 and 5xx each with their own ``type`` and ``code``.
vLLM's helper endpoints (``/tokenize``, ``/detokenize``, ``/version``, ``/ping``, ``/metrics``)
live in ``router.http_helpers``.

Streams are server-sent events, ``data: {chunk}`` then ``data: [DONE]``. Validation finishes
before the stream starts, so a bad request still gets its status code. A client that disconnects
cancels its handler, which aborts the request downstream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from opentelemetry.context import Context
from prometheus_client import CollectorRegistry

from pagewire import auth, tracing
from pagewire.config import RouterConfig
from pagewire.tls import TLSFiles
from pagewire.v1 import generation_pb2
from router import embed, fanout
from router.errors import RequestError
from router.generation import Generator, ValidatedRequest
from router.http_helpers import OPEN_PATHS, HelperRoutes
from router.model import ServedModel
from router.openai_requests import (
    CompletionCall,
    chat_call,
    completion_call,
    embedding_call,
    parse_body,
)
from router.openai_responses import Answer, TokenTexts, dumps, sse
from router.placement import Placer

log = logging.getLogger("router.http")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Core field names that OpenAI spells differently.
_PARAMS = {"text": "prompt", "token_ids": "prompt", "chat": "messages"}
_CHAT_PARAMS = {**_PARAMS, "logprobs": "top_logprobs"}
_ERROR_CODES = {
    401: "invalid_api_key",
    404: "unknown_url",  # a RequestError's 404 is an unknown model: model_not_found
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    429: "rate_limit_exceeded",
    503: "service_unavailable",
    504: "timeout",
}


class OpenAIApi:
    def __init__(
        self, model: ServedModel, generator: Generator, placer: Placer, api_key: str,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.model = model
        self.generator = generator
        self.placer = placer
        self.api_key = api_key
        self.tokens = TokenTexts(model.tokenizer)
        self.helpers = HelperRoutes(model, registry)

    def app(self, max_body_bytes: int) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=max_body_bytes
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model:.+}", self.one_model)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        self.helpers.add_to(app)
        return app

    # ---- middlewares ----------------------------------------------------------------------
    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except RequestError as e:
            code = "model_not_found" if e.http_status == 404 else None
            return error_response(e.http_status, str(e), _param(request, e.field), code)
        except web.HTTPException as e:  # no such route, method not allowed, body too large
            message = e.text or e.reason
            if e.status in (404, 405):
                message = f"{e.reason}: {request.method} {request.path}"
            return error_response(e.status, message, None)

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self.api_key and request.path not in OPEN_PATHS:
            if not auth.authorized(request.headers.get("Authorization"), self.api_key):
                message = "missing or wrong API key (Authorization: Bearer ...)"
                return error_response(401, message, None)
        return await handler(request)

    # ---- routes -------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, request: web.Request) -> web.Response:
        return _json({"object": "list", "data": [self._model_card()]})

    async def one_model(self, request: web.Request) -> web.Response:
        self.model.check_name(request.match_info["model"])
        return _json(self._model_card())

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, completion_call(await _body(request)))

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat_call(await _body(request)))

    async def embeddings(self, request: web.Request) -> web.Response:
        call = embedding_call(await _body(request))
        submits = []
        for i, r in enumerate(call.requests):
            try:
                submits.append(await embed.prepare_embed(self.model, r))
            except RequestError as e:
                if e.field == "input" and len(call.requests) > 1:  # say which input
                    raise e.renamed(f"input[{i}]") from None
                raise
        pairs = zip(submits, call.requests, strict=True)
        results = await _all_or_none([embed.embed(self.placer, s, r.normalize) for s, r in pairs])
        data = [
            {"object": "embedding", "index": i, "embedding": _vector(r, call.base64)}
            for i, r in enumerate(results)
        ]
        prompt_tokens = sum(r.usage.prompt_tokens for r in results)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
        return _json({"object": "list", "data": data, "model": self.model.name, "usage": usage})

    # ---- generation ---------------------------------------------------------------------
    async def _generate(self, request: web.Request, call: CompletionCall) -> web.StreamResponse:
        plans = await self._prepare(request, call)
        n = plans[0].params.n
        answer = Answer(
            plans[0].rid, self.model.name, n * len(plans), call.chat, call.logprobs, self.tokens,
            prompt_logprobs=call.prompt_logprobs, prompts=len(plans),
            echo=call.requests[0].echo, token_ids=call.requests[0].return_prompt_token_ids,
            prompt_tokens=[len(p.prompt) for p in plans], continuous_usage=call.continuous_usage,
        )
        parent = _trace_parent(request)
        merged = fanout.merged([self.generator.stream(p, parent) for p in plans], n)
        if not call.stream:
            async with contextlib.aclosing(merged) as responses:
                async for response in responses:
                    answer.record(response)
            return _json(answer.body())
        stream = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await stream.prepare(request)
        try:
            async with contextlib.aclosing(merged) as responses:
                async for response in responses:
                    await _send_with_the_step(stream, answer.stream_event(response))
            if call.include_usage:
                await stream.write(sse(answer.chunk([], usage=True)))
        except RequestError as e:  # after the headers went out: the error travels as an event
            await stream.write(sse(error_body(e.http_status, str(e), _param(request, e.field))))
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    async def _prepare(self, request: web.Request, call: CompletionCall) -> list[ValidatedRequest]:
        """Every prompt validated before any is submitted: a bad one fails the whole call."""
        rid = request.headers.get("X-Request-Id", "") or call.requests[0].request_id
        many = len(call.requests) > 1
        plans = []
        for i, r in enumerate(call.requests):
            r.request_id = f"{rid}-p{i}" if rid and many else rid
            try:
                plans.append(await self.generator.prepare(r, fill_context=call.chat))
            except RequestError as e:
                if e.field == "prompt" and many:  # say which prompt
                    raise e.renamed(f"prompt[{i}]") from None
                if e.field == "structured" and call.structured_field:  # the JSON field's name
                    raise e.renamed(call.structured_field) from None
                raise
        return plans

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model.name,
            "object": "model",
            "created": 0,
            "owned_by": "pagewire",
            "max_model_len": self.model.max_model_len,
        }


async def start(
    cfg: RouterConfig,
    model: ServedModel,
    generator: Generator,
    placer: Placer,
    tls: TLSFiles | None = None,
    registry: CollectorRegistry | None = None,
) -> web.AppRunner:
    """Serve the API on ``cfg.host:cfg.http_port``; the caller ``cleanup()``s the runner.
    ``registry``: the router's metrics, also served on this port at ``/metrics``."""
    api = OpenAIApi(model, generator, placer, cfg.api_key, registry)
    # A body holds at most max_prompt_chars of text; JSON escapes take up to 12 bytes a character.
    runner = web.AppRunner(
        api.app(max_body_bytes=12 * cfg.max_prompt_chars + (1 << 20)),
        handler_cancellation=True,
        shutdown_timeout=5.0,
        access_log=None,
        logger=_ServerLog(logging.getLogger("router.http")),
    )
    await runner.setup()
    site = web.TCPSite(runner, cfg.host, cfg.http_port,
                       ssl_context=tls.server_ssl_context() if tls is not None else None)
    await site.start()
    for address in runner.addresses:
        log.info("router HTTP (OpenAI API) on %s://%s:%d", "https" if tls else "http", address[0], address[1])
    return runner


class _ServerLog:
    """The logger aiohttp's server reports to. A request that is not valid HTTP is answered 400
    and is the client's fault: one DEBUG line, where aiohttp would log an ERROR with a traceback
    for each (anyone who can reach the port could fill the logs). Everything else is logged as
    aiohttp logs it."""

    def __init__(self, logger: logging.Logger) -> None:
        self.logger = logger

    def exception(self, msg: str, *args: Any, exc_info: Any = None, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.logger.debug(msg + ": %s", *args, exc_info)
        else:
            self.logger.exception(msg, *args, exc_info=exc_info or True, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.logger, name)


async def _send_with_the_step(stream: web.StreamResponse, event: bytes) -> None:
    """Write a streamed chunk once every stream that the same scheduler step woke has shaped
    its own: a scheduler's EventBatch wakes all of its requests' handlers in one pass of the event
    loop, and yielding to it once lets them all do their Python work before any writes, so the
    writes leave back to back and a client's event loop wakes once for a step's chunks, not once
    per chunk. With 64 streams and the cores otherwise idle (``bench/router_cost.py``) the
    client's CPU per token fell by a quarter and the router's by 5 %; where a worker keeps the
    cores busy, clients wake late anyway and it changes nothing (docs/BENCHMARKS.md)."""
    await asyncio.sleep(0)
    await stream.write(event)


def _trace_parent(request: web.Request) -> Context | None:
    """The client's W3C trace context (``traceparent`` / ``tracestate`` headers), if any."""
    return tracing.extract({k: v for k in ("traceparent", "tracestate") if (v := request.headers.get(k))})


def _param(request: web.Request, field: str) -> str | None:
    """The field as OpenAI names it, for the error's ``param``."""
    names = _CHAT_PARAMS if request.path.endswith("/chat/completions") else _PARAMS
    return names.get(field, field) or None


def error_body(
    status: int, message: str, param: str | None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object: ``type`` by status class, ``code`` by status unless given."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "rate_limit_error"
    return {
        "error": {
            "message": message,
            "type": kind,
            "param": param,
            "code": code or _ERROR_CODES.get(status),
        }
    }


def error_response(
    status: int, message: str, param: str | None, code: str | None = None
) -> web.Response:
    return _json(error_body(status, message, param, code), status)


def _json(body: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(
        body=dumps(body), status=status, content_type="application/json", charset="utf-8"
    )


async def _body(request: web.Request) -> dict[str, Any]:
    return parse_body(await request.read())


def _vector(result: generation_pb2.EmbedResponse, as_base64: bool) -> list[float] | str:
    if not as_base64:
        return list(result.embedding)
    return base64.b64encode(np.asarray(result.embedding, dtype="<f4").tobytes()).decode()


async def _all_or_none(
    calls: list[Awaitable[generation_pb2.EmbedResponse]],
) -> list[generation_pb2.EmbedResponse]:
    """Run the calls concurrently; if one fails, cancel the others (asyncio.gather does not)."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
