"""OpenAI JSON bodies become the API's own messages; a wrong type is a 400 naming the field."""

from __future__ import annotations

import json

import grpc
import pytest

from pagewire.structured import StructuredOutput
from pagewire.v1 import common_pb2, generation_pb2
from router.errors import RequestError
from router.openai_requests import chat_call, completion_call, embedding_call, parse_body


def refused(call: object, body: dict) -> RequestError:
    with pytest.raises(RequestError) as e:
        call(body)  # type: ignore[operator]
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value


def test_completion_fields_map_onto_sampling_params() -> None:
    call = completion_call(
        {
            "model": "m",
            "prompt": "Hi",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "n": 2,
            "stop": "\n",
            "seed": 2**63,
            "presence_penalty": 1,
            "frequency_penalty": -1.5,
            "logprobs": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
            "top_k": 4,
            "min_p": 0.1,
            "repetition_penalty": 1.2,
            "min_tokens": 2,
            "stop_token_ids": [9],
            "ignore_eos": True,
            "include_stop_str_in_output": True,
        }
    )
    r = call.request
    assert (r.model, r.text) == ("m", "Hi")
    expected = common_pb2.SamplingParams(
        max_tokens=7,
        temperature=0,
        top_p=0.5,
        n=2,
        stop=["\n"],
        seed=2**63,
        presence_penalty=1,
        frequency_penalty=-1.5,
        logprobs=3,
        top_k=4,
        min_p=0.1,
        repetition_penalty=1.2,
        min_tokens=2,
        stop_token_ids=[9],
        ignore_eos=True,
        include_stop_str_in_output=True,
    )
    assert r.sampling == expected
    assert (call.chat, call.stream, call.include_usage, call.logprobs) == (False, True, True, True)


@pytest.mark.parametrize(
    ("prompt", "kind", "value"),
    [
        ("text", "text", "text"),
        (["text"], "text", "text"),
        ([1, 2, 3], "token_ids", [1, 2, 3]),
        ([[1, 2, 3]], "token_ids", [1, 2, 3]),
        ([], "token_ids", []),
    ],
)
def test_prompt_is_a_string_or_token_ids_alone_or_as_a_batch_of_one(
    prompt: object, kind: str, value: object
) -> None:
    request = completion_call({"prompt": prompt}).request
    assert request.WhichOneof("prompt") == kind
    got = request.text if kind == "text" else list(request.token_ids.ids)
    assert got == value


