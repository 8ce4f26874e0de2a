"""The mistral tool-call parser and the deepseek_r1 reasoning parser through a live stack.

The scripted model writes R1-style reasoning (no opening tag: R1's template opens the block),
then Mistral's ``[TOOL_CALLS]`` — a special token, which a decode that skips special tokens
would hide — and a JSON array of two calls. The router must decode it for the parser and still
keep it out of the answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import scripted_model
from e2e_util import launch
from tool_chat import TIME_TOOL, WEATHER_TOOL

from pagewire.launcher import Stack, free_port

SCRIPT = (
    "Two tools", " will do.", "</think>", "[TOOL_CALLS]", '[{"name": "get_weather", "argu',
    'ments": {"city": "Oslo"}}, {"name": "get_', 'time", "arguments": {}}]',
)


@pytest.fixture(scope="module")
def client(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    model = scripted_model.build(tiny_model, tmp_path_factory.mktemp("mistral") / "mistral",
                                 SCRIPT, special=("[TOOL_CALLS]",))
    http_port = free_port()
    stack: Stack = launch(model, tmp_path_factory.mktemp("logs"),
                          worker_args=["--num-blocks", "320"],
                          router_args=["--http-port", str(http_port), "--tool-call-parser",
                                       "mistral", "--reasoning-parser", "deepseek_r1"])
    try:
        with openai.OpenAI(base_url=f"http://127.0.0.1:{http_port}/v1", api_key="x",
                           max_retries=0, timeout=120) as c:
            yield c
    finally:
        stack.stop()


def ask(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model="mistral", messages=[{"role": "user", "content": "Weather and time in Oslo?"}],
        tools=[WEATHER_TOOL, TIME_TOOL], temperature=0, **fields,
    )


def test_mistral_calls_after_r1_reasoning(client: openai.OpenAI) -> None:
    choice = ask(client).choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == "Two tools will do."
    assert choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}'), ("get_time", "{}")]


def test_streamed_mistral_calls_reassemble(client: openai.OpenAI) -> None:
    whole = ask(client).choices[0].message
    calls: dict[int, list[str]] = {}
    content = reasoning = ""
    for chunk in ask(client, stream=True):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            for call in choice.delta.tool_calls or []:
                if call.id:
                    calls[call.index] = [call.function.name, ""]
                calls[call.index][1] += call.function.arguments or ""
    assert (reasoning, content) == (whole.reasoning_content, "")
    assert list(calls.values()) == [[c.function.name, c.function.arguments]
                                    for c in whole.tool_calls]


def test_without_auto_the_special_token_stays_skipped(client: openai.OpenAI) -> None:
    choice = ask(client, tool_choice="none").choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert choice.message.content == "".join(SCRIPT[4:])  # [TOOL_CALLS] skipped, as asked
