"""tool_choice required and a named function: the output is held to the tools' schemas by the
structured-output engine, so every sampled answer parses into calls whose arguments validate.

The random test model at temperature 1 is the hardest client there is: left alone it never
writes JSON. Twenty samples of each must all parse; a seeded request streamed and whole must
reassemble into the same calls. With ``auto``, a regex (vLLM's ``guided_regex``) makes the same
model write a Hermes ``<tool_call>`` block, which the router's hermes parser reads back.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from e2e_util import launch

from pagewire.launcher import Stack, free_port

FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
        "when": {"type": "object", "properties": {"hour": {"type": "integer", "minimum": 0,
                                                           "maximum": 23}},
                 "required": ["hour"]},
    },
    "required": ["city", "days"],
}
NOW = {"type": "object", "properties": {}}
TOOLS = [
    {"type": "function", "function": {"name": "forecast", "parameters": FORECAST}},
    {"type": "function", "function": {"name": "now", "parameters": NOW}},
]
SCHEMAS = {"forecast": FORECAST, "now": NOW}
MESSAGES = [{"role": "user", "content": "Will it rain in Oslo tomorrow?"}]


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    http_port = free_port()
    stack: Stack = launch(tiny_model, tmp_path_factory.mktemp("logs"),
                          worker_args=["--num-blocks", "512"],
                          router_args=["--http-port", str(http_port),
                                       "--tool-call-parser", "hermes"])
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x",
                           max_retries=0, timeout=300) as c:
            yield c
    finally:
        stack.stop()


def sample(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model=client.models.list().data[0].id, messages=MESSAGES, tools=TOOLS, temperature=1.0,
        **{"max_tokens": 120, **fields},
    )


def assert_valid_calls(message: Any) -> list[tuple[str, dict]]:
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    for name, args in calls:
        jsonschema.validate(args, SCHEMAS[name])
    return calls


def test_a_named_function_always_gets_valid_arguments(client: openai.OpenAI) -> None:
    choice = {"type": "function", "function": {"name": "forecast"}}
    answers = [sample(client, tool_choice=choice, n=10, seed=s) for s in (1, 2)]
    choices = [c for a in answers for c in a.choices]
    assert len(choices) == 20
    for c in choices:
        assert c.finish_reason == "stop" and c.message.content is None
        calls = assert_valid_calls(c.message)
        assert [name for name, _ in calls] == ["forecast"]
    assert len({json.dumps(assert_valid_calls(c.message)) for c in choices}) > 1  # sampled


@pytest.mark.parametrize("parallel", [False, True])
def test_required_always_calls_the_tools(client: openai.OpenAI, parallel: bool) -> None:
    # Parallel calls end when the sampled array closes: room for a long one (seeded, so fixed).
    answers = [sample(client, tool_choice="required", parallel_tool_calls=parallel, n=10, seed=s,
                      max_tokens=600) for s in (3, 4)]
    counts = []
    for c in (c for a in answers for c in a.choices):
        assert c.finish_reason == "tool_calls", c
        calls = assert_valid_calls(c.message)
        assert calls and all(name in SCHEMAS for name, _ in calls)
        counts.append(len(calls))
    assert len(counts) == 20
    if not parallel:
        assert set(counts) == {1}


def test_streamed_constrained_calls_reassemble_into_the_whole_answer(client: openai.OpenAI) -> None:
    fields = {"tool_choice": "required", "seed": 7}
    whole = sample(client, **fields).choices[0]
    calls: dict[int, list[str]] = {}
    finish = None
    for chunk in sample(client, stream=True, **fields):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.id:
                    calls[call.index] = [call.function.name, ""]
                calls[call.index][1] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    expected = [[c.function.name, c.function.arguments] for c in whole.message.tool_calls]
    assert list(calls.values()) == expected


HERMES_CALL = (
    r'Sure\.\n<tool_call>\n\{"name": "forecast", "arguments": '
    r'\{"city": "(Paris|Oslo|Lima)", "days": [1-7]\}\}\n</tool_call>'
)


def test_auto_parses_a_call_the_model_was_made_to_write(client: openai.OpenAI) -> None:
    answers = sample(client, tool_choice="auto", n=8, seed=11, extra_body={"guided_regex": HERMES_CALL})
    for c in answers.choices:
        assert c.finish_reason == "tool_calls" and c.message.content == "Sure."
        [(name, args)] = assert_valid_calls(c.message)
        assert name == "forecast" and set(args) == {"city", "days"}
    streamed: dict[int, list[str]] = {}
    for chunk in sample(client, tool_choice="auto", seed=11, stream=True,
                        extra_body={"guided_regex": HERMES_CALL}):
        for choice in chunk.choices:
            for call in choice.delta.tool_calls or []:
                if call.id:
                    streamed[call.index] = [call.function.name, ""]
                streamed[call.index][1] += call.function.arguments or ""
    whole = sample(client, tool_choice="auto", seed=11, extra_body={"guided_regex": HERMES_CALL})
    calls = [[c.function.name, c.function.arguments] for c in whole.choices[0].message.tool_calls]
    assert list(streamed.values()) == calls
