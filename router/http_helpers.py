"""vLLM's helper endpoints on the router's HTTP port, beside the OpenAI API.

``POST /tokenize`` and ``POST /detokenize`` take and answer vLLM's shapes (a ``prompt`` or chat
``messages`` in; ``count``, ``max_model_len``, ``tokens`` and, when asked, ``token_strs`` out;
``tokens`` in, ``prompt`` out); ``GET /version``; ``GET|POST /ping`` (liveness, as SageMaker asks);
``GET /metrics``, the router's own Prometheus registry (the same one ``--metrics-port`` serves),
so a scraper that only knows the API port still sees the router. Tokenization is the model's own
(``router.model``), the same that ``Generate`` uses, so counts agree with usage.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

import pagewire
from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.model import ServedModel
from router.openai_fields import Fields, parse_body
from router.openai_requests import set_messages

# Paths that answer without the API key: liveness, version and metrics carry no model output.
OPEN_PATHS = frozenset({"/health", "/ping", "/version", "/metrics"})


class HelperRoutes:
    def __init__(self, model: ServedModel, registry: CollectorRegistry | None) -> None:
        self.model = model
        self.registry = registry

    def add_to(self, app: web.Application) -> None:
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/version", self.version)
        app.router.add_get("/ping", self.ping)
        app.router.add_post("/ping", self.ping)
        if self.registry is not None:
            app.router.add_get("/metrics", self.metrics)

    async def tokenize(self, request: web.Request) -> web.Response:
        f = Fields(parse_body(await request.read()))
        self.model.check_name(f.string("model") or "")
        generate = generation_pb2.GenerateRequest()
        if f.get("messages") is not None:
            set_messages(generate.chat, f)
            ids = await self.model.prompt_ids(generate, "prompt")
        elif f.get("prompt") is not None:
            text = f.string("prompt") or ""
            add = f.boolean("add_special_tokens")
            ids = await self.model.encode(text, "prompt", add_special_tokens=add is not False)
        else:
            raise RequestError.invalid("prompt", "give a prompt (text) or messages")
        body: dict[str, Any] = {
            "count": len(ids),
            "max_model_len": self.model.max_model_len,
            "tokens": ids,
            "token_strs": None,
        }
        if f.boolean("return_token_strs"):
            body["token_strs"] = self.model.tokenizer.convert_ids_to_tokens(ids)
        return web.json_response(body)

    async def detokenize(self, request: web.Request) -> web.Response:
        f = Fields(parse_body(await request.read()))
        self.model.check_name(f.string("model") or "")
        ids = f.token_ids("tokens")
        self.model.check_ids(ids, "tokens")
        return web.json_response({"prompt": self.model.tokenizer.decode(ids)})

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": pagewire.__version__})

    async def ping(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def metrics(self, request: web.Request) -> web.Response:
        assert self.registry is not None
        # The header's charset rides in content_type: aiohttp refuses it in content_type itself.
        return web.Response(body=generate_latest(self.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})
