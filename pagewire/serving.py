"""What every pagewire gRPC server and client shares: options, health, reflection, logging."""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagewire.tls import TLSFiles

# Between our own services: a step or a step result for a large batch is big, and the peer is
# trusted (and, with --tls-client-auth, authenticated).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# What the public API accepts from anyone: above the largest request the router's own limits admit
# (--max-prompt-chars 1 Mi characters is at most 4 MiB of UTF-8, plus the other fields), so a
# client over a field's limit hears which field from the router, and this is only the backstop
# that keeps a stranger from making grpc buffer 64 MiB per call.
PUBLIC_MAX_RECEIVE_BYTES = 8 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # A peer that is not up yet (starting, restarted) is dialled again within half a second, not
    # after gRPC's default backoff (1 s growing 1.6x to 2 min): a health poll or a scheduler link
    # otherwise notices a service seconds after it listens (measured: up to 6 s late for one
    # that took 10 s to start). Dialling a few peers twice a second costs nothing.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]
SERVER_OPTIONS = [
    *CHANNEL_OPTIONS,
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.so_reuseport", 0),
]


def insecure_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def open_channel(target: str, tls: TLSFiles | None) -> grpc.aio.Channel:
    """A channel to a pagewire peer: TLS (verified against --tls-ca, our cert as client identity)
    when ``tls`` is set, plaintext otherwise."""
    if tls is None:
        return insecure_channel(target)
    return grpc.aio.secure_channel(target, tls.channel_credentials(), options=CHANNEL_OPTIONS)


def add_port(server: grpc.aio.Server, address: str, tls: TLSFiles | None) -> int:
    """Listen on ``address`` (TLS when ``tls`` is set) and return the bound port."""
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def new_server(
    service_names: Iterable[str],
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_receive_bytes: int = MAX_MESSAGE_BYTES,
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """A grpc.aio server with health (NOT_SERVING until the caller says so) and reflection.

    A call whose request is over ``max_receive_bytes`` fails with RESOURCE_EXHAUSTED before any
    handler sees it."""
    options = [
        *(o for o in SERVER_OPTIONS if o[0] != "grpc.max_receive_message_length"),
        ("grpc.max_receive_message_length", max_receive_bytes),
    ]
    server = grpc.aio.server(interceptors=list(interceptors), options=options)
    health_servicer = health.aio.HealthServicer()
    # grpcio's servicer starts the whole server ("") as SERVING; ours is not ready until the
    # service says so (model loaded, workers attached), or probes and launchers would send
    # work to a server that cannot take it yet. No watcher exists yet, so setting the status
    # table directly is all that set() would do here.
    health_servicer._server_status[""] = health_pb2.HealthCheckResponse.NOT_SERVING
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, reflection.SERVICE_NAME, health.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    return server, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, names: Iterable[str], ok: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *names]:
        await health_servicer.set(name, status)


async def run_until_signalled(
    server: grpc.aio.Server,
    health_servicer: health.aio.HealthServicer,
    names: Iterable[str],
    grace: float = 5.0,
    drain: Callable[[], Awaitable[None]] | None = None,
    drain_timeout_s: float = 30.0,
) -> None:
    """Serve until SIGTERM/SIGINT; then drain and stop.

    Draining: health turns NOT_SERVING (load balancers and probes stop sending work), ``drain``
    (the service's own: refuse new work, wait for in-flight work) runs for at most
    ``drain_timeout_s``, then the server stops and gives calls still open ``grace`` seconds.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await set_serving(health_servicer, names, False)
    if drain is not None:
        try:
            await asyncio.wait_for(drain(), drain_timeout_s)
        except asyncio.TimeoutError:
            logging.getLogger("serving").warning(
                "drain did not finish in %.0f s: stopping with work in flight", drain_timeout_s)
    await server.stop(grace)


def event_loop_runner() -> Callable[[Any], Any]:
    """``uvloop.run`` where uvloop is installed, else ``asyncio.run``; ``PAGEWIRE_EVENT_LOOP``
    (``uvloop`` or ``asyncio``) picks one, and a loop it names must be there.

    A service's event loop does its per-token work (gRPC messages, SSE writes, Redis calls) on
    the cores a CPU worker's OpenMP team computes on, where each CPU-second it takes costs the
    team's step about two (docs/BENCHMARKS.md). uvloop's loop does the same work in less: in a
    bfloat16 burst of 64 streams on 2 cores the router took 0.071-0.074 CPU-ms per output token
    against 0.077-0.104, the scheduler 0.031-0.033 against 0.033-0.037, and the burst ran 3 %
    faster (4 of 4 alternating rounds)."""
    choice = os.environ.get("PAGEWIRE_EVENT_LOOP", "")
    if choice not in ("", "uvloop", "asyncio"):
        raise ValueError(f"PAGEWIRE_EVENT_LOOP={choice!r}: must be 'uvloop' or 'asyncio'")
    if choice == "asyncio":
        return asyncio.run
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ValueError("PAGEWIRE_EVENT_LOOP=uvloop, but uvloop is not installed") from None
        return asyncio.run
    return uvloop.run


def run_main(serve: Callable[[], Awaitable[None]]) -> None:
    """Entry point of a service process: run ``serve``, exit quietly on Ctrl-C.

    A service that stopped cleanly leaves at once (atexit handlers run, logs and output flushed,
    then ``os._exit``): the interpreter's own teardown of the modules a worker or router imports
    (torch, transformers) takes 0.4-0.9 s per process and frees nothing a stopped process needs.
    A failure still unwinds normally, traceback and exit code included."""
    try:
        event_loop_runner()(serve())
    except KeyboardInterrupt:
        pass
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


async def wait_healthy(
    target: str, timeout: float, service: str = "", tls: TLSFiles | None = None
) -> None:
    """Poll grpc.health.v1 on ``target`` until SERVING; raise TimeoutError otherwise."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with open_channel(target, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1.0)
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if loop.time() > deadline:
                raise TimeoutError(f"{target} not healthy after {timeout}s")
            await asyncio.sleep(0.1)
