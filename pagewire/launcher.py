"""Run the whole stack locally as separate processes: Redis, worker(s), scheduler, router.

Used by ``pagewire up`` and by the end-to-end tests, so both exercise the same real processes on
loopback. Each service is started as ``python -m <service>.server`` with flags. The router starts
beside the workers (it waits for its scheduler itself, and its imports and tokenizer take as long
as a small model's load), the scheduler once every worker is healthy (so it attaches them all
before it serves); the launcher returns when all report gRPC health and stops everything
(SIGTERM, then SIGKILL) router first, workers last.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from pagewire import serving
from pagewire.redis_server import RedisServer, start_redis, stop_process
from pagewire.tls import TLSFiles
from pagewire.v1 import generation_pb2, scheduler_pb2, worker_pb2

EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LISTEN_PORTS_FROM = 10000  # the low end of the range listening ports are drawn from


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free now: bound all at once, so none repeats another (one at a time,
    the router was once handed the port its worker was about to listen on).

    Drawn below the kernel's ephemeral range where there is room (Linux: 32768-60999 unless
    configured otherwise), as port 0 would not be: a port is free when handed out but bound by its
    service only later, and in between any process's outgoing connection may take an ephemeral one
    (a scheduler once failed to bind its metrics port in CI so). No connection takes a port below
    the range; only another listener drawing the same one could, one chance in thousands."""
    sockets: list[socket.socket] = []
    room = range(LISTEN_PORTS_FROM, _ephemeral_low())
    draws = random.sample(room, min(len(room), 4 * n + 64)) if len(room) >= 4 * n else []
    try:
        for port in [*draws, *[0] * n]:  # port 0 (ephemeral) only if the draws run out
            if len(sockets) == n:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, port))
            except OSError:
                s.close()
                continue
            sockets.append(s)
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (LISTEN_PORTS_FROM where unknown,
    so that port 0 is used)."""
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LISTEN_PORTS_FROM


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


START_S = 120.0  # for a service to report healthy
WORKER_START_S = 300.0  # a worker loads its model first
_ROLE_STOP_ORDER = ("router.server", "scheduler_svc.server", "worker_svc.server")
# What the launcher asks each role's health for: its own gRPC service, so that another process
# answering on the address (a port taken by someone else) is not taken for it.
_HEALTH = {
    "router.server": generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    "scheduler_svc.server": scheduler_pb2.DESCRIPTOR.services_by_name["Scheduler"].full_name,
    "worker_svc.server": worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name,
}
TAIL_LINES = 20  # of a service's output, shown when it dies while starting


class Output:
    """Where a service's output goes -- its log file, else our own stderr -- and its last lines,
    so that a service that dies while starting can be reported with its reason, not only its
    exit code."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.recent: deque[str] = deque(maxlen=TAIL_LINES)  # without a file: kept as copied

    def attach(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        if self.path is not None:
            out = open(self.path, "ab")  # noqa: SIM115 (owned by the child)
            return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        threading.Thread(target=self._copy, args=(proc.stdout,), daemon=True).start()
        return proc

    def _copy(self, pipe: IO[bytes]) -> None:
        for line in pipe:
            sys.stderr.buffer.write(line)
            sys.stderr.buffer.flush()
            self.recent.append(line.decode(errors="replace").rstrip("\n"))

    def last_lines(self) -> list[str]:
        if self.path is None:
            return list(self.recent)
        with open(self.path, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - 16384, 0))
            return f.read().decode(errors="replace").splitlines()[-TAIL_LINES:]


@dataclass
class Service:
    name: str
    address: str
    process: subprocess.Popen[bytes]
    command: list[str] = field(default_factory=list)
    output: Output = field(default_factory=lambda: Output(None))

    @property
    def module(self) -> str:
        """The ``python -m`` module it runs (its role)."""
        return self.command[2] if len(self.command) > 2 else ""

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.process, timeout)

    def exited(self, what: str) -> str:
        """``<name> exited with code N <what>``, and the last lines it wrote."""
        lines = self.output.last_lines()
        tail = "".join(f"\n  | {line}" for line in lines)
        return (f"{self.name} exited with code {self.process.returncode} {what}"
                + (f"; its last {len(lines)} lines of output:{tail}" if lines else ""))