def test_unset_fields_stay_unset_so_the_apis_defaults_apply() -> None:
    r = completion_call({"prompt": "x"}).request
    for name in ("temperature", "max_tokens", "n", "logprobs", "seed", "min_p"):
        assert not r.sampling.HasField(name), name


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": True}, "temperature"),
        ({"prompt": "x", "max_tokens": 1.5}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2**31}, "max_tokens"),
        ({"prompt": "x", "n": "2"}, "n"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "stop": [1]}, "stop"),
        ({"prompt": "x", "stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": []}, "stream_options"),
        ({"prompt": "x", "echo": "yes"}, "echo"),
        ({"prompt": "x", "logit_bias": [5]}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"five": 10}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": "10"}}, "logit_bias"),
        ({"prompt": "x", "logit_bias": {"5": 10**400}}, "logit_bias"),
        ({"prompt": "x", "best_of": 3, "stream": True}, "best_of"),
        ({"prompt": "x", "best_of": "3"}, "best_of"),
        ({"prompt": "x", "suffix": "end"}, "suffix"),
        ({"prompt": "x", "guided_json": [1]}, "guided_json"),
        ({"prompt": "x", "guided_json": "{not json"}, "guided_json"),
        ({"prompt": "x", "guided_choice": "a"}, "guided_choice"),
        ({"prompt": "x", "guided_choice": []}, "guided_choice"),
        ({"prompt": "x", "guided_regex": ""}, "guided_regex"),
        ({"prompt": "x", "guided_grammar": 5}, "guided_grammar"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format.type"),
        ({"prompt": "x", "response_format": "json"}, "response_format"),
        ({"prompt": "x", "structured_outputs": {"regex": 5}}, "structured_outputs.regex"),
        ({"prompt": "x", "structured_outputs": {"json_object": 1}}, "structured_outputs.json_object"),
        ({"prompt": "x", "guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
        ({"prompt": "x", "guided_json": {}, "guided_decoding_backend": "outlines"},
         "guided_decoding_backend"),
        ({"prompt": "x", "guided_regex": "a", "guided_whitespace_pattern": " "},
         "guided_whitespace_pattern"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt"),
        ({"prompt": ["a", 5]}, "prompt[1]"),
        ({"prompt": ["a", [1, "b"]]}, "prompt[1]"),
        ({"prompt": [1, "b"]}, "prompt"),
        ({"prompt": [1, 2**40]}, "prompt"),
    ],
)
def test_completion_type_errors_name_the_field(body: dict, field: str) -> None:
    assert refused(completion_call, body).field == field


def test_chat_messages_and_logprobs() -> None:
    call = chat_call(
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                },
                {"role": "assistant", "content": None},
            ],
            "max_completion_tokens": 5,
            "logprobs": True,
            "top_logprobs": 2,
            "add_generation_prompt": False,
        }
    )
    chat = call.request.chat
    assert [(m.role, m.content) for m in chat.messages] == [
        ("system", "Be brief."),
        ("user", "Hi there"),
        ("assistant", ""),
    ]
    assert chat.HasField("add_generation_prompt") and not chat.add_generation_prompt
    assert call.request.sampling.max_tokens == 5 and call.request.sampling.logprobs == 2
    assert call.chat and call.logprobs


def test_chat_logprobs_without_top_logprobs_is_the_sampled_token_only() -> None:
    sampling = chat_call(
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True}
    ).request.sampling
    assert sampling.HasField("logprobs") and sampling.logprobs == 0
    sampling = chat_call({"messages": [{"role": "user", "content": "x"}]}).request.sampling
    assert not sampling.HasField("logprobs")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].image_url.url",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        *(
            ({"messages": [{"role": "user", "content": "x"}], "tools": tools}, field)
            for tools, field in [
                ({"type": "function"}, "tools"),
                ([{"type": "function"}], "tools[0].function"),
                ([{"type": "retrieval", "function": {"name": "f"}}], "tools[0].type"),
                ([{"type": "function", "function": {"name": 3}}], "tools[0].function.name"),
                (
                    [{"type": "function", "function": {"name": "f", "parameters": "{}"}}],
                    "tools[0].function.parameters",
                ),
                (
                    [{"type": "function", "function": {"name": "f", "strict": True}}],
                    "tools[0].function.strict",
                ),
            ]
        ),
        *(
            ({"messages": [{"role": "user", "content": "x"}], "tool_choice": value}, "tool_choice")
            for value in ["any", 5, {"type": "function"}, {"function": {"name": "f"}}]
        ),
        (
            {"messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": "yes"},
            "parallel_tool_calls",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}]},
            "messages[0].tool_calls[0].function",
        ),
        (
            {"messages": [{"role": "assistant", "tool_calls": [
                {"id": "1", "type": "function", "function": {"name": "f", "arguments": {}}}
            ]}]},
            "messages[0].tool_calls[0].function.arguments",
        ),
        ({"messages": [{"role": "tool", "content": "42"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "json_schema", "json_schema": {"name": "x"}},
            },
            "response_format.json_schema.schema",
        ),
        *(
            ({"messages": [{"role": "user", "content": "x"}], name: value}, name)
            for name, value in [
                ("guided_choice", [""]),
                ("structured_outputs", ["json"]),
                ("functions", [{"name": "f"}]),
            ]
        ),
    ],
)
def test_chat_type_errors_name_the_field(body: dict, field: str) -> None:
    assert refused(chat_call, body).field == field


