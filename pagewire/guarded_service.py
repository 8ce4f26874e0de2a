"""Registering a gRPC service so that bytes that are not its request message are the caller's
error, answered INVALID_ARGUMENT -- not the server's.

The generated ``add_XServicer_to_server`` deserializes with ``FromString``: bytes that do not
parse raise DecodeError inside grpcio, which answers UNKNOWN ("Unexpected DecodeError") and logs
an ERROR traceback for every such call, so anyone who can reach a port can fill the logs; on a
request stream the handler's reader just ends, and the call ends OK with no reply. Here a
method's deserializer never raises: it hands over an :class:`Unparsable` in place of the message.
A unary handler answers it INVALID_ARGUMENT before the service sees anything; on a request
stream, the stream the service reads ends at the bad message (the service winds the call down as
when a peer closes), and the call then fails INVALID_ARGUMENT naming what did not parse.

Every pagewire server registers its service here (the router with a finer ``explain`` that names
a string field holding invalid UTF-8).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

Explain = Callable[[type[Message], bytes], str]  # why these bytes are not a message of this type


@dataclass(frozen=True)
class Unparsable:
    """What a handler is handed in place of a request that did not parse."""

    message: str


def not_a_message(cls: type[Message], data: bytes) -> str:
    return f"request: not a valid {cls.DESCRIPTOR.full_name} message"


def add_service(
    server: grpc.aio.Server, service: ServiceDescriptor, servicer: object,
    explain: Explain = not_a_message,
) -> None:
    """Register every method of ``service`` implemented by ``servicer`` (an instance of the
    generated ``XServicer`` base), each behind a deserializer that never raises."""
    handlers = {}
    for method in service.methods:
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        make, wrap = _KINDS[method.client_streaming, method.server_streaming]
        handlers[method.name] = make(
            wrap(getattr(servicer, method.name)),
            request_deserializer=_deserializer(request_cls, explain),
            response_serializer=response_cls.SerializeToString,
        )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


def _deserializer(cls: type[Message], explain: Explain) -> Callable[[bytes], Message | Unparsable]:
    def parse(data: bytes) -> Message | Unparsable:
        try:
            return cls.FromString(data)
        except DecodeError:
            return Unparsable(explain(cls, data))

    return parse


async def _refuse(context: grpc.aio.ServicerContext, bad: Unparsable) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, bad.message)


def _unary_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Message | Unparsable, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsable):
            await _refuse(context, request)
        return await behavior(request, context)

    return call


def _unary_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Message | Unparsable, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Unparsable):
            await _refuse(context, request)
        async for response in behavior(request, context):
            yield response

    return call


class _UntilUnparsable:
    """The request stream as the service reads it: it ends at the first message that did not
    parse, which is kept for the call's status."""

    def __init__(self, requests: AsyncIterator[Message | Unparsable]) -> None:
        self.requests = requests
        self.bad: Unparsable | None = None

    def __aiter__(self) -> _UntilUnparsable:
        return self

    async def __anext__(self) -> Message:
        request = await self.requests.__anext__()
        if isinstance(request, Unparsable):
            self.bad = request
            raise StopAsyncIteration
        return request


def _stream_unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        stream = _UntilUnparsable(requests)
        response = await behavior(stream, context)
        if stream.bad is not None:
            await _refuse(context, stream.bad)
        return response

    return call


def _stream_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        stream = _UntilUnparsable(requests)
        async for response in behavior(stream, context):
            yield response
        if stream.bad is not None:
            await _refuse(context, stream.bad)

    return call


_KINDS = {
    (False, False): (grpc.unary_unary_rpc_method_handler, _unary_unary),
    (False, True): (grpc.unary_stream_rpc_method_handler, _unary_stream),
    (True, False): (grpc.stream_unary_rpc_method_handler, _stream_unary),
    (True, True): (grpc.stream_stream_rpc_method_handler, _stream_stream),
}
