"""Start pagewire and vLLM on one model directory with the same settings; stop them again.

Both serve the OpenAI completions endpoint on loopback under the same model name, with the same
dtype, KV cache size, max model length and number of compute threads:

| setting | pagewire (worker flags) | vLLM |
|---|---|---|
| dtype | ``--dtype`` | ``--dtype`` |
| KV cache | ``--kv-cache-gb`` | ``VLLM_CPU_KVCACHE_SPACE`` (GiB) |
| max model length | ``--max-model-len`` | ``--max-model-len`` |
| threads | ``--threads N`` (torch) | ``VLLM_CPU_OMP_THREADS_BIND`` = cores 0..N-1 (OpenMP) |

Everything else is each server's default, as a user starting it would get. pagewire's
processes run this clone's code (``PYTHONPATH`` is set to it), whatever is installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import vllm_env

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class ServerSettings:
    model: str
    dtype: str = "float32"
    kv_cache_gb: int = 1
    max_model_len: int = 2048
    threads: int = 2
    served_name: str = "bench-model"
    vllm_bind: str = ""  # VLLM_CPU_OMP_THREADS_BIND; empty: cores 0..threads-1

    def omp_bind(self) -> str:
        return self.vllm_bind or f"0-{self.threads - 1}"


@dataclass
class RunningServer:
    """A server the bench started: its HTTP base URL, its root processes, how to stop it."""

    name: str
    base_url: str
    roots: dict[str, int]  # role -> pid of each root process (CPU accounting walks their trees)
    stop_fns: list = field(default_factory=list)
    grpc_addr: str = ""  # pagewire's router, for the parity check's exact token ids

    def stop(self) -> None:
        for fn in self.stop_fns:
            fn()
        self.stop_fns.clear()


def http_json(url: str, body: dict | None = None, timeout: float = 60.0) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def child_env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH", "")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}


async def start_pagewire(s: ServerSettings, http_port: int, log_dir: Path) -> RunningServer:
    from pagewire.launcher import start_stack

    worker = ["--dtype", s.dtype, "--kv-cache-gb", str(s.kv_cache_gb), "--max-model-len",
              str(s.max_model_len), "--threads", str(s.threads), "--served-model-name", s.served_name]
    router = ["--http-port", str(http_port), "--served-model-name", s.served_name,
              "--max-model-len", str(s.max_model_len)]
    t0 = time.perf_counter()
    stack = await start_stack(s.model, worker_args=worker, router_args=router,
                              log_dir=log_dir / f"pagewire-{s.dtype}", env=child_env())
    print(f"pagewire up in {time.perf_counter() - t0:.1f} s", flush=True)
    roots = {svc.name.split("-")[0]: svc.process.pid for svc in stack.services}
    if stack.redis is not None:
        roots["redis-server"] = stack.redis.pid
    server = RunningServer("pagewire", f"http://127.0.0.1:{http_port}", roots, [stack.stop],
                           grpc_addr=stack.router)
    wait_http(server, None, timeout=60)
    return server


def vllm_command(s: ServerSettings, venv: Path, port: int) -> tuple[list[str], dict[str, str]]:
    cmd = vllm_env.cli_command(
        venv, "serve", s.model, "--dtype", s.dtype, "--max-model-len", str(s.max_model_len),
        "--served-model-name", s.served_name, "--port", str(port), "--host", "127.0.0.1",
        "--seed", "0", "--disable-uvicorn-access-log",
    )
    env = {"VLLM_CPU_KVCACHE_SPACE": str(s.kv_cache_gb), "VLLM_CPU_OMP_THREADS_BIND": s.omp_bind()}
    return cmd, env


def start_vllm(s: ServerSettings, venv: Path, port: int, log_dir: Path) -> RunningServer:
    cmd, env = vllm_command(s, venv, port)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = open(log_dir / f"vllm-{s.dtype}.log", "ab")  # noqa: SIM115 (owned by the child)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=log_dir,
                            env={**os.environ, **env})

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    server = RunningServer("vllm", f"http://127.0.0.1:{port}", {"api_server": proc.pid}, [stop])
    try:
        wait_http(server, proc, timeout=900)
    except BaseException:
        server.stop()
        raise
    print(f"vLLM up in {time.perf_counter() - t0:.1f} s", flush=True)
    return server


def wait_http(server: RunningServer, proc: subprocess.Popen | None, timeout: float) -> None:
    """Until ``/v1/models`` answers; fails at once if the process exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {proc.returncode} before serving")
        try:
            http_json(server.base_url + "/v1/models", timeout=5)
            return
        except OSError:
            time.sleep(1.0)
    raise RuntimeError(f"{server.name} did not serve within {timeout:.0f} s")