def _stop_rank(svc: Service) -> int:
    order = _ROLE_STOP_ORDER
    return order.index(svc.module) if svc.module in order else len(order)


@dataclass
class Stack:
    """A running local deployment. ``router`` is the address clients dial."""

    model: str
    redis_url: str = ""
    redis: RedisServer | None = None
    services: list[Service] = field(default_factory=list)
    log_dir: Path | None = None
    # TLS material every service gets (--tls-cert/--tls-key/--tls-ca[/--tls-client-auth]); the
    # launcher's own health checks present the same identity.
    tls: TLSFiles | None = None
    env: dict[str, str] = field(default_factory=dict)  # extra environment (OTEL_*, ...)

    def tls_args(self) -> list[str]:
        t = self.tls
        if t is None:
            return []
        args = ["--tls-cert", t.cert_file, "--tls-key", t.key_file, "--tls-ca", t.ca_file]
        return [*args, "--tls-client-auth"] if t.client_auth else args

    @property
    def router(self) -> str:
        return next(s.address for s in self.services if s.name == "router")

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def spawn(self, name: str, module: str, args: list[str], port: int) -> Service:
        """Run ``python -m module args`` listening on ``port``, without waiting for it."""
        command = [sys.executable, "-m", module, *args, *self.tls_args()]
        output = self._output(name)
        svc = Service(name, f"127.0.0.1:{port}", self._popen(output, command), command, output)
        self.services.append(svc)
        return svc

    async def start_service(
        self, name: str, module: str, args: list[str], port: int, timeout: float = START_S
    ) -> Service:
        """:meth:`spawn`, then return once it reports healthy."""
        svc = self.spawn(name, module, args, port)
        await self._wait(svc, timeout)
        return svc

    def _output(self, name: str) -> Output:
        if self.log_dir is None:
            return Output(None)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return Output(self.log_dir / f"{name}.log")

    def _popen(self, output: Output, command: list[str]) -> subprocess.Popen[bytes]:
        return output.attach(command, {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"})

    async def restart(self, name: str, timeout: float = 0) -> Service:
        """Start a stopped (or killed) service again, same flags, same address; a worker gets
        a worker's time to load (unless ``timeout`` says otherwise)."""
        svc = self.service(name)
        svc.stop()
        svc.process = self._popen(svc.output, svc.command)
        worker = svc.module == "worker_svc.server"
        await self._wait(svc, timeout or (WORKER_START_S if worker else START_S))
        return svc

    async def _wait(self, svc: Service, timeout: float) -> None:
        """Until ``svc`` is healthy; fails at once if its process exits first (a bad flag, an
        import error), rather than after the whole timeout."""
        health = asyncio.ensure_future(
            serving.wait_healthy(svc.address, timeout, _HEALTH.get(svc.module, ""), self.tls))
        try:
            while not health.done():
                await asyncio.wait([health], timeout=0.2)
                if not health.done() and svc.process.poll() is not None:
                    await asyncio.sleep(0.1)  # the copy of its last output, when it is piped
                    raise RuntimeError(svc.exited("before it became healthy"))
            health.result()
        except TimeoutError:
            code = svc.process.poll()
            raise RuntimeError(f"{svc.name} did not become healthy (exit code {code})") from None
        finally:
            health.cancel()

    def spawn_worker(
        self, name: str = "worker", extra: list[str] | None = None, port: int = 0
    ) -> Service:
        port = port or free_port()
        args = ["--model", self.model, "--port", str(port), "--worker-id", name,
                "--redis-url", self.redis_url, *(extra or [])]
        return self.spawn(name, "worker_svc.server", args, port)

    def spawn_scheduler(
        self, workers: list[Service], extra: list[str] | None = None, name: str = "scheduler",
        port: int = 0,
    ) -> Service:
        port = port or free_port()
        args = ["--port", str(port), "--redis-url", self.redis_url,
                "--workers", ",".join(w.address for w in workers), *(extra or [])]
        return self.spawn(name, "scheduler_svc.server", args, port)

    def spawn_router(
        self, scheduler: str | None, port: int = 0, extra: list[str] | None = None
    ) -> Service:
        """A router bound to the scheduler at address ``scheduler``, or (None) to every
        scheduler group found in Redis."""
        port = port or free_port()
        fixed = ["--scheduler", scheduler] if scheduler is not None else []
        args = ["--model", self.model, "--port", str(port), *fixed,
                "--redis-url", self.redis_url, *(extra or [])]
        return self.spawn("router", "router.server", args, port)

    async def start_worker(self, name: str = "worker", extra: list[str] | None = None) -> Service:
        svc = self.spawn_worker(name, extra)
        await self._wait(svc, WORKER_START_S)
        return svc

    async def start_scheduler(
        self, workers: list[Service], extra: list[str] | None = None, name: str = "scheduler"
    ) -> Service:
        svc = self.spawn_scheduler(workers, extra, name)
        await self._wait(svc, START_S)
        return svc

    async def start_router(
        self, scheduler: Service | None, port: int = 0, extra: list[str] | None = None
    ) -> Service:
        svc = self.spawn_router(scheduler.address if scheduler else None, port, extra)
        await self._wait(svc, START_S)
        return svc

    async def wait_all(self, services: list[Service], timeout: float = WORKER_START_S) -> None:
        """Until every one of ``services`` is healthy; the first failure raises, and the other
        waits end with it."""
        waits = [asyncio.ensure_future(self._wait(s, timeout)) for s in services]
        try:
            await asyncio.gather(*waits)
        finally:
            for w in waits:
                w.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    def stop(self) -> None:
        """Routers first (no new requests), then schedulers, then workers; within a role, the
        last started first."""
        for svc in sorted(reversed(self.services), key=_stop_rank):
            svc.stop()
        self.services.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def shared_cores(worker_args: list[str], num_workers: int) -> list[str]:
    """``--threads`` for workers that share this machine's cores, unless one was chosen: each
    worker's torch threads default to every core, and several workers' OpenMP teams spinning on
    the same cores stall one another at every parallel region (docs/BENCHMARKS.md, "A busy
    neighbour")."""
    chosen = any(a == "--threads" or a.startswith("--threads=") for a in worker_args)
    if num_workers <= 1 or chosen or os.environ.get("PAGEWIRE_THREADS"):
        return []
    return ["--threads", str(max(1, (os.cpu_count() or 1) // num_workers))]


async def start_stack(
    model: str,
    *,
    router_port: int = 0,
    worker_args: list[str] | None = None,
    scheduler_args: list[str] | None = None,
    router_args: list[str] | None = None,
    num_workers: int = 1,
    log_dir: Path | None = None,
    tls: TLSFiles | None = None,
    env: dict[str, str] | None = None,
    redis_url: str = "",
) -> Stack:
    """Redis (``redis_url``, else REDIS_URL, else a private redis-server), then the workers and
    the router together, then the scheduler once the workers serve."""
    stack = Stack(model=str(model), log_dir=log_dir, tls=tls, env=dict(env or {}))
    try:
        stack.redis_url = redis_url or os.environ.get("REDIS_URL", "")
        if not stack.redis_url:
            stack.redis = start_redis()
            stack.redis_url = stack.redis.url
        args = [*shared_cores(worker_args or [], num_workers), *(worker_args or [])]
        *worker_ports, sched_port, own_port = free_ports(num_workers + 2)
        workers = [stack.spawn_worker(f"worker-{i}", args, port)
                   for i, port in enumerate(worker_ports)]
        router = stack.spawn_router(f"127.0.0.1:{sched_port}", router_port or own_port,
                                    router_args)
        await stack.wait_all(workers)
        sched = stack.spawn_scheduler(workers, scheduler_args, port=sched_port)
        await stack.wait_all([sched, router])
    except BaseException:
        stack.stop()
        raise
    return stack
