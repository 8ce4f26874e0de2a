"""The public ``pagewire.v1.Generation`` gRPC service: a thin front over the router's request path.

Each method turns its request into the shared path's calls (generation, embeddings, the served
model) and a :class:`RequestError` into a gRPC status. The service is registered by
:func:`add_to_server` (``pagewire.guarded_service``) rather than by the generated helper, so that a
request whose string fields are not UTF-8 is answered INVALID_ARGUMENT naming the field (protobuf
would fail the parse and gRPC answer UNKNOWN).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import Message

from pagewire import guarded_service, tracing
from pagewire.v1 import generation_pb2, generation_pb2_grpc
from router import embed
from router.errors import RequestError
from router.generation import Generator
from router.model import ServedModel
from router.placement import Placer
from router.wire_utf8 import find_invalid_utf8

SERVICE = "pagewire.v1.Generation"


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(self, model: ServedModel, generator: Generator, placer: Placer) -> None:
        self.model = model
        self.generator = generator
        self.placer = placer

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        try:
            plan = await self.generator.prepare(request)
            parent = tracing.extract_metadata(context.invocation_metadata())
            async with contextlib.aclosing(self.generator.stream(plan, parent)) as responses:
                async for response in responses:
                    yield response
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def Embed(
        self, request: generation_pb2.EmbedRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.EmbedResponse:
        try:
            submit = await embed.prepare_embed(self.model, request)
            return await embed.embed(self.placer, submit, request.normalize)
        except RequestError as e:
            await context.abort(e.code, str(e))

    async def Tokenize(
        self, request: generation_pb2.TokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.TokenizeResponse:
        add = request.add_special_tokens if request.HasField("add_special_tokens") else True
        try:
            self.model.check_name(request.model)
            ids = await self.model.encode(request.text, "text", add_special_tokens=add)
        except RequestError as e:
            await context.abort(e.code, str(e))
        return generation_pb2.TokenizeResponse(token_ids=ids)

    async def Detokenize(
        self, request: generation_pb2.DetokenizeRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.DetokenizeResponse:
        try:
            self.model.check_name(request.model)
            self.model.check_ids(request.token_ids)
        except RequestError as e:
            await context.abort(e.code, str(e))
        skip = request.skip_special_tokens if request.HasField("skip_special_tokens") else True
        text = self.model.tokenizer.decode(list(request.token_ids), skip_special_tokens=skip)
        return generation_pb2.DetokenizeResponse(text=text)

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        info = generation_pb2.ModelInfo(
            name=self.model.name,
            max_model_len=self.model.max_model_len,
            vocab_size=self.model.vocab_size,
        )
        return generation_pb2.ListModelsResponse(models=[info])


def _explain(cls: type[Message], data: bytes) -> str:
    """The string field that holds invalid UTF-8, when that is why the request did not parse."""
    path = find_invalid_utf8(cls.DESCRIPTOR, data)
    if path is None:  # not a message of this type at all: still the client's fault
        return guarded_service.not_a_message(cls, data)
    return f"{path}: not valid UTF-8"


def add_to_server(service: GenerationService, server: grpc.aio.Server) -> None:
    """Register every method of the service, each behind a UTF-8-checking deserializer."""
    descriptor = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    guarded_service.add_service(server, descriptor, service, _explain)
