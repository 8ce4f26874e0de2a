"""Every bad input, over gRPC and over HTTP, against a live stack: refused, naming the field.

One table, walked once per transport. gRPC answers INVALID_ARGUMENT (NOT_FOUND for an unknown
model) with details starting ``<field>:``; HTTP answers 400 (404) with OpenAI's error body whose
``param`` is the field as OpenAI spells it. The router runs with small limits so that each row
stays small.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from e2e_util import launch

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc
from router.vllm_extras import REFUSED

MAX_CHARS, MAX_N, MAX_LOGPROBS, MAX_STOPS = 2000, 4, 5, 4
INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
GENERATE, EMBED = "/pagewire.v1.Generation/Generate", "/pagewire.v1.Generation/Embed"


@dataclass(frozen=True)
class Row:
    name: str
    field: str  # what gRPC's details start with
    grpc: generation_pb2.GenerateRequest | generation_pb2.EmbedRequest | bytes | None
    http: tuple[str, dict | bytes] | None  # (path, JSON body or raw bytes)
    param: str | None = None  # HTTP's error.param, when OpenAI names the field differently
    code: grpc.StatusCode = INVALID


def gen(sampling: dict | None = None, **fields: object) -> generation_pb2.GenerateRequest:
    if not {"text", "token_ids", "chat"} & fields.keys():
        fields["text"] = "hi"
    return generation_pb2.GenerateRequest(
        sampling=common_pb2.SamplingParams(**(sampling or {})), **fields
    )


def structured(kind: int, spec: str, **sampling: object) -> generation_pb2.GenerateRequest:
    """A generate request constrained by (StructuredKind, spec)."""
    return gen({"structured": {"kind": kind, "spec": spec}, **sampling})


def chat(*messages: tuple[str, str]) -> generation_pb2.Chat:
    return generation_pb2.Chat(
        messages=[generation_pb2.ChatMessage(role=r, content=c) for r, c in messages]
    )


def cmpl(**body: object) -> tuple[str, dict]:
    return "/v1/completions", {"prompt": "hi", **body}


def chatc(messages: list[dict], **body: object) -> tuple[str, dict]:
    return "/v1/chat/completions", {"messages": messages, **body}


def bound(field: str, value: object, **others: object) -> Row:
    """A sampling field out of bounds, sent alike over both transports."""
    fields = {field: value, **others}
    return Row(f"{field}={value!r}", field, gen(fields), cmpl(**fields))


def ids(*values: int) -> generation_pb2.TokenIds:
    return generation_pb2.TokenIds(ids=values)


USER = [{"role": "user", "content": "hi"}]
Mode = generation_pb2.ToolChoice.Mode
TOOL = generation_pb2.Tool(name="f", parameters='{"type": "object", "properties": {}}')
F_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def tool_chat(*tools: generation_pb2.Tool, mode: int = 0, function: str = "") -> generation_pb2.Chat:
    c = chat(("user", "hi"))
    c.tools.extend(tools)
    c.tool_choice.mode, c.tool_choice.function = mode, function
    return c

LONG = "x" * (MAX_CHARS + 1)
BAD_UTF8_GRPC = gen().SerializeToString().replace(b"hi", b"\xff\xfe")
BAD_UTF8_PROMPT = b'{"prompt": "caf\xe9"}'  # Latin-1
BAD_UTF8_CHAT = b'{"messages": [{"role": "user", "content": "\xff"}]}'

TABLE = [
    bound("temperature", -1.0),
    bound("temperature", float("nan")),
    bound("top_p", 0.0),
    bound("top_p", 1.5),
    bound("top_k", -2),
    bound("min_p", 1.5),
    bound("presence_penalty", 3.0),
    bound("frequency_penalty", -3.0),
    bound("repetition_penalty", 0.0),
    bound("max_tokens", 0),
    bound("max_tokens", 5000),  # past the model's context
    bound("min_tokens", 9, max_tokens=5),
    bound("logprobs", MAX_LOGPROBS + 1),
    bound("prompt_logprobs", MAX_LOGPROBS + 1),
    bound("n", 0),
    bound("n", MAX_N + 1),
    bound("stop", ["a"] * (MAX_STOPS + 1)),
    bound("stop", [""]),
    bound("stop_token_ids", [10**6]),
    bound("seed", 2**64 - 1),
    bound("logit_bias", {5: 200.0}),
    bound("logit_bias", {5: -100.5}),
    bound("logit_bias", {10**6: 1.0}),  # a token id outside the vocabulary
    bound("best_of", 1, n=2),  # fewer candidates than completions
    bound("best_of", MAX_N + 1),
    Row("max_tokens not an int", "max_tokens", None, cmpl(max_tokens="5")),
    Row("top_logprobs > max", "logprobs",
        gen({"logprobs": MAX_LOGPROBS + 1}, chat=chat(("user", "hi"))),
        chatc(USER, logprobs=True, top_logprobs=MAX_LOGPROBS + 1), param="top_logprobs"),
    Row("empty prompt", "prompt", gen(text=""), cmpl(prompt="")),
    Row("empty token prompt", "prompt", gen(token_ids=ids()), cmpl(prompt=[])),
    Row("id outside the vocabulary", "token_ids", gen(token_ids=ids(10**6)), cmpl(prompt=[10**6]),
        param="prompt"),
    Row("prompt fills the context", "prompt", gen(token_ids=ids(*[5] * 4096)),
        cmpl(prompt=[5] * 4096)),
    Row("prompt over the character limit", "prompt", gen(text=LONG), cmpl(prompt=LONG)),
    Row("prompt not UTF-8", "text", BAD_UTF8_GRPC, ("/v1/completions", BAD_UTF8_PROMPT),
        param="prompt"),
    Row("chat message not UTF-8", "messages[0].content", None,
        ("/v1/chat/completions", BAD_UTF8_CHAT)),
    Row("empty chat", "messages", gen(chat=chat()), chatc([])),
    Row("unknown role", "messages[1].role", gen(chat=chat(("user", "hi"), ("robot", "beep"))),
        chatc([*USER, {"role": "robot", "content": "beep"}])),
    Row("chat over the character limit", "messages", gen(chat=chat(("user", LONG))),
        chatc([{"role": "user", "content": LONG}])),
    Row("image part to a text-only model", "messages[0].content[0]",
        gen(chat=generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", parts=[
            generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=b"\x89PNG")),
            generation_pb2.ContentPart(text="hi")])])),
        chatc([{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            {"type": "text", "text": "hi"}]}])),
    Row("logit_bias key not a token id", "logit_bias", None, cmpl(logit_bias={"a": 1})),
    Row("best_of streamed", "best_of", None, cmpl(best_of=2, stream=True)),
    Row("suffix (no infill)", "suffix", None, cmpl(suffix="end")),
    Row("second prompt of a list empty", "prompt[1]", None, cmpl(prompt=["ok", ""])),
    Row("third prompt of a list not a prompt", "prompt[2]", None, cmpl(prompt=["a", "b", 3])),
    Row("tools without --tool-call-parser (auto)", "tool_choice",
        gen(chat=tool_chat(TOOL)), chatc(USER, tools=[F_TOOL])),
    Row("tool_choice naming a missing tool", "tool_choice",
        gen(chat=tool_chat(TOOL, mode=Mode.MODE_FUNCTION, function="g")),
        chatc(USER, tools=[F_TOOL], tool_choice={"type": "function", "function": {"name": "g"}})),
    Row("tool_choice required without tools", "tool_choice",
        gen(chat=tool_chat(mode=Mode.MODE_REQUIRED)), chatc(USER, tool_choice="required")),
    Row("tool_choice not a choice", "tool_choice", None, chatc(USER, tool_choice="always")),
    Row("unknown tool type", "tools[0].type", None,
        chatc(USER, tools=[{"type": "retrieval", "function": {"name": "f"}}])),
    Row("tool without a function", "tools[0].function", None,
        chatc(USER, tools=[{"type": "function"}])),
    Row("bad tool name", "tools[0].function.name",
        gen(chat=tool_chat(generation_pb2.Tool(name="get weather"))),
        chatc(USER, tools=[{"type": "function", "function": {"name": "get weather"}}])),
    Row("tool name twice", "tools[1].function.name", gen(chat=tool_chat(TOOL, TOOL)),
        chatc(USER, tools=[F_TOOL, F_TOOL], tool_choice="none")),
    Row("tool parameters not a JSON schema", "tools[0].function.parameters",
        gen(chat=tool_chat(generation_pb2.Tool(name="f", parameters='{"type": 7}'))),
        chatc(USER, tools=[{"type": "function",
                            "function": {"name": "f", "parameters": {"type": 7}}}])),
    Row("tool parameters not an object", "tools[0].function.parameters", None,
        chatc(USER, tools=[{"type": "function", "function": {"name": "f", "parameters": []}}])),
    Row("parallel_tool_calls not a boolean", "parallel_tool_calls", None,
        chatc(USER, tools=[F_TOOL], parallel_tool_calls="no")),
    Row("tool turn without tool_call_id", "messages[1].tool_call_id", None,
        chatc([*USER, {"role": "tool", "content": "42"}])),
    Row("tool call arguments not a JSON object", "messages[1].tool_calls[0].function.arguments",
        gen(chat=generation_pb2.Chat(messages=[
            generation_pb2.ChatMessage(role="user", content="hi"),
            generation_pb2.ChatMessage(role="assistant", tool_calls=[
                generation_pb2.ToolCall(id="c", name="f", arguments="not json")])])),
        chatc([*USER, {"role": "assistant", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "not json"}}]}])),
    Row("tools in completions", "tools", None, cmpl(tools=[F_TOOL])),
    Row("tool_choice required with ignore_eos", "ignore_eos",
        gen({"ignore_eos": True}, chat=tool_chat(TOOL, mode=Mode.MODE_REQUIRED)),
        chatc(USER, tools=[F_TOOL], tool_choice="required", ignore_eos=True)),
    Row("tool_choice required with a structured output too", "tool_choice", None,
        chatc(USER, tools=[F_TOOL], tool_choice="required", guided_json={"type": "object"})),
    # Structured outputs: a spec the grammar engine refuses is named by the field it came in.
    Row("schema with an unknown type", "structured", structured(1, '{"type": "nope"}'),
        cmpl(guided_json={"type": "nope"}), param="guided_json"),
    Row("regex that does not parse", "structured", structured(3, "[a-"),
        cmpl(guided_regex="[a-"), param="guided_regex"),
    Row("grammar without a root rule", "structured", structured(5, 'start ::= "a"'),
        chatc(USER, guided_grammar='start ::= "a"'), param="guided_grammar"),
    Row("grammar that does not parse", "structured", structured(5, "root ::= "),
        cmpl(structured_outputs={"grammar": "root ::= "}), param="structured_outputs.grammar"),
    Row("response_format schema the engine refuses", "response_format.json_schema.schema", None,
        chatc(USER, response_format={"type": "json_schema",
                                     "json_schema": {"name": "x", "schema": {"type": 5}}})),
    Row("response_format json_schema without a schema", "response_format.json_schema.schema",
        None, chatc(USER, response_format={"type": "json_schema", "json_schema": {}})),
    Row("response_format of an unknown type", "response_format.type", None,
        cmpl(response_format={"type": "xml"})),
    Row("response_format not an object", "response_format", None,
        chatc(USER, response_format="json")),
    Row("strict not a boolean", "response_format.json_schema.strict", None,
        chatc(USER, response_format={"type": "json_schema",
                                     "json_schema": {"schema": {}, "strict": "yes"}})),
    Row("two constraints in one request", "guided_regex", None,
        cmpl(response_format={"type": "json_object"}, guided_regex="a+")),
    Row("guided_choice not a list", "guided_choice", None, cmpl(guided_choice="yes")),
    Row("guided_choice with an empty string", "structured", structured(4, '["a", ""]'),
        chatc(USER, guided_choice=["a", ""]), param="guided_choice"),
    Row("guided_json not a schema", "guided_json", None, cmpl(guided_json=[1])),
    Row("guided_regex not a string", "guided_regex", None, cmpl(guided_regex=5)),
    Row("structured_outputs structural_tag", "structured_outputs.structural_tag", None,
        cmpl(structured_outputs={"structural_tag": {"x": 1}})),
    Row("structured kind unset", "structured", structured(0, "a"), None),
    Row("structured json_object with a spec", "structured", structured(2, "{}"), None),
    Row("structured with ignore_eos", "ignore_eos", structured(3, "a+", ignore_eos=True),
        cmpl(guided_regex="a+", ignore_eos=True)),
    Row("structured with min_tokens", "min_tokens", structured(3, "a+", min_tokens=2),
        chatc(USER, guided_regex="a+", min_tokens=2)),
    Row("echo not a boolean", "echo", None, cmpl(echo="yes")),
    # vLLM's extras: served ones with bad values, then every one pagewire refuses (REFUSED_ROWS).
    Row("truncate_prompt_tokens 0", "truncate_prompt_tokens", gen(truncate_prompt_tokens=0),
        cmpl(truncate_prompt_tokens=0)),
    Row("cache_salt empty", "cache_salt", None, cmpl(cache_salt="")),
    Row("cache_salt too long", "cache_salt", gen(cache_salt="s" * 1025),
        chatc(USER, cache_salt="s" * 1025)),
    Row("cache_salt not a string", "cache_salt", None, cmpl(cache_salt=5)),
    Row("allowed_token_ids outside the vocabulary", "allowed_token_ids",
        gen({"allowed_token_ids": [10**6]}), cmpl(allowed_token_ids=[10**6])),
    Row("allowed_token_ids with a structured output", "allowed_token_ids",
        structured(3, "a+", allowed_token_ids=[5]), cmpl(guided_regex="a+", allowed_token_ids=[5])),
    Row("allowed_token_ids not ids", "allowed_token_ids", None, chatc(USER, allowed_token_ids="a")),
    Row("chat_template_kwargs setting messages", "chat_template_kwargs",
        gen(chat=generation_pb2.Chat(messages=chat(("user", "hi")).messages,
                                     template_kwargs='{"messages": []}')),
        chatc(USER, chat_template_kwargs={"messages": []})),
    Row("chat_template_kwargs not JSON", "chat_template_kwargs",
        gen(chat=generation_pb2.Chat(messages=chat(("user", "hi")).messages,
                                     template_kwargs="{")), None),
    Row("chat_template_kwargs not an object", "chat_template_kwargs", None,
        chatc(USER, chat_template_kwargs=[1])),
    Row("continue_final_message with add_generation_prompt", "continue_final_message",
        gen(chat=generation_pb2.Chat(messages=chat(("user", "hi")).messages,
                                     continue_final_message=True, add_generation_prompt=True)),
        chatc(USER, continue_final_message=True, add_generation_prompt=True)),
    Row("chat_template_kwargs in completions", "chat_template_kwargs", None,
        cmpl(chat_template_kwargs={"enable_thinking": False})),
    Row("add_generation_prompt in completions", "add_generation_prompt", None,
        cmpl(add_generation_prompt=False)),
    Row("add_special_tokens not a boolean", "add_special_tokens", None,
        cmpl(add_special_tokens="no")),
    Row("return_token_ids not a boolean", "return_token_ids", None, cmpl(return_token_ids=1)),
    Row("bad_words not strings", "bad_words", None, cmpl(bad_words=[1])),
    Row("too many bad_words", "bad_words", gen({"bad_words": ["w"] * 129}),
        chatc(USER, bad_words=["w"] * 129)),
    Row("bad_words token ids outside the vocabulary", "bad_words",
        gen({"bad_words_token_ids": [{"ids": [10**6]}]}), None),
    Row("request_id in the body too long", "request_id", None, cmpl(request_id="r" * 129)),
    Row("continuous_usage_stats not a boolean", "stream_options.continuous_usage_stats", None,
        chatc(USER, stream=True,
              stream_options={"include_usage": True, "continuous_usage_stats": "yes"})),
    Row("tokenize without a prompt", "prompt", None, ("/tokenize", {})),
    Row("tokenize of an unknown model", "model", None,
        ("/tokenize", {"prompt": "hi", "model": "nope"}), code=NOT_FOUND),
    Row("detokenize id outside the vocabulary", "tokens", None,
        ("/detokenize", {"tokens": [10**6]})),
    Row("request_id too long", "request_id", gen(request_id="r" * 129), None),
    Row("priority out of range", "priority", gen(priority=5000), None),
    Row("unknown model", "model", gen(model="nope"), cmpl(model="nope"), code=NOT_FOUND),
    Row("unknown chat model", "model", None, chatc(USER, model="nope"), code=NOT_FOUND),
    Row("empty embedding input", "input", generation_pb2.EmbedRequest(),
        ("/v1/embeddings", {"input": ""})),
    Row("second embedding input empty", "input[1]", None,
        ("/v1/embeddings", {"input": ["ok", ""]})),
    Row("embedding input over the limit", "input", generation_pb2.EmbedRequest(text=LONG),
        ("/v1/embeddings", {"input": LONG})),
    Row("embedding of an unknown model", "model",
        generation_pb2.EmbedRequest(model="nope", text="hi"),
        ("/v1/embeddings", {"input": "hi", "model": "nope"}), code=NOT_FOUND),
]  # fmt: skip

# One value per field of router.vllm_extras.REFUSED that it cannot honour (checked to cover it).
REFUSED_VALUES = {
    "use_beam_search": True, "length_penalty": 0.5, "logits_processors": ["m.P"],
    "vllm_xargs": {"k": 1}, "kv_transfer_params": {"do_remote_prefill": True},
    "prompt_embeds": "AAAA", "mm_processor_kwargs": {"num_crops": 4},
    "spaces_between_special_tokens": False, "documents": [{"title": "t", "text": "x"}],
    "chat_template": "{{ messages }}", "return_tokens_as_token_ids": True,
    "echo": True, "structural_tag": '{"structures": []}',
    "include_reasoning": False,
}
TABLE += [Row(f"{name} (refused)", name, None, chatc(USER, **{name: value}))
          for name, value in REFUSED_VALUES.items()]
TABLE += [Row(f"{name} in completions (refused)", name, None, cmpl(**{name: value}))
          for name, value in REFUSED_VALUES.items() if name != "echo"]


def test_the_table_covers_every_refused_vllm_field() -> None:
    assert REFUSED_VALUES.keys() == REFUSED.keys()


@pytest.fixture(scope="module")
def table_stack(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    http_port = free_port()
    stack = launch(
        tiny_model,
        tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", "300"],
        router_args=[
            "--http-port",
            str(http_port),
            "--max-prompt-chars",
            str(MAX_CHARS),
            "--max-n",
            str(MAX_N),
            "--max-logprobs",
            str(MAX_LOGPROBS),
            "--max-stop-strings",
            str(MAX_STOPS),
        ],
    )
    try:
        yield stack, f"http://127.0.0.1:{http_port}"
    finally:
        stack.stop()


async def grpc_error(address: str, row: Row) -> tuple[grpc.StatusCode, str] | None:
    """The call's error (code, details), or None if it succeeded."""
    async with serving.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        raw = channel.unary_stream(
            GENERATE,
            request_serializer=bytes,
            response_deserializer=generation_pb2.GenerateResponse.FromString,
        )
        try:
            if isinstance(row.grpc, generation_pb2.EmbedRequest):
                await stub.Embed(row.grpc)
            else:
                call = raw(row.grpc) if isinstance(row.grpc, bytes) else stub.Generate(row.grpc)
                async for _ in call:
                    pass
        except grpc.aio.AioRpcError as e:
            return e.code(), e.details() or ""
    return None