def test_embedding_inputs_become_one_request_each() -> None:
    call = embedding_call({"input": ["one", [1, 2]], "model": "m", "pooling": "last"})
    assert [r.WhichOneof("input") for r in call.requests] == ["text", "token_ids"]
    assert all(r.model == "m" and r.pooling == common_pb2.POOLING_LAST for r in call.requests)
    assert all(r.normalize for r in call.requests)  # OpenAI's embeddings have unit length
    assert not call.base64
    assert len(embedding_call({"input": [1, 2, 3]}).requests) == 1
    assert embedding_call({"input": "x", "encoding_format": "base64"}).base64
    assert not embedding_call({"input": "x", "normalize": False}).requests[0].normalize


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"input": []}, "input"),
        ({"input": 3}, "input"),
        ({"input": ["ok", 3]}, "input[1]"),
        ({"input": ["ok", [1, "x"]]}, "input[1]"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "pooling": "max"}, "pooling"),
        ({"input": "x", "dimensions": 8}, "dimensions"),
    ],
)
def test_embedding_errors_name_the_field(body: dict, field: str) -> None:
    assert refused(embedding_call, body).field == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b'{"prompt": "caf\xe9"}', "prompt"),  # Latin-1, not UTF-8
        (
            b'{"messages": [{"role": "user", "content": "ok"},'
            b' {"role": "user", "content": "\xff"}]}',
            "messages[1].content",
        ),
        (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop[0]"),  # a lone surrogate escape
        (b'{"prompt": "ok", "\xff": 1}', "body"),
    ],
)
def test_invalid_utf8_is_a_400_naming_the_field(raw: bytes, field: str) -> None:
    assert refused(parse_body, raw).field == field  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b""])
def test_a_body_that_is_not_a_json_object_is_refused(raw: bytes) -> None:
    assert refused(parse_body, raw).field == "body"  # type: ignore[arg-type]


def test_valid_unicode_passes_through() -> None:
    body = {"prompt": "Café 東京 🙂"}
    assert parse_body(json.dumps(body).encode()) == body
    assert parse_body(json.dumps(body, ensure_ascii=False).encode()) == body


def test_an_empty_message_list_is_still_a_chat_to_be_refused_as_such() -> None:
    assert chat_call({"messages": []}).request.WhichOneof("prompt") == "chat"


def test_a_list_of_prompts_is_one_request_per_prompt_with_the_same_sampling() -> None:
    call = completion_call({"prompt": ["one", "two", "three"], "max_tokens": 3, "n": 2})
    assert [r.text for r in call.requests] == ["one", "two", "three"]
    assert all(r.sampling.max_tokens == 3 and r.sampling.n == 2 for r in call.requests)
    ids = completion_call({"prompt": [[1, 2], [3]]}).requests
    assert [list(r.token_ids.ids) for r in ids] == [[1, 2], [3]]


def test_echo_with_logprobs_asks_for_the_prompts_logprobs_too() -> None:
    r = completion_call({"prompt": "x", "echo": True, "logprobs": 3, "max_tokens": 0}).request
    assert r.echo and r.sampling.logprobs == 3 and r.sampling.prompt_logprobs == 3
    assert r.sampling.HasField("max_tokens") and r.sampling.max_tokens == 0
    plain = completion_call({"prompt": "x", "logprobs": 3}).request
    assert not plain.echo and not plain.sampling.HasField("prompt_logprobs")


def test_logit_bias_and_best_of_map_onto_sampling_params() -> None:
    r = completion_call({"prompt": "x", "logit_bias": {"5": 10, "7": -100.0}, "best_of": 4}).request
    assert dict(r.sampling.logit_bias) == {5: 10.0, 7: -100.0}
    assert r.sampling.best_of == 4
    chat = chat_call({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"3": 1}})
    assert dict(chat.request.sampling.logit_bias) == {3: 1.0}


