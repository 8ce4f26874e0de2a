"""TLS and mTLS between pagewire peers: real grpc.aio servers on loopback, certs from a test CA.

The RPC under test is grpc.health.v1 Check, which every pagewire server registers.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import grpc
import pytest
from aiohttp import web
from certs import CertPair, TestCA
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire import serving
from pagewire.config import CommonConfig
from pagewire.tls import TLSConfigError, TLSFiles


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path / "ca")


@pytest.fixture
def other_ca(tmp_path: Path) -> TestCA:
    return TestCA.create(tmp_path / "other", name="some other CA")


def tls(pair: CertPair | None, ca: TestCA | None, client_auth: bool = False) -> TLSFiles:
    files = TLSFiles.load(
        str(pair.cert) if pair else "", str(pair.key) if pair else "",
        str(ca.cert) if ca else "", client_auth,
    )
    assert files is not None
    return files


@asynccontextmanager
async def health_server(server_tls: TLSFiles | None) -> AsyncIterator[str]:
    """A pagewire server reporting SERVING; yields the address to dial."""
    server, health_servicer = serving.new_server([])
    port = serving.add_port(server, "127.0.0.1:0", server_tls)
    await server.start()
    await serving.set_serving(health_servicer, [], True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def check(address: str, client_tls: TLSFiles | None) -> grpc.StatusCode:
    """The status of one health Check from a client configured with ``client_tls``."""
    async with serving.open_channel(address, client_tls) as channel:
        try:
            await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
        except grpc.aio.AioRpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def statuses(server_tls: TLSFiles | None, *clients: TLSFiles | None) -> list[grpc.StatusCode]:
    async def body() -> list[grpc.StatusCode]:
        async with health_server(server_tls) as address:
            return [await check(address, c) for c in clients]

    return asyncio.run(body())


# ---- TLS ------------------------------------------------------------------------------------


def test_client_trusting_the_ca_talks_to_a_tls_server(ca: TestCA) -> None:
    assert statuses(tls(ca.issue("server"), ca), tls(None, ca)) == [grpc.StatusCode.OK]


def test_plaintext_client_cannot_talk_to_a_tls_server(ca: TestCA) -> None:
    assert statuses(tls(ca.issue("server"), ca), None) == [grpc.StatusCode.UNAVAILABLE]


def test_client_refuses_a_server_whose_cert_is_from_another_ca(
    ca: TestCA, other_ca: TestCA
) -> None:
    assert statuses(tls(other_ca.issue("impostor"), other_ca), tls(None, ca)) == [
        grpc.StatusCode.UNAVAILABLE
    ]


def test_client_refuses_a_server_cert_not_naming_the_dialed_address(ca: TestCA) -> None:
    server = tls(ca.issue("elsewhere", hosts=("10.9.8.7", "scheduler.example")), ca)
    assert statuses(server, tls(None, ca)) == [grpc.StatusCode.UNAVAILABLE]


def test_wait_healthy_dials_with_tls(ca: TestCA) -> None:
    async def body() -> None:
        async with health_server(tls(ca.issue("server"), ca)) as address:
            await serving.wait_healthy(address, timeout=5, tls=tls(None, ca))

    asyncio.run(body())


# ---- mTLS -----------------------------------------------------------------------------------


def test_mtls_server_admits_only_clients_with_a_cert_from_its_ca(
    ca: TestCA, other_ca: TestCA
) -> None:
    server = tls(ca.issue("scheduler"), ca, client_auth=True)
    assert statuses(
        server,
        tls(ca.issue("router"), ca),  # a peer service: its own cert, signed by the CA
        tls(None, ca),  # trusts the server but shows no cert
        tls(other_ca.issue("intruder"), ca),  # shows a cert the server's CA did not sign
    ) == [grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]


def test_a_service_config_gives_one_identity_for_serving_and_dialing(ca: TestCA) -> None:
    pair = ca.issue("worker")
    cfg = CommonConfig(
        tls_cert=str(pair.cert), tls_key=str(pair.key), tls_ca=str(ca.cert), tls_client_auth=True
    )
    both = TLSFiles.from_config(cfg)
    assert statuses(both, both) == [grpc.StatusCode.OK]


# ---- configuration errors, at startup -------------------------------------------------------


def test_no_tls_flags_means_plaintext() -> None:
    assert TLSFiles.from_config(CommonConfig()) is None


def test_the_private_key_stays_out_of_logs(ca: TestCA) -> None:
    pair = ca.issue("server")
    assert pair.key.read_text().splitlines()[1] not in repr(tls(pair, ca))


BAD_FLAGS = {
    "key without cert": ({"tls_key": "KEY"}, "--tls-cert and --tls-key must be given together"),
    "cert without key": ({"tls_cert": "CERT"}, "--tls-cert and --tls-key must be given together"),
    "client auth alone": ({"tls_client_auth": True}, "--tls-client-auth needs"),
    "client auth without ca": (
        {"tls_cert": "CERT", "tls_key": "KEY", "tls_client_auth": True}, "--tls-client-auth needs"
    ),
    "client auth without cert": ({"tls_ca": "CA", "tls_client_auth": True}, "--tls-client-auth"),
    "missing key file": (
        {"tls_cert": "CERT", "tls_key": "/nonexistent/key.pem"}, "--tls-key /nonexistent/key.pem"
    ),
    "missing ca file": ({"tls_ca": "/nonexistent/ca.pem"}, "--tls-ca /nonexistent/ca.pem: No such"),
    "key of another cert": ({"tls_cert": "CERT", "tls_key": "OTHER_KEY"}, "its matching private"),
    "key given as cert": ({"tls_cert": "KEY", "tls_key": "KEY"}, "not a PEM certificate"),
    "passphrase key": ({"tls_cert": "CERT", "tls_key": "LOCKED_KEY"}, "its matching private"),
    "garbage ca": ({"tls_ca": "GARBAGE"}, "--tls-ca .*garbage.pem: not a PEM CA bundle"),
    "empty ca": ({"tls_ca": "EMPTY"}, "--tls-ca .*empty.pem: file is empty"),
}


@pytest.mark.parametrize(("flags", "message"), BAD_FLAGS.values(), ids=BAD_FLAGS.keys())
def test_bad_tls_flags_fail_at_startup_naming_the_flag(
    ca: TestCA, tmp_path: Path, flags: dict[str, object], message: str
) -> None:
    pair, other = ca.issue("server"), ca.issue("other")
    (tmp_path / "garbage.pem").write_text("this is not a certificate\n")
    (tmp_path / "empty.pem").write_text("")
    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    locked = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"passphrase"),
    )
    (tmp_path / "locked.key").write_bytes(locked)
    files = {
        "CERT": str(pair.cert), "KEY": str(pair.key), "OTHER_KEY": str(other.key),
        "CA": str(ca.cert), "GARBAGE": str(tmp_path / "garbage.pem"),
        "EMPTY": str(tmp_path / "empty.pem"), "LOCKED_KEY": str(tmp_path / "locked.key"),
    }
    cfg = CommonConfig(**{k: files.get(v, v) if isinstance(v, str) else v for k, v in flags.items()})
    with pytest.raises(TLSConfigError, match=message):
        TLSFiles.from_config(cfg)


def test_a_client_only_config_cannot_serve(ca: TestCA) -> None:
    """--tls-ca alone is a client's setup; a server given it must not fall back to plaintext."""

    async def body() -> None:
        server, _ = serving.new_server([])
        try:
            serving.add_port(server, "127.0.0.1:0", tls(None, ca))
        finally:
            await server.stop(None)

    with pytest.raises(TLSConfigError, match="serving TLS needs --tls-cert and --tls-key"):
        asyncio.run(body())


# ---- the HTTP API's context ------------------------------------------------------------------


def test_http_ssl_context_enforces_client_certs(ca: TestCA, other_ca: TestCA) -> None:
    async def get(port: int, client: ssl.SSLContext) -> int | str:
        async with aiohttp.ClientSession() as session:
            try:
                async with session.get(f"https://127.0.0.1:{port}/", ssl=client) as resp:
                    return resp.status
            except aiohttp.ClientError as e:
                return type(e).__name__

    def client_context(pair: CertPair | None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(ca.cert))
        if pair is not None:
            ctx.load_cert_chain(pair.cert, pair.key)
        return ctx

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def body() -> list[int | str]:
        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app)
        await runner.setup()
        server_ctx = tls(ca.issue("router"), ca, client_auth=True).server_ssl_context()
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
        port = runner.addresses[0][1]
        try:
            return [
                await get(port, client_context(ca.issue("client"))),
                await get(port, client_context(None)),
                await get(port, client_context(other_ca.issue("intruder"))),
            ]
        finally:
            await runner.cleanup()

    ok, no_cert, wrong_ca = asyncio.run(body())
    assert ok == 200
    assert no_cert != 200 and wrong_ca != 200
