"""The local launcher's start-up contract: a service that dies while starting is reported at once."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagewire import launcher, serving
from pagewire.launcher import Service, Stack, free_port, free_ports, shared_cores


def test_a_service_that_exits_while_starting_fails_fast_with_its_exit_code() -> None:
    stack = Stack(model="unused")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"broken exited with code 1 before it became healthy"):
        # A module that cannot be found: python exits with 1 before listening anywhere.
        asyncio.run(stack.start_service("broken", "pagewire.no_such_module", [], port=1,
                                        timeout=120))
    assert time.monotonic() - start < 30  # not the 120 s health timeout
    stack.stop()


@pytest.mark.parametrize("to_file", [True, False], ids=["log-dir", "terminal"])
def test_a_service_that_dies_while_starting_is_reported_with_its_last_output(
    tmp_path: Path, to_file: bool
) -> None:
    stack = Stack(model="unused", log_dir=tmp_path if to_file else None)
    with pytest.raises(RuntimeError) as e:
        asyncio.run(stack.start_service("broken", "pagewire.no_such_module", [], port=1))
    stack.stop()
    assert "broken exited with code 1 before it became healthy" in str(e.value)
    assert "No module named pagewire.no_such_module" in str(e.value)  # python's own reason


def test_pagewire_up_prints_why_a_service_failed_to_start(tmp_path: Path) -> None:
    """A real ``pagewire up`` whose worker cannot load its model: exit 1 and the worker's own
    error, not a traceback of the launcher."""
    missing = tmp_path / "no-model-here"
    done = subprocess.run(
        [sys.executable, "-m", "pagewire.cli", "up", "--model", str(missing), "--port",
         str(free_port()), "--http-port", "-1", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "worker-0 exited with code 1 before it became healthy" in done.stderr
    assert str(missing) in done.stderr.split("before it became healthy", 1)[1], done.stderr
    assert "Traceback" not in done.stderr.split("lines of output:", 1)[0]


def test_pagewire_up_passes_the_parser_flags_to_the_router(tmp_path: Path, tiny_model: Path) -> None:
    """``up --tool-call-parser`` reaches the router, which refuses an unknown parser by name."""
    done = subprocess.run(
        [sys.executable, "-m", "pagewire.cli", "up", "--model", str(tiny_model), "--port",
         str(free_port()), "--http-port", "-1", "--tool-call-parser", "bogus",
         "--reasoning-parser", "qwen3", "--log-dir", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 1, done.stderr
    assert "router exited with code 1 before it became healthy" in done.stderr
    assert "--tool-call-parser: unknown parser 'bogus'; known: hermes, llama3_json, mistral" in (
        done.stderr
    )


def test_workers_sharing_the_machine_split_its_cores_unless_threads_are_chosen(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Several workers' OpenMP teams spinning on the same cores stall each other: N workers get
    cores // N threads each by default; a chosen --threads (flag or PAGEWIRE_THREADS) stands."""
    monkeypatch.delenv("PAGEWIRE_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert shared_cores([], 1) == []
    assert shared_cores(["--dtype", "bfloat16"], 4) == ["--threads", "4"]
    assert shared_cores([], 32) == ["--threads", "1"]
    assert shared_cores(["--threads", "8"], 4) == []
    assert shared_cores(["--threads=8"], 4) == []
    monkeypatch.setenv("PAGEWIRE_THREADS", "3")
    assert shared_cores([], 4) == []


def test_a_stack_stops_its_router_first_and_its_workers_last(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router is started beside the workers, but stops first: no request arrives at a
    scheduler or worker already gone. Within a role the last started stops first."""
    stopped: list[str] = []
    monkeypatch.setattr(Service, "stop", lambda self, timeout=10.0: stopped.append(self.name))
    stack = Stack(model="unused")
    for name, module in [("worker-0", "worker_svc.server"), ("router", "router.server"),
                         ("worker-1", "worker_svc.server"), ("scheduler", "scheduler_svc.server")]:
        stack.services.append(Service(name, "", None, [sys.executable, "-m", module]))  # type: ignore[arg-type]
    stack.stop()
    assert stopped == ["router", "scheduler", "worker-1", "worker-0"] and not stack.services


def test_ports_handed_out_together_are_distinct() -> None:
    assert len(set(free_ports(64))) == 64


def test_ports_are_drawn_where_no_outgoing_connection_can_take_them() -> None:
    """Below the kernel's ephemeral range: between being handed out and being bound by its
    service, a port there cannot become some connection's local port."""
    low = int(launcher.EPHEMERAL_RANGE.read_text().split()[0])
    if low - launcher.LISTEN_PORTS_FROM < 1000:
        pytest.skip(f"the ephemeral range starts at {low}: no room below it")
    ports = free_ports(32)
    assert all(launcher.LISTEN_PORTS_FROM <= p < low for p in ports)
    for p in ports:  # and each is free
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))


def test_another_server_answering_on_the_port_is_not_taken_for_the_service(tiny_model: Path) -> None:
    """A router whose port another gRPC server holds (healthy, but not a router) fails to bind
    and exits: the launcher reports that instead of returning a stack whose router address
    answers every Generate with UNIMPLEMENTED."""

    async def body() -> None:
        squatter, health_servicer = serving.new_server([])
        port = serving.add_port(squatter, "127.0.0.1:0", None)
        await squatter.start()
        await serving.set_serving(health_servicer, [], True)
        stack = Stack(model=str(tiny_model))
        try:
            with pytest.raises(RuntimeError, match="router exited with code 1 before it became healthy"):
                await stack.start_router(None, port, ["--scheduler", "127.0.0.1:1", "--http-port", "-1"])
        finally:
            stack.stop()
            await squatter.stop(None)

    asyncio.run(body())