def test_chat_tools_and_tool_turns_map_onto_the_chat() -> None:
    weather = {"type": "object", "properties": {"city": {"type": "string"}}}
    body = {
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather now", "parameters": weather,
        }}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    chat = chat_call(body).request.chat
    tool = chat.tools[0]
    assert (tool.name, tool.description, json.loads(tool.parameters)) == (
        "get_weather", "Weather now", weather
    )
    assert chat.tool_choice.mode == generation_pb2.ToolChoice.MODE_FUNCTION
    assert chat.tool_choice.function == "get_weather"
    assert chat.parallel_tool_calls is False
    call = chat.messages[1].tool_calls[0]
    assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Oslo"}')
    assert chat.messages[1].content == ""
    assert chat.messages[2].tool_call_id == "call_1"
    modes = {v: chat_call({**body, "tool_choice": v}).request.chat.tool_choice.mode
             for v in ("none", "auto", "required")}
    assert modes == {"none": generation_pb2.ToolChoice.MODE_NONE,
                     "auto": generation_pb2.ToolChoice.MODE_AUTO,
                     "required": generation_pb2.ToolChoice.MODE_REQUIRED}


def test_completions_refuse_chat_tool_fields() -> None:
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert refused(completion_call, {"prompt": "x", "tools": tools}).field == "tools"


@pytest.mark.parametrize(
    ("fields", "kind", "spec", "field"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", "", "response_format"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "p", "strict": True, "schema": {"type": "object"}}}},
         "json_schema", '{"type": "object"}', "response_format.json_schema.schema"),
        ({"response_format": {"type": "text"}, "guided_json": '{"type": "integer"}'},
         "json_schema", '{"type": "integer"}', "guided_json"),
        ({"guided_regex": "[a-z]+"}, "regex", "[a-z]+", "guided_regex"),
        ({"guided_regex": "x", "guided_decoding_backend": "xgrammar"}, "regex", "x",
         "guided_regex"),
        ({"guided_choice": ["yes", "no"]}, "choice", '["yes", "no"]', "guided_choice"),
        ({"guided_grammar": 'root ::= "a"'}, "grammar", 'root ::= "a"', "guided_grammar"),
        ({"structured_outputs": {"json": {"type": "array"}}}, "json_schema",
         '{"type": "array"}', "structured_outputs.json"),
        ({"structured_outputs": {"regex": "x"}}, "regex", "x", "structured_outputs.regex"),
        ({"structured_outputs": {"choice": ["a"]}}, "choice", '["a"]',
         "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": "g"}}, "grammar", "g", "structured_outputs.grammar"),
        ({"structured_outputs": {"json_object": True}}, "json_object", "",
         "structured_outputs.json_object"),
    ],
)
def test_structured_output_fields_become_one_constraint(
    fields: dict, kind: str, spec: str, field: str
) -> None:
    for call in (completion_call({"prompt": "x", **fields}),
                 chat_call({"messages": [{"role": "user", "content": "x"}], **fields})):
        got = StructuredOutput.from_proto(call.request.sampling.structured)
        assert got == StructuredOutput(kind, spec) and call.structured_field == field


def test_text_response_format_is_unconstrained() -> None:
    call = completion_call({"prompt": "x", "response_format": {"type": "text"}})
    assert not call.request.sampling.HasField("structured") and call.structured_field == ""


@pytest.mark.parametrize(
    ("options", "continuous"),
    [
        ({"include_usage": True, "continuous_usage_stats": True}, True),
        ({"include_usage": True, "continuous_usage_stats": False}, False),
        ({"continuous_usage_stats": True}, False),  # vLLM: no usage at all without include_usage
        ({"include_usage": True}, False),
    ],
)
def test_continuous_usage_stats_is_vllms_running_usage_with_include_usage(
    options: dict, continuous: bool
) -> None:
    body = {"model": "m", "prompt": "Hi", "stream": True, "stream_options": options}
    call = completion_call(body)
    assert call.continuous_usage is continuous
    assert call.include_usage is bool(options.get("include_usage"))


def test_continuous_usage_stats_must_be_a_boolean() -> None:
    body = {"model": "m", "prompt": "Hi", "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": "yes"}}
    with pytest.raises(RequestError) as e:
        completion_call(body)
    assert e.value.field == "stream_options.continuous_usage_stats"
