"""Every hop under mutual TLS (the test makes its own CA), and the public API behind a bearer
token: a client with a CA-signed certificate and the key streams; without either it is refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from certs import TestCA
from e2e_util import greedy_request, launch

from pagewire import auth, serving
from pagewire.tls import TLSFiles
from pagewire.v1 import generation_pb2_grpc

API_KEY = "s3cret-key"


async def generate(address: str, tls: TLSFiles | None, key: str) -> list[int]:
    async with serving.open_channel(address, tls) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        ids: list[int] = []
        async for r in stub.Generate(greedy_request("Hello there", 6), timeout=60,
                                     metadata=auth.bearer_metadata(key)):
            ids += r.token_ids
        return ids


def test_mutual_tls_on_every_hop_and_a_bearer_token_on_the_public_api(
    tiny_model: Path, tmp_path: Path
) -> None:
    ca = TestCA.create(tmp_path / "pki")
    service = ca.issue("pagewire-services")
    client = ca.issue("a-client")
    tls = TLSFiles.load(str(service.cert), str(service.key), str(ca.cert), client_auth=True)
    stack = launch(tiny_model, tmp_path, tls=tls, router_args=["--api-key", API_KEY])
    try:
        client_tls = TLSFiles.load(str(client.cert), str(client.key), str(ca.cert))
        assert len(asyncio.run(generate(stack.router, client_tls, API_KEY))) == 6

        with pytest.raises(grpc.aio.AioRpcError) as no_key:
            asyncio.run(generate(stack.router, client_tls, ""))
        assert no_key.value.code() == grpc.StatusCode.UNAUTHENTICATED

        no_cert = TLSFiles.load("", "", str(ca.cert))  # verifies the server, presents nothing
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            asyncio.run(generate(stack.router, no_cert, API_KEY))
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

        with pytest.raises(grpc.aio.AioRpcError) as plaintext:
            asyncio.run(generate(stack.router, None, API_KEY))
        assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE

        other = TestCA.create(tmp_path / "other", "another CA").issue("intruder")
        intruder = TLSFiles.load(str(other.cert), str(other.key), str(ca.cert))
        with pytest.raises(grpc.aio.AioRpcError) as foreign:  # scheduler port, foreign cert
            asyncio.run(generate(stack.service("scheduler").address, intruder, API_KEY))
        assert foreign.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stack.stop()
