"""Chat prompts: rendered by the model's template, tokenized exactly as transformers does."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from tool_chat import HERMES_TEMPLATE, TIME_TOOL, WEATHER_TOOL
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagewire.v1 import generation_pb2
from router.chat import check_messages, render_chat
from router.errors import RequestError

MESSAGES = [("system", "Answer briefly."), ("user", "What is a paged KV cache?")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(tiny_model)


def chat(messages: list[tuple[str, str]] = MESSAGES, **fields: object) -> generation_pb2.Chat:
    return generation_pb2.Chat(
        messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in messages], **fields
    )


def hf_ids(tokenizer: PreTrainedTokenizerBase, add_generation_prompt: bool = True) -> list[int]:
    dicts = [{"role": r, "content": c} for r, c in MESSAGES]
    encoded = tokenizer.apply_chat_template(
        dicts, tokenize=True, add_generation_prompt=add_generation_prompt
    )
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_rendered_ids_equal_transformers_apply_chat_template(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    assert render_chat(tokenizer, chat(), None) == hf_ids(tokenizer)


def test_one_bos_only(tokenizer: PreTrainedTokenizerBase) -> None:
    ids = render_chat(tokenizer, chat(), None)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1


def test_generation_prompt_is_on_by_default_and_can_be_turned_off(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    with_prompt = render_chat(tokenizer, chat(), None)
    without = render_chat(tokenizer, chat(add_generation_prompt=False), None)
    assert without == hf_ids(tokenizer, add_generation_prompt=False)
    assert with_prompt[: len(without)] == without and len(with_prompt) > len(without)
    assert tokenizer.decode(with_prompt[len(without) :]) == "<|im_start|>assistant\n"


def test_override_template_replaces_the_tokenizers(tokenizer: PreTrainedTokenizerBase) -> None:
    template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    ids = render_chat(tokenizer, chat(), template)
    expected = "[system] Answer briefly.\n[user] What is a paged KV cache?\n"
    assert tokenizer.decode(ids) == expected


def test_template_exception_is_invalid_argument_naming_messages(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RequestError) as e:
        render_chat(tokenizer, chat(), template)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(e.value) == "messages: the chat template refused them: roles must alternate"


def test_a_model_without_template_is_a_failed_precondition(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    bare = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    bare.chat_template = None
    with pytest.raises(RequestError) as e:
        render_chat(bare, chat(), None)
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--chat-template" in str(e.value)


@pytest.mark.parametrize(
    ("messages", "max_chars", "message"),
    [
        ([], 100, "messages: must not be empty"),
        ([("user", "hi"), ("robot", "beep")], 100, "messages[1].role: must be one of"),
        ([("user", "x" * 60), ("assistant", "y" * 41)], 100, "messages: content is 101 characters"),
    ],
)
def test_bad_conversations_name_the_field(
    messages: list[tuple[str, str]], max_chars: int, message: str
) -> None:
    with pytest.raises(RequestError) as e:
        check_messages(chat(messages), max_chars)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert str(e.value).startswith(message)


def test_tools_and_tool_turns_render_as_transformers_renders_them(
    tokenizer: PreTrainedTokenizerBase,
) -> None:
    history = [
        {"role": "system", "content": "Be useful."},
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Oslo"}},
        }]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    proto = generation_pb2.Chat(messages=[
        generation_pb2.ChatMessage(role="system", content="Be useful."),
        generation_pb2.ChatMessage(role="user", content="Weather in Oslo?"),
        generation_pb2.ChatMessage(role="assistant", tool_calls=[generation_pb2.ToolCall(
            id="call_1", name="get_weather", arguments='{"city": "Oslo"}')]),
        generation_pb2.ChatMessage(role="tool", tool_call_id="call_1", content="sunny"),
    ])
    tools = [WEATHER_TOOL, TIME_TOOL]
    ids = render_chat(tokenizer, proto, HERMES_TEMPLATE, tools)
    expected = tokenizer.apply_chat_template(
        history, tools=tools, chat_template=HERMES_TEMPLATE, add_generation_prompt=True,
        tokenize=False,
    )
    assert tokenizer.decode(ids) == expected
    assert ids == tokenizer.encode(expected, add_special_tokens=False)
    assert '"name": "get_time"' in expected and '{"city": "Oslo"}' in expected


def test_tool_call_arguments_must_be_a_json_object(tokenizer: PreTrainedTokenizerBase) -> None:
    proto = generation_pb2.Chat(messages=[
        generation_pb2.ChatMessage(role="assistant", tool_calls=[
            generation_pb2.ToolCall(id="c", name="f", arguments="[1]")]),
    ])
    with pytest.raises(RequestError) as e:
        render_chat(tokenizer, proto, HERMES_TEMPLATE, None)
    assert e.value.field == "messages[0].tool_calls[0].function.arguments"
