"""Shared gRPC server setup: a server is not healthy until its service says it is ready."""

from __future__ import annotations

import asyncio

import pytest

from pagewire import serving


def test_a_new_server_is_not_serving_until_its_service_is_ready() -> None:
    async def body() -> None:
        server, health_servicer = serving.new_server(["pagewire.v1.Example"])
        port = serving.add_port(server, "127.0.0.1:0", None)
        await server.start()
        address = f"127.0.0.1:{port}"
        try:
            for name in ("", "pagewire.v1.Example"):  # the whole server, and the service
                with pytest.raises(TimeoutError):
                    await serving.wait_healthy(address, timeout=0.5, service=name)
            await serving.set_serving(health_servicer, ["pagewire.v1.Example"], True)
            await serving.wait_healthy(address, timeout=5)
            await serving.wait_healthy(address, timeout=5, service="pagewire.v1.Example")
        finally:
            await server.stop(None)

    asyncio.run(body())
