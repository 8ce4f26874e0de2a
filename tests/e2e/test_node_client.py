"""The Node.js client (clients/node), built from the .proto files alone, against a live stack.

Its streams must equal the Python gRPC client's for the same request: the public API is a
contract between languages, not between pagewire's own Python modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_util import launch
from transformers import AutoTokenizer

from pagewire import serving
from pagewire.launcher import Stack
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

NODE_DIR = Path(__file__).resolve().parents[2] / "clients" / "node"
CLIENT = NODE_DIR / "pagewire.mjs"
# Written into node_modules after a successful `npm ci`: the install is redone when the lockfile
# changes, and reused otherwise (npm ci itself always deletes and reinstalls).
INSTALL_STAMP = NODE_DIR / "node_modules" / ".pagewire-lock-sha256"
# What npm prints when the registry cannot be reached (as opposed to a broken lockfile, which
# must fail the test rather than skip it).
NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT",
                  "ENETUNREACH", "EHOSTUNREACH", "network request")

API_KEY = "node-client-test-key"
AUTH = (("authorization", f"Bearer {API_KEY}"),)

# (prompt, SamplingParams fields); the node client gets the same fields as flags.
STREAM_CASES = [
    ("The quick brown fox", {"temperature": 0.0, "max_tokens": 24}),
    ("Café, naïve, 東京 and 🙂 walk into a bar.", {"temperature": 0.0, "max_tokens": 24}),
    # A seed above 2**53 only survives as a string on the JavaScript side.
    ("Once", {"temperature": 1.0, "top_k": 50, "seed": 2**62 + 12345, "max_tokens": 16,
              "ignore_eos": True}),
]
CHAT = [("system", "You answer briefly."), ("user", "What is a paged KV cache?")]


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with clients/node's pinned dependencies installed (once per lockfile)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node and npm are not on PATH")
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    if int(version.stdout.strip().lstrip("v").split(".")[0]) < 18:
        pytest.skip(f"the client needs node >= 18 (util.parseArgs); found {version.stdout.strip()}")
    lock_hash = hashlib.sha256((NODE_DIR / "package-lock.json").read_bytes()).hexdigest()
    if not INSTALL_STAMP.exists() or INSTALL_STAMP.read_text() != lock_hash:
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR,
                              capture_output=True, text=True, timeout=240)
        if done.returncode != 0:
            tail = done.stderr.strip()[-800:]
            if any(e in done.stderr for e in NETWORK_ERRORS):
                pytest.skip(f"npm ci could not reach the npm registry: {tail}")
            pytest.fail(f"npm ci failed in {NODE_DIR}: {tail}")
        INSTALL_STAMP.write_text(lock_hash)
    return node


@pytest.fixture(scope="module")
def keyed_stack(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack whose router is started with an API key, which every call below presents."""
    stack = launch(
        tiny_model,
        tmp_path_factory.mktemp("node-client-logs"),
        worker_args=["--num-blocks", "256", "--block-size", "16"],
        router_args=["--api-key", API_KEY],
    )
    try:
        yield stack
    finally:
        stack.stop()


def run_node(node: str, *args: str, api_key: str | None = API_KEY) -> subprocess.CompletedProcess[str]:
    """Run the client to completion. Its output must be valid UTF-8 (decoding is strict)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PAGEWIRE_API_KEY", "PAGEWIRE_ADDR")}
    key = ["--api-key", api_key] if api_key is not None else []
    return subprocess.run([node, str(CLIENT), *key, *args], capture_output=True, env=env,
                          encoding="utf-8", errors="strict", timeout=120)


def node_flags(sampling: dict[str, object]) -> list[str]:
    """{"max_tokens": 24, "ignore_eos": True} -> ["--max-tokens=24", "--ignore-eos"]."""
    flags = []
    for name, value in sampling.items():
        flag = "--" + name.replace("_", "-")
        flags.append(flag if value is True else f"{flag}={value}")
    return flags


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


async def _python_generate(address: str, request: generation_pb2.GenerateRequest) -> list:
    async with serving.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return [r async for r in stub.Generate(request, metadata=AUTH)]


def python_generate(stack: Stack, request: generation_pb2.GenerateRequest) -> list:
    """The reference: the generated Python stub's messages for the same request."""
    return asyncio.run(_python_generate(stack.router, request))


def assert_same_completion(node_msgs: list[dict], py_msgs: list) -> None:
    """Same token ids and text, same finish reason, and usage on the node client's last message."""
    assert [t for m in node_msgs for t in m["token_ids"]] == [t for m in py_msgs for t in m.token_ids]
    assert "".join(m["text"] for m in node_msgs) == "".join(m.text for m in py_msgs)
    last, py_last = node_msgs[-1], py_msgs[-1]
    assert last["finish_reason"] == common_pb2.FinishReason.Name(py_last.finish_reason)
    assert all(m["finish_reason"] == "FINISH_REASON_UNSPECIFIED" for m in node_msgs[:-1])
    usage = last["usage"]
    assert usage["prompt_tokens"] == py_last.usage.prompt_tokens
    assert usage["completion_tokens"] == py_last.usage.completion_tokens
    # The Python call ran first, so the node client's prompt may be served from the prefix cache.
    assert 0 <= usage["cached_tokens"] <= usage["prompt_tokens"]


