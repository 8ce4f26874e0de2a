"""Tool calling and reasoning through a live stack, with the official ``openai`` client and gRPC.

The model is scripted (``scripted_model``): its greedy output is a think block, a sentence and
two Hermes tool calls, produced by real weights (transformers' greedy gives the same ids). The
router runs with ``--tool-call-parser hermes --reasoning-parser qwen3`` and a chat template that
renders tools, so every step is the real one: tools into the prompt, tokens out of the worker,
text through the parsers, OpenAI's shapes (whole and streamed) back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
import scripted_model
from e2e_util import HFReference, launch
from tool_chat import TIME_TOOL, WEATHER_TOOL

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

TOOLS = [WEATHER_TOOL, TIME_TOOL]
USER = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]
REASONING = "The user wants the weather."
CALLS = [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", "{}")]
RAW_CALLS = "".join(scripted_model.SCRIPT[6:]).strip()  # the calls' text, as the model wrote it


@pytest.fixture(scope="module")
def model_dir(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return scripted_model.build(tiny_model, tmp_path_factory.mktemp("scripted") / "scripted")


@pytest.fixture(scope="module")
def tool_stack(
    model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    http_port = free_port()
    stack = launch(
        model_dir,
        tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", "256"],
        router_args=["--http-port", str(http_port), "--tool-call-parser", "hermes",
                     "--reasoning-parser", "qwen3"],
    )
    try:
        yield stack, f"http://127.0.0.1:{http_port}/v1"
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(tool_stack: tuple[Stack, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=tool_stack[1], api_key="x", max_retries=0, timeout=120) as c:
        yield c


def chat(client: openai.OpenAI, **fields: Any) -> Any:
    return client.chat.completions.create(
        model="scripted", messages=fields.pop("messages", USER), temperature=0, **fields
    )


def calls_of(message: Any) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


def test_the_model_output_is_real_greedy_output(model_dir: Path, client: openai.OpenAI) -> None:
    hf = HFReference(model_dir)
    prompt = hf.tokenizer.apply_chat_template(USER, tools=TOOLS, add_generation_prompt=True,
                                              tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    expected = hf.greedy(prompt, 40)
    answer = chat(client, tools=TOOLS, tool_choice="none", logprobs=True)
    assert answer.usage.prompt_tokens == len(prompt)  # tools rendered as transformers renders them
    assert len(expected) == len(scripted_model.SCRIPT) + 1  # the script, then EOS
    tokens = [entry.token for entry in answer.choices[0].logprobs.content]
    assert tokens == [hf.tokenizer.decode([i]) for i in expected]


def test_auto_splits_reasoning_content_and_parallel_calls(client: openai.OpenAI) -> None:
    answer = chat(client, tools=TOOLS)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == REASONING
    assert choice.message.content == "Let me check."
    assert calls_of(choice.message) == CALLS
    ids = [c.id for c in choice.message.tool_calls]
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)
    assert all(c.type == "function" for c in choice.message.tool_calls)
    args = json.loads(choice.message.tool_calls[0].function.arguments)
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])


def test_streamed_deltas_reassemble_into_the_whole_answer(client: openai.OpenAI) -> None:
    whole = chat(client, tools=TOOLS).choices[0]
    content, reasoning, calls, finish = "", "", {}, None
    for chunk in chat(client, tools=TOOLS, stream=True):
        for choice in chunk.choices:
            delta = choice.delta
            content += delta.content or ""
            reasoning += getattr(delta, "reasoning_content", None) or ""
            for call in delta.tool_calls or []:
                if call.index not in calls:  # a call's first delta: id, type and name
                    assert call.id and call.type == "function" and call.function.name
                    calls[call.index] = [call.id, call.function.name, ""]
                else:
                    assert call.id is None and call.function.name is None
                calls[call.index][2] += call.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == whole.finish_reason == "tool_calls"
    assert reasoning == whole.message.reasoning_content
    assert (content or None) == whole.message.content
    assert [(name, args) for _, name, args in calls.values()] == calls_of(whole.message)


def test_parallel_tool_calls_false_returns_the_first_call(client: openai.OpenAI) -> None:
    answer = chat(client, tools=TOOLS, parallel_tool_calls=False)
    assert calls_of(answer.choices[0].message) == CALLS[:1]
    assert answer.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("fields", [{"tools": TOOLS, "tool_choice": "none"}, {}])
def test_without_auto_the_calls_stay_in_the_content(client: openai.OpenAI, fields: dict) -> None:
    choice = chat(client, **fields).choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.tool_calls in (None, [])
    assert choice.message.reasoning_content == REASONING
    assert choice.message.content == "Let me check.\n" + RAW_CALLS


def test_an_output_cut_inside_a_call_keeps_what_arrived(client: openai.OpenAI) -> None:
    choice = chat(client, tools=TOOLS, max_tokens=9).choices[0]
    assert choice.finish_reason == "length"
    assert calls_of(choice.message) == [("get_weather", '{"city": "Par')]


def test_a_conversation_with_tool_turns_renders(model_dir: Path, client: openai.OpenAI) -> None:
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": CALLS[0][1]},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ]
    answer = chat(client, messages=messages, tools=TOOLS, max_tokens=2)
    hf = HFReference(model_dir).tokenizer
    history = [*messages[:1], {**messages[1], "tool_calls": [{
        "id": "call_1", "type": "function",
        "function": {"name": "get_weather", "arguments": json.loads(CALLS[0][1])},
    }]}, messages[2]]
    text = hf.apply_chat_template(history, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert answer.usage.prompt_tokens == len(hf.encode(text, add_special_tokens=False))


def test_grpc_chat_carries_reasoning_and_tool_call_deltas(tool_stack: tuple[Stack, str]) -> None:
    tools = [generation_pb2.Tool(name=t["function"]["name"],
                                 parameters=json.dumps(t["function"]["parameters"]))
             for t in TOOLS]
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.Chat(
            messages=[generation_pb2.ChatMessage(role="user", content=USER[0]["content"])],
            tools=tools),
        sampling=common_pb2.SamplingParams(temperature=0, max_tokens=40),
    )

    async def run() -> list[generation_pb2.GenerateResponse]:
        async with serving.insecure_channel(tool_stack[0].router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            return [r async for r in stub.Generate(request)]

    responses = asyncio.run(run())
    assert "".join(r.reasoning_text for r in responses) == REASONING
    assert "".join(r.text for r in responses) == "Let me check."
    calls: dict[int, list[str]] = {}
    for r in responses:
        for d in r.tool_calls:
            if d.id:
                calls[d.index] = [d.name, ""]
            calls[d.index][1] += d.arguments
    assert [tuple(c) for c in calls.values()] == CALLS
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