def http_error(base: str, path: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_every_bad_input_over_grpc_is_refused_naming_the_field(
    table_stack: tuple[Stack, str],
) -> None:
    stack, _ = table_stack
    wrong = []
    for row in TABLE:
        if row.grpc is None:
            continue
        got = asyncio.run(grpc_error(stack.router, row))
        if got is None or got[0] != row.code or not got[1].startswith(f"{row.field}:"):
            wrong.append(f"{row.name}: expected {row.code.name} '{row.field}: ...', got {got}")
    assert not wrong, "\n".join(wrong)


def test_every_bad_input_over_http_is_refused_naming_the_field(
    table_stack: tuple[Stack, str],
) -> None:
    _, base = table_stack
    wrong = []
    for row in TABLE:
        if row.http is None:
            continue
        status, body = http_error(base, *row.http)
        expected = {INVALID: 400, NOT_FOUND: 404}[row.code]
        error = body.get("error", {})
        param = row.param or row.field
        if (
            status != expected
            or error.get("param") != param
            or error.get("type") != "invalid_request_error"
        ):
            wrong.append(f"{row.name}: expected {expected} param={param!r}, got {status} {body}")
    assert not wrong, "\n".join(wrong)


def test_a_refused_request_leaves_the_stack_serving(table_stack: tuple[Stack, str]) -> None:
    """The table is refused before anything reaches the scheduler; a good request still works."""
    stack, base = table_stack
    assert (
        asyncio.run(grpc_error(stack.router, Row("ok", "", gen({"max_tokens": 2}), None))) is None
    )
    status, body = http_error(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200 and body["usage"]["completion_tokens"] == 2
