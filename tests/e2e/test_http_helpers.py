"""vLLM's helper endpoints on the router's HTTP port, and the error labels of every status, against
a live stack with an API key (liveness, version and metrics answer without it; the rest do not).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_util import HFReference, launch

from pagewire.launcher import Stack, free_port

KEY = "sk-helpers"


@pytest.fixture(scope="module")
def base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    stack: Stack = launch(tiny_model, tmp_path_factory.mktemp("logs"),
                          router_args=["--http-port", str(port), "--api-key", KEY])
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stack.stop()


def call(base: str, method: str, path: str, body: dict | None = None,
         key: str | None = KEY) -> tuple[int, bytes, str]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(base + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers.get("Content-Type", "")


def test_tokenize_and_detokenize_are_the_models_tokenizer(
    base: str, hf_reference: HFReference
) -> None:
    text = "Paged memory is cheap"
    expected = hf_reference.tokenizer.encode(text)
    status, raw, _ = call(base, "POST", "/tokenize", {"prompt": text, "return_token_strs": True})
    body = json.loads(raw)
    assert status == 200 and body["tokens"] == expected and body["count"] == len(expected)
    assert body["max_model_len"] > len(expected)
    assert body["token_strs"] == hf_reference.tokenizer.convert_ids_to_tokens(expected)
    plain = json.loads(call(base, "POST", "/tokenize",
                            {"prompt": text, "add_special_tokens": False})[1])
    assert plain["tokens"] == hf_reference.tokenizer.encode(text, add_special_tokens=False)
    status, raw, _ = call(base, "POST", "/detokenize", {"tokens": expected})
    assert status == 200 and json.loads(raw)["prompt"] == hf_reference.tokenizer.decode(expected)


def test_tokenize_messages_is_the_chat_templated_prompt(
    base: str, hf_reference: HFReference
) -> None:
    messages = [{"role": "user", "content": "Name a prime."}]
    encoded = hf_reference.tokenizer.apply_chat_template(messages, tokenize=True,
                                                         add_generation_prompt=True)
    expected = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
    body = json.loads(call(base, "POST", "/tokenize", {"messages": messages})[1])
    assert body["tokens"] == expected


def test_version_ping_and_metrics_answer_without_the_key(base: str) -> None:
    status, raw, _ = call(base, "GET", "/version", key=None)
    assert status == 200 and json.loads(raw)["version"]
    assert call(base, "GET", "/ping", key=None)[0] == 200
    assert call(base, "POST", "/ping", key=None)[0] == 200
    assert call(base, "GET", "/health", key=None)[0] == 200
    call(base, "POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    status, raw, kind = call(base, "GET", "/metrics", key=None)
    assert status == 200 and kind.startswith("text/plain")
    assert b"pagewire:time_to_first_token_seconds_count" in raw
    assert call(base, "POST", "/tokenize", {"prompt": "hi"}, key=None)[0] == 401


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "kind", "code"),
    [
        ("GET", "/v1/no-such-path", None, 404, "invalid_request_error", "unknown_url"),
        ("POST", "/v1/completions", {"prompt": "hi", "model": "nope"}, 404,
         "invalid_request_error", "model_not_found"),
        ("GET", "/v1/completions", None, 405, "invalid_request_error", "method_not_allowed"),
        ("POST", "/v1/completions", {"prompt": "hi", "temperature": -1}, 400,
         "invalid_request_error", None),
    ],
)
def test_errors_carry_the_type_and_code_of_their_status(
    base: str, method: str, path: str, body: dict | None, status: int, kind: str,
    code: str | None,
) -> None:
    got, raw, _ = call(base, method, path, body)
    error = json.loads(raw)["error"]
    assert (got, error["type"], error["code"]) == (status, kind, code), error
