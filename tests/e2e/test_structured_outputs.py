"""Structured outputs with the official ``openai`` client against a live stack.

Sampled at temperature 1 from the random-weight test model, every output must still parse and
validate: the grammar's mask is the only thing between the model and garbage. The schema bounds
its strings and arrays so that a random model finishes within max_tokens.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import openai
import pytest
import redis
from e2e_util import launch, redis_keys, run_concurrently

from pagewire.launcher import Stack, free_port
from pagewire.structured import StructuredOutput
from pagewire.v1 import common_pb2, generation_pb2

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 8},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
REGEX = r"(yes|no), [0-9]{1,3} ([a-z]{1,6} ){0,3}items"
CHOICES = ["red", "green", "blue", "ultraviolet light"]
GRAMMAR = (
    'root ::= "(" expr ")"\nexpr ::= num | num " + " num | num " + " num " + " num\n'
    "num ::= [1-9] | [1-9] [0-9]"
)
USER = [{"role": "user", "content": "Describe a user as JSON."}]


@pytest.fixture(scope="module")
def base_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    http_port = free_port()
    stack: Stack = launch(
        tiny_model, tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", "1024", "--block-size", "16"],
        router_args=["--http-port", str(http_port), "--max-n", "20"],
    )
    try:
        yield f"http://127.0.0.1:{http_port}/v1"
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300) as c:
        yield c


def schema_format() -> dict:
    return {"type": "json_schema",
            "json_schema": {"name": "user", "strict": True, "schema": SCHEMA}}


def test_twenty_sampled_json_schema_completions_all_validate(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(
        model="", messages=USER, n=10, temperature=1.0, max_tokens=300, seed=1,
        response_format=schema_format())  # type: ignore[arg-type]
    cmpl = client.completions.create(
        model="", prompt="A user:", n=10, temperature=1.0, max_tokens=300, seed=2,
        extra_body={"guided_json": SCHEMA})
    texts = [c.message.content or "" for c in chat.choices] + [c.text for c in cmpl.choices]
    reasons = [c.finish_reason for c in chat.choices] + [c.finish_reason for c in cmpl.choices]
    assert len(texts) == 20 and reasons == ["stop"] * 20, reasons
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 10, "temperature 1 samples differ"


def test_regex_choice_and_grammar_outputs_match(client: openai.OpenAI) -> None:
    regex = client.completions.create(
        model="", prompt="Answer:", n=10, temperature=1.0, max_tokens=100,
        extra_body={"guided_regex": REGEX})
    for c in regex.choices:
        assert c.finish_reason == "stop" and re.fullmatch(REGEX, c.text), c.text
    choice = client.chat.completions.create(
        model="", messages=USER, n=10, temperature=1.0, max_tokens=20,
        extra_body={"guided_choice": CHOICES})
    assert all(c.message.content in CHOICES for c in choice.choices)
    grammar = client.completions.create(
        model="", prompt="Sum:", n=10, temperature=1.0, max_tokens=100,
        extra_body={"structured_outputs": {"grammar": GRAMMAR}})
    for c in grammar.choices:
        assert c.finish_reason == "stop", c.text
        assert re.fullmatch(r"\([1-9][0-9]?( \+ [1-9][0-9]?){0,2}\)", c.text), c.text


def test_json_object_outputs_are_objects(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model="", messages=USER, n=8, temperature=1.0, max_tokens=300, seed=3,
        response_format={"type": "json_object"})
    finished = [c for c in out.choices if c.finish_reason == "stop"]
    assert finished, "some random-weight objects close within 300 tokens"
    for c in finished:
        assert isinstance(json.loads(c.message.content or ""), dict)
    assert all((c.message.content or "").startswith("{") for c in out.choices)


def test_streamed_constrained_chat_equals_the_whole_answer(client: openai.OpenAI) -> None:
    kw = {"model": "", "messages": USER, "temperature": 1.0, "max_tokens": 300, "seed": 11,
          "response_format": schema_format()}
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    stream = client.chat.completions.create(stream=True, **kw)  # type: ignore[call-overload]
    text, reason = "", None
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reason = c.finish_reason or reason
    assert text == whole.choices[0].message.content and reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def structured_request(seed: int) -> generation_pb2.GenerateRequest:
    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    return generation_pb2.GenerateRequest(text=f"User {seed}:", sampling=common_pb2.SamplingParams(
        temperature=1.0, seed=seed, max_tokens=200, structured=spec.to_proto()))


def test_constrained_requests_survive_preemption_unchanged(
    tiny_model: Path, tmp_path: Path
) -> None:
    """Seeded constrained requests in a KV pool too small for them all: the preempted ones are
    recomputed and their matchers replayed; each output equals the same request run alone."""
    stack = launch(tiny_model, tmp_path, worker_args=["--num-blocks", "32", "--block-size", "8"],
                   scheduler_args=["--check-invariants"])
    try:
        requests = [structured_request(seed) for seed in range(8)]
        together = asyncio.run(run_concurrently(stack.router, requests))
        load = redis.Redis.from_url(stack.redis_url).hgetall(
            redis_keys(tiny_model).worker_load("worker-0"))
        assert int(load[b"preemptions"]) > 0, "the pool was meant to be too small for all"
        for request, (ids, text, last) in zip(requests, together, strict=True):
            alone = asyncio.run(run_concurrently(stack.router, [request]))[0]
            assert ids == alone[0]
            assert last.finish_reason == common_pb2.FINISH_REASON_STOP
            jsonschema.validate(json.loads(text), SCHEMA)
    finally:
        stack.stop()
