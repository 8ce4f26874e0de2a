"""What the public API admits: the bearer token (--api-key) and the request size limit.

Real grpc.aio servers on loopback, built with serving.new_server as the router builds its own,
serving a minimal Generation servicer (ListModels, Generate) so the real stubs can call it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from pagewire import auth, serving
from pagewire.v1 import generation_pb2, generation_pb2_grpc

KEY = "sk-test-0123456789"
Call = Callable[[grpc.aio.Channel, Sequence[tuple[str, str]]], Awaitable[object]]


class Generation(generation_pb2_grpc.GenerationServicer):
    """Answers ListModels and Generate; every other method stays UNIMPLEMENTED."""

    async def ListModels(
        self, request: generation_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> generation_pb2.ListModelsResponse:
        return generation_pb2.ListModelsResponse(models=[generation_pb2.ModelInfo(name="m")])

    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[generation_pb2.GenerateResponse]:
        yield generation_pb2.GenerateResponse(text="hi")


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    yield request


# Not the public service and not an open one: protected all the same (deny by default). Its one
# method streams responses to one request, as Generate does: a client-streaming call's later
# writes race the refusal in grpc's aio client, which then reports INTERNAL ("Failed
# execute_batch: SendMessageOperation", 8 of 2,000 calls on a loaded machine) in place of the
# UNAUTHENTICATED the server sent; the public API has no client-streaming method.
OTHER_SERVICE = grpc.method_handlers_generic_handler(
    "pagewire.test.Other", {"Echo": grpc.unary_stream_rpc_method_handler(_echo)}
)


@asynccontextmanager
async def public_server(
    api_key: str, max_receive_bytes: int = serving.PUBLIC_MAX_RECEIVE_BYTES
) -> AsyncIterator[str]:
    names = ["pagewire.v1.Generation"]
    server, health_servicer = serving.new_server(
        names, interceptors=auth.interceptors(api_key), max_receive_bytes=max_receive_bytes
    )
    generation_pb2_grpc.add_GenerationServicer_to_server(Generation(), server)
    server.add_generic_rpc_handlers([OTHER_SERVICE])
    port = serving.add_port(server, "127.0.0.1:0", None)
    await server.start()
    await serving.set_serving(health_servicer, names, True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def list_models(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
    stub = generation_pb2_grpc.GenerationStub(channel)
    return await stub.ListModels(generation_pb2.ListModelsRequest(), metadata=md, timeout=5)


async def generate(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
    stub = generation_pb2_grpc.GenerationStub(channel)
    call = stub.Generate(generation_pb2.GenerateRequest(text="x"), metadata=md, timeout=5)
    return [r async for r in call]


async def tokenize(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
    stub = generation_pb2_grpc.GenerationStub(channel)
    return await stub.Tokenize(generation_pb2.TokenizeRequest(text="x"), metadata=md, timeout=5)


async def other_echo(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
    echo = channel.unary_stream("/pagewire.test.Other/Echo")
    return [r async for r in echo(b"ping", metadata=md, timeout=5)]


async def health_check(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
    stub = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="pagewire.v1.Generation")
    return await stub.Check(request, metadata=md, timeout=5)


async def list_services(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    return [r async for r in stub.ServerReflectionInfo(iter([request]), metadata=md, timeout=5)]


def status(api_key: str, call: Call, metadata: Sequence[tuple[str, str]] = ()) -> grpc.StatusCode:
    """The status ``call`` ends with against a public server configured with ``api_key``."""

    async def body() -> grpc.StatusCode:
        async with public_server(api_key) as address, serving.insecure_channel(address) as ch:
            try:
                await call(ch, metadata)
            except grpc.aio.AioRpcError as e:
                return e.code()
            return grpc.StatusCode.OK

    return asyncio.run(body())


# ---- the bearer token over gRPC -------------------------------------------------------------

PROTECTED = [list_models, generate, other_echo]


@pytest.mark.parametrize("call", PROTECTED)
def test_without_a_token_every_protected_method_is_unauthenticated(call: Call) -> None:
    assert status(KEY, call) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("call", PROTECTED)
def test_a_wrong_token_is_unauthenticated(call: Call) -> None:
    assert status(KEY, call, auth.bearer_metadata(KEY + "x")) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("call", PROTECTED)
def test_the_right_token_is_let_through(call: Call) -> None:
    assert status(KEY, call, auth.bearer_metadata(KEY)) == grpc.StatusCode.OK


def test_an_unimplemented_method_is_refused_before_it_is_reached() -> None:
    assert status(KEY, tokenize) == grpc.StatusCode.UNAUTHENTICATED
    assert status(KEY, tokenize, auth.bearer_metadata(KEY)) == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.parametrize("call", [health_check, list_services])
def test_health_and_reflection_stay_open_for_probes(call: Call) -> None:
    assert status(KEY, call) == grpc.StatusCode.OK


@pytest.mark.parametrize("call", PROTECTED)
def test_without_an_api_key_everything_is_open(call: Call) -> None:
    assert status("", call) == grpc.StatusCode.OK


def test_an_empty_key_cannot_be_installed_by_mistake() -> None:
    assert auth.interceptors("") == ()
    with pytest.raises(ValueError, match="empty api key"):
        auth.BearerTokenInterceptor("")


# ---- the same rule for an HTTP Authorization header -----------------------------------------


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),  # the scheme is case-insensitive
        (f"  Bearer   {KEY}  ", True),
        (None, False),
        ("", False),
        (KEY, False),  # no scheme
        (f"Basic {KEY}", False),
        (f"Bearer {KEY.upper()}", False),  # the token is not
        (f"Bearer {KEY[:-1]}", False),
        (f"Bearer {KEY}0", False),
        ("Bearer ", False),
    ],
)
def test_authorization_header(header: str | None, ok: bool) -> None:
    assert auth.authorized(header, KEY) is ok


def test_without_a_key_any_header_is_authorized() -> None:
    assert auth.authorized(None, "") and auth.authorized("Bearer whatever", "")


# ---- message size ---------------------------------------------------------------------------


def health_check_of_size(nbytes: int) -> Call:
    async def call(channel: grpc.aio.Channel, md: Sequence[tuple[str, str]]) -> object:
        request = health_pb2.HealthCheckRequest(service="x" * nbytes)
        return await health_pb2_grpc.HealthStub(channel).Check(request, metadata=md, timeout=10)

    return call


def test_a_request_over_the_public_limit_is_resource_exhausted() -> None:
    too_big = health_check_of_size(serving.PUBLIC_MAX_RECEIVE_BYTES)
    assert status("", too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_request_under_the_public_limit_reaches_the_service() -> None:
    # An unknown service name: the health servicer itself answers NOT_FOUND.
    near_limit = health_check_of_size(serving.PUBLIC_MAX_RECEIVE_BYTES - 64)
    assert status("", near_limit) == grpc.StatusCode.NOT_FOUND
