"""The public ``pagewire.v1.Generation`` gRPC service: a thin front over the router's request path.

Each method turns its request into the shared path's calls (generation, embeddings, the served
model) and a :class:`RequestError` into a gRPC status. The service is registered by
:func:`add_to_server` rather than by the generated helper, so that a request whose string fields
are not UTF-8 is answered INVALID_ARGUMENT naming the field (protobuf would fail the parse and
gRPC answer UNKNOWN).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.message import DecodeError, Message

from pagewire import tracing
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


@dataclass(frozen=True)
class _Unparsable:
    """What the deserializer hands the handler in place of a request that did not parse."""

    message: str


def add_to_server(service: GenerationService, server: grpc.aio.Server) -> None:
    """Register every method of the service, each behind a UTF-8-checking deserializer."""
    handlers = {}
    descriptor = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    for method in descriptor.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        behavior = getattr(service, method.name)
        make = grpc.unary_unary_rpc_method_handler
        guarded: Callable[..., Any] = _guard_unary(behavior)
        if method.server_streaming:
            make, guarded = grpc.unary_stream_rpc_method_handler, _guard_stream(behavior)
        handlers[method.name] = make(
            guarded,
            request_deserializer=_deserializer(request_cls),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def _deserializer(cls: type[Message]) -> Callable[[bytes], Message | _Unparsable]:
    def parse(data: bytes) -> Message | _Unparsable:
        try:
            return cls.FromString(data)
        except DecodeError:
            path = find_invalid_utf8(cls.DESCRIPTOR, data)
            if path is None:  # not a message of this type at all: still the client's fault
                return _Unparsable(f"request: not a valid {cls.DESCRIPTOR.full_name} message")
            return _Unparsable(f"{path}: not valid UTF-8")

    return parse


def _guard_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Message | _Unparsable, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await behavior(request, context)

    return call


def _guard_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Message | _Unparsable, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, _Unparsable):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for response in behavior(request, context):
            yield response

    return call
