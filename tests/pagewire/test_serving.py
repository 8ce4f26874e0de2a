"""Shared gRPC setup: a server is not healthy until its service says it is ready, a late server is
seen at once, a clean stop leaves at once."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap

import grpc
import pytest

from pagewire import serving
from pagewire.launcher import free_port


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


def test_a_server_that_starts_listening_late_is_seen_healthy_within_a_second() -> None:
    """A health poll (the launcher's, a scheduler's for its workers) dials a peer that is not up
    yet every half second at most, not on gRPC's default backoff (1 s growing to 2 minutes,
    which saw a service that took 3 s to start 2.5 s late)."""

    async def body() -> float:
        port = free_port()
        address = f"127.0.0.1:{port}"
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def serve_later() -> tuple[grpc.aio.Server, float]:
            await asyncio.sleep(3.0)
            server, health_servicer = serving.new_server([])
            serving.add_port(server, address, None)
            await server.start()
            await serving.set_serving(health_servicer, [], True)
            return server, loop.time()

        later = asyncio.create_task(serve_later())
        await serving.wait_healthy(address, timeout=30)
        seen = loop.time()
        server, up = await later
        await server.stop(None)
        assert up - start >= 3.0
        return seen - up

    assert asyncio.run(body()) < 1.2


def test_a_service_that_stops_cleanly_exits_with_its_logs_and_exit_handlers_run() -> None:
    """run_main leaves with os._exit once serve() returns (no interpreter teardown): what the
    service logged and its atexit handlers (tracing's flush) still happen, exit code 0."""
    script = textwrap.dedent("""
        import atexit, logging, sys
        from pagewire import serving
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
        async def serve():
            atexit.register(lambda: print("exit handler ran"))
            logging.getLogger("svc").info("stopped cleanly")
            sys.stdout.write("buffered, no newline")
        serving.run_main(serve)
        print("never reached")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONUNBUFFERED": ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == "buffered, no newlineexit handler ran\n"
    assert "INFO:svc:stopped cleanly" in done.stderr


@pytest.mark.parametrize(("setting", "loop"),
                         [(None, "uvloop"), ("uvloop", "uvloop"), ("asyncio", "asyncio")])
def test_a_service_runs_on_uvloop_unless_told_asyncio(setting: str | None, loop: str) -> None:
    """run_main's event loop: uvloop's (installed with pagewire on Linux), or asyncio's own with
    PAGEWIRE_EVENT_LOOP=asyncio."""
    script = textwrap.dedent("""
        import asyncio
        from pagewire import serving
        async def serve():
            print(type(asyncio.get_running_loop()).__module__.split(".")[0])
        serving.run_main(serve)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PAGEWIRE_EVENT_LOOP"}
    if setting is not None:
        env["PAGEWIRE_EVENT_LOOP"] = setting
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == loop


def test_an_event_loop_setting_it_cannot_honour_is_refused_by_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PAGEWIRE_EVENT_LOOP", "uvlop")
    with pytest.raises(ValueError, match="PAGEWIRE_EVENT_LOOP='uvlop'"):
        serving.event_loop_runner()
    monkeypatch.setenv("PAGEWIRE_EVENT_LOOP", "uvloop")
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as where it is not installed
    with pytest.raises(ValueError, match="uvloop is not installed"):
        serving.event_loop_runner()
    monkeypatch.delenv("PAGEWIRE_EVENT_LOOP")
    assert serving.event_loop_runner() is asyncio.run  # not asked for by name: asyncio's
