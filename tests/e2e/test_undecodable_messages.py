"""Bytes that are not a message, on every port of a live stack: the caller's error, answered
INVALID_ARGUMENT (HTTP 400), and never an ERROR with a traceback in the service's log -- anyone
who can reach a port could otherwise fill the logs."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest
from e2e_util import greedy_request, launch, run_concurrently

from pagewire import serving
from pagewire.launcher import Stack, free_port

GARBAGE = b"\xff\xff\xff\xff"  # a varint that never ends: no protobuf message parses from it


@pytest.fixture(scope="module")
def http_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, int]]:
    port = free_port()
    stack = launch(tiny_model, tmp_path_factory.mktemp("logs"), worker_args=["--num-blocks", "64"],
                   router_args=["--http-port", str(port)])
    try:
        yield stack, port
    finally:
        stack.stop()


async def unary(address: str, method: str) -> grpc.aio.AioRpcError:
    async with serving.insecure_channel(address) as ch:
        call = ch.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(GARBAGE, timeout=10)
    return e.value


async def stream(address: str, method: str) -> grpc.aio.AioRpcError:
    """A request stream: one good (empty) message, then garbage."""

    async def messages() -> AsyncIterator[bytes]:
        yield b""
        yield GARBAGE
        await asyncio.sleep(30)  # the server must end the call, not wait for our half-close

    async with serving.insecure_channel(address) as ch:
        call = ch.stream_stream(method, request_serializer=bytes, response_deserializer=bytes)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            async for _ in call(messages(), timeout=10):
                pass
    return e.value


def malformed_http(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nthis is no header\r\n\r\n")
        return s.recv(4096)


def test_undecodable_messages_are_invalid_argument_and_logged_quietly(
    http_stack: tuple[Stack, int],
) -> None:
    stack, http_port = http_stack
    scheduler, worker = stack.service("scheduler").address, stack.service("worker-0").address
    calls = [
        stream(scheduler, "/pagewire.v1.Scheduler/Connect"),
        unary(worker, "/pagewire.v1.Worker/Describe"),
        unary(stack.router, "/pagewire.v1.Generation/Tokenize"),
    ]
    for error in asyncio.run(_all(calls)):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "not a valid pagewire.v1." in (error.details() or "")
    assert malformed_http(http_port).split(b"\r\n")[0].endswith(b" 400 Bad Request")
    # Every service still serves.
    [(ids, _, _)] = asyncio.run(run_concurrently(stack.router, [greedy_request("still here", 4)]))
    assert ids
    assert stack.log_dir is not None
    for name in ("scheduler", "worker-0", "router"):
        log = (stack.log_dir / f"{name}.log").read_text()
        assert "Traceback" not in log and " ERROR " not in log, f"{name}:\n{log[-3000:]}"


async def _all(calls: list) -> list[grpc.aio.AioRpcError]:
    return [await c for c in calls]
