"""``pagewire up`` takes the worker, scheduler and router settings a ``vllm serve`` user reaches
for, and hands each to every service that has it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from pagewire import cli
from pagewire.launcher import free_port


def service_args(argv: list[str]) -> dict[str, list[str]]:
    return cli.up_service_args(cli.build_parser().parse_args(["up", *argv]))


def test_defaults_hand_the_services_nothing() -> None:
    assert service_args([]) == {"scheduler": [], "worker": [], "router": []}


def test_each_setting_reaches_every_service_that_has_it() -> None:
    args = service_args([
        "--dtype", "bfloat16", "--max-model-len", "2048", "--served-model-name", "m",
        "--max-num-seqs", "8", "--threads", "2", "--kv-cache-gb", "1.5", "--no-prefix-caching",
        "--max-num-batched-tokens", "512", "--chat-template", "t.jinja",
    ])
    assert args["worker"] == ["--served-model-name", "m", "--dtype", "bfloat16",
                              "--kv-cache-gb", "1.5", "--max-model-len", "2048", "--threads", "2",
                              "--max-num-seqs", "8", "--max-num-batched-tokens", "512"]
    assert args["scheduler"] == ["--max-num-seqs", "8", "--max-num-batched-tokens", "512",
                                 "--no-prefix-caching"]
    assert args["router"] == ["--served-model-name", "m", "--chat-template", "t.jinja",
                              "--max-model-len", "2048"]


def test_what_the_environment_already_says_is_not_repeated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEWIRE_DTYPE", "bfloat16")
    assert service_args([])["worker"] == []  # the worker reads PAGEWIRE_DTYPE itself
    assert service_args(["--dtype", "float32"])["worker"] == ["--dtype", "float32"]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def post_status(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_a_real_up_serves_under_its_flags(tiny_model: Path, tmp_path: Path) -> None:
    """The served name and context length given to ``up`` are what /v1/models reports and what
    the router enforces, and the worker runs in the dtype asked for."""
    http = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "pagewire.cli", "up", "--model", str(tiny_model),
         "--port", str(free_port()), "--http-port", str(http), "--log-dir", str(tmp_path),
         "--served-model-name", "short", "--max-model-len", "64", "--dtype", "bfloat16",
         "--kv-cache-gb", "0.05", "--threads", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                models = get_json(f"{base}/v1/models")
                break
            except OSError:
                assert time.monotonic() < deadline, "pagewire up did not serve in time"
                time.sleep(0.5)
        [card] = models["data"]
        assert (card["id"], card["max_model_len"]) == ("short", 64)
        status, body = post_status(f"{base}/v1/completions",
                                   {"model": "short", "prompt": [5] * 60, "max_tokens": 10})
        assert status == 400 and "64" in body["error"]["message"], body
        status, body = post_status(f"{base}/v1/completions",
                                   {"model": "short", "prompt": "Once upon", "max_tokens": 4})
        assert status == 200 and body["usage"]["completion_tokens"] == 4, body
        worker_log = (tmp_path / "worker-0.log").read_text()
        assert "bfloat16" in worker_log, worker_log[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    # SIGTERM, even while `up` is still starting, leaves no service behind.
    assert not processes_naming(str(tmp_path)) and not processes_naming(f"--http-port {http}")


def processes_naming(text: str) -> list[int]:
    """Live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(entry.name) != os.getpid():
            found.append(int(entry.name))
    return found