@pytest.mark.parametrize(("prompt", "sampling"), STREAM_CASES)
def test_node_stream_matches_python_client(
    node: str, keyed_stack: Stack, prompt: str, sampling: dict[str, object]
) -> None:
    py_msgs = python_generate(keyed_stack, generation_pb2.GenerateRequest(
        text=prompt, sampling=common_pb2.SamplingParams(**sampling)))
    done = run_node(node, "--addr", keyed_stack.router, "--json", *node_flags(sampling), prompt)
    assert done.returncode == 0, done.stderr
    node_msgs = json_lines(done.stdout)
    assert len(node_msgs) > 1, "the completion should arrive as a stream of messages"
    assert_same_completion(node_msgs, py_msgs)


def test_plain_output_is_the_text_then_finish_reason_and_usage(node: str, keyed_stack: Stack) -> None:
    prompt, sampling = STREAM_CASES[1]
    py_msgs = python_generate(keyed_stack, generation_pb2.GenerateRequest(
        text=prompt, sampling=common_pb2.SamplingParams(**sampling)))
    done = run_node(node, "--addr", keyed_stack.router, *node_flags(sampling), prompt)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "".join(m.text for m in py_msgs)
    last = py_msgs[-1]
    reason = common_pb2.FinishReason.Name(last.finish_reason).removeprefix("FINISH_REASON_").lower()
    assert re.fullmatch(
        rf"\n\[{reason}: prompt {last.usage.prompt_tokens} tokens \(\d+ cached\), "
        rf"completion {last.usage.completion_tokens} tokens\]\n",
        done.stderr,
    ), done.stderr


@pytest.mark.parametrize(
    ("flag", "code", "field"),
    [
        ("--top-p=2", "INVALID_ARGUMENT", "top_p"),
        ("--max-tokens=0", "INVALID_ARGUMENT", "max_tokens"),
        ("--temperature=-1", "INVALID_ARGUMENT", "temperature"),
        ("--model=no-such-model", "NOT_FOUND", "model"),
    ],
)
def test_refused_request_exits_nonzero_with_the_status_naming_the_field(
    node: str, keyed_stack: Stack, flag: str, code: str, field: str
) -> None:
    done = run_node(node, "--addr", keyed_stack.router, flag, "hello")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith(f"error: {code}: {field}:"), done.stderr


def test_malformed_flag_is_a_usage_error_before_any_call(node: str) -> None:
    done = run_node(node, "--addr", "127.0.0.1:1", "--top-p=x", "hello")
    assert done.returncode == 2
    assert done.stderr.startswith("--top-p: not a number: x"), done.stderr


def test_list_models_matches_python_client(node: str, keyed_stack: Stack) -> None:
    async def python_list() -> generation_pb2.ListModelsResponse:
        async with serving.insecure_channel(keyed_stack.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            return await stub.ListModels(generation_pb2.ListModelsRequest(), metadata=AUTH)

    expected = asyncio.run(python_list())
    done = run_node(node, "--addr", keyed_stack.router, "--list-models", "--json")
    assert done.returncode == 0, done.stderr
    assert json_lines(done.stdout) == [{"models": [
        {"name": m.name, "max_model_len": m.max_model_len, "vocab_size": m.vocab_size}
        for m in expected.models
    ]}]


def test_chat_mode_matches_python_client(node: str, keyed_stack: Stack, tiny_model: Path) -> None:
    sampling = {"temperature": 0.0, "max_tokens": 16}
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in CHAT]),
        sampling=common_pb2.SamplingParams(**sampling),
    )
    py_msgs = python_generate(keyed_stack, request)
    done = run_node(node, "--addr", keyed_stack.router, "--json", *node_flags(sampling),
                    "--chat", *(f"{r}:{c}" for r, c in CHAT))
    assert done.returncode == 0, done.stderr
    node_msgs = json_lines(done.stdout)
    assert_same_completion(node_msgs, py_msgs)
    # The template's own BOS, and no second one from the tokenizer.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    rendered = tokenizer.apply_chat_template(
        [{"role": r, "content": c} for r, c in CHAT], tokenize=False, add_generation_prompt=True)
    assert node_msgs[-1]["usage"]["prompt_tokens"] == len(
        tokenizer.encode(rendered, add_special_tokens=False))


@pytest.mark.parametrize("api_key", [None, "not-the-key"], ids=["no-key", "wrong-key"])
def test_call_without_the_api_key_is_unauthenticated(
    node: str, keyed_stack: Stack, api_key: str | None
) -> None:
    done = run_node(node, "--addr", keyed_stack.router, "--list-models", api_key=api_key)
    assert done.returncode == 1
    assert done.stderr.startswith("error: UNAUTHENTICATED:"), done.stderr
