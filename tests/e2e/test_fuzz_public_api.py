"""Fuzzing the public API of one live stack: whatever a client sends, it gets a clear answer.

Hypothesis draws every public request message, half of them with every field in bounds and half
from anything the field's type can hold (out-of-bounds values, every prompt kind or none,
unknown enum values, int32 extremes, NaN), raw bytes in place of a serialized request, and JSON
bodies for the OpenAI HTTP front. Each call must end before its deadline with success or a
status a client can act on: INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED (never UNKNOWN,
INTERNAL or a hang); over HTTP, 200 or a 4xx in OpenAI's error shape (never a 5xx). An in-bounds
request is not refused, and a success is whole: each of its n completions ends with a finish
reason, its usage, and at most max_tokens tokens. After each run every process is alive, a plain
request is served, and Redis shows every KV block back in exactly one place.

Requests run one at a time (a fuzzer looks for wrong answers, not for races), on a sync channel.
``max_tokens`` is drawn small or past the context, so each success costs a few decode steps.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from e2e_util import assert_block_invariants, greedy_request, launch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.sampling import MAX_SEED, MAX_TOP_K
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

NUM_BLOCKS, MAX_N, MAX_LOGPROBS, MAX_STOPS, MAX_CHARS = 512, 3, 5, 4, 4000
DEADLINE_S = 30.0
ROUTES = {False: "/v1/completions", True: "/v1/chat/completions"}
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
# Statuses a client can act on. UNAVAILABLE (draining) is not among them: nothing drains here.
REFUSALS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED}  # fmt: skip
# derandomize: the same examples on every run (CI must not flake); each is a live call.
FUZZ = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def fuzz_stack(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    http_port = free_port()
    stack = launch(
        tiny_model, tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", str(NUM_BLOCKS), "--block-size", "16"],
        scheduler_args=["--check-invariants"],
        router_args=[
            "--http-port", str(http_port), "--max-n", str(MAX_N),
            "--max-logprobs", str(MAX_LOGPROBS), "--max-stop-strings", str(MAX_STOPS),
            "--max-prompt-chars", str(MAX_CHARS),
            "--tool-call-parser", "hermes", "--reasoning-parser", "qwen3",
        ],
    )  # fmt: skip
    try:
        yield stack, f"http://127.0.0.1:{http_port}"
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def channel(fuzz_stack: tuple[Stack, str]) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(fuzz_stack[0].router, options=serving.CHANNEL_OPTIONS) as ch:
        yield ch


# ---- strategies ---------------------------------------------------------------------------
# Each field has two strategies: values in bounds, and anything its type can hold. A request is
# drawn either all in bounds (it must succeed, whole) or from the union (mostly refused), so both
# outcomes are exercised whatever the seed.
def int32s(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Around the interesting range, and the int32 extremes."""
    return st.integers(lo, hi) | st.sampled_from([INT32_MIN, INT32_MAX])


def floats(lo: float, hi: float) -> st.SearchStrategy[float]:
    """float32 values in [lo, hi] (bounds exact in float32)."""
    return st.floats(lo, hi, width=32)


ANY_FLOAT = floats(-3, 3) | st.floats(width=32)  # the second has nan, inf, huge and tiny
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=40)
# The served model is the tiny_model fixture's directory name.
SERVED = "tiny"
SHORT_STOPS = st.lists(st.text(min_size=1, max_size=4), max_size=MAX_STOPS)
SAMPLING_FIELDS: dict[str, tuple[st.SearchStrategy[Any], st.SearchStrategy[Any]]] = {
    "temperature": (floats(0, 2), ANY_FLOAT),
    "top_p": (floats(0.0625, 1), ANY_FLOAT),
    "min_p": (floats(0, 1), ANY_FLOAT),
    "presence_penalty": (floats(-2, 2), ANY_FLOAT),
    "frequency_penalty": (floats(-2, 2), ANY_FLOAT),
    "repetition_penalty": (floats(0.125, 2), ANY_FLOAT),
    "top_k": (st.integers(-1, 50), int32s(-3, 5) | st.just(MAX_TOP_K + 1)),
    # Past the 4096-token context whatever the prompt: a success is always a few steps.
    "max_tokens": (st.integers(1, 8), int32s(-1, 0) | st.sampled_from([4096, 10**6])),
    "min_tokens": (st.integers(0, 1), int32s(-1, 10)),
    "n": (st.integers(1, MAX_N), int32s(-1, MAX_N + 1)),
    "logprobs": (st.integers(0, MAX_LOGPROBS), int32s(-1, MAX_LOGPROBS + 1)),
    "prompt_logprobs": (st.integers(0, MAX_LOGPROBS), int32s(-1, MAX_LOGPROBS + 1)),
    "stop": (SHORT_STOPS, st.lists(st.text(max_size=4), max_size=MAX_STOPS + 1)),
    "stop_token_ids": (st.lists(st.integers(0, 1023), max_size=3),
                       st.lists(int32s(-1, 1030), max_size=3)),
    "seed": (st.integers(0, MAX_SEED), st.integers(MAX_SEED, 2**64 - 1)),
    "ignore_eos": (st.booleans(), st.booleans()),
    "skip_special_tokens": (st.booleans(), st.booleans()),
    "include_stop_str_in_output": (st.booleans(), st.booleans()),
}  # fmt: skip


def in_bounds_or_not(
    message: Callable[[bool], st.SearchStrategy[Any]],
) -> st.SearchStrategy[tuple[bool, Any]]:
    """(valid, a message drawn all in bounds when valid, from anything otherwise)."""
    return st.booleans().flatmap(lambda valid: message(valid).map(lambda m: (valid, m)))


def sampling_params(valid: bool) -> st.SearchStrategy[common_pb2.SamplingParams]:
    optional = {name: ok if valid else ok | bad for name, (ok, bad) in SAMPLING_FIELDS.items()}
    return st.fixed_dictionaries({}, optional=optional).map(
        lambda fields: common_pb2.SamplingParams(**fields))


def flag(name: str) -> st.SearchStrategy[dict[str, bool]]:
    """An optional bool field: absent, or set."""
    return st.just({}) | st.booleans().map(lambda b: {name: b})


def chats(valid: bool) -> st.SearchStrategy[generation_pb2.Chat]:
    roles = st.sampled_from(["system", "user", "assistant"])
    if not valid:
        roles |= st.sampled_from(["tool", "robot", ""])
    messages = st.lists(st.builds(generation_pb2.ChatMessage, role=roles, content=TEXT),
                        min_size=int(valid), max_size=4)
    return st.builds(lambda m, f, t: generation_pb2.Chat(messages=m, **f, **t),
                     messages, flag("add_generation_prompt"), tool_fields(valid))


SCHEMAS = ["", '{"type": "object", "properties": {"a": {"type": "integer"}}}']
ToolMode = generation_pb2.ToolChoice.Mode


def tool_fields(valid: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A chat's tools: in bounds, well-formed functions with auto or none (the router parses with
    hermes); otherwise any names, parameter texts, choices (required and named run constrained)."""
    if valid:
        tool = st.builds(generation_pb2.Tool, name=st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                         parameters=st.sampled_from(SCHEMAS))
        tools = st.lists(tool, max_size=2, unique_by=lambda t: t.name)
        modes = st.sampled_from([ToolMode.MODE_UNSPECIFIED, ToolMode.MODE_NONE, ToolMode.MODE_AUTO])
        choice = st.builds(generation_pb2.ToolChoice, mode=modes)
    else:
        parameters = st.sampled_from([*SCHEMAS, "[1]", "{", '{"type": 5}']) | TEXT
        tools = st.lists(st.builds(generation_pb2.Tool, name=st.sampled_from(["f", "g"]) | TEXT,
                                   parameters=parameters), max_size=3)
        choice = st.builds(generation_pb2.ToolChoice, mode=st.integers(-1, 5),
                           function=st.sampled_from(["f", "g"]) | TEXT)
    return st.just({}) | st.fixed_dictionaries({"tools": tools, "tool_choice": choice})


def token_ids(valid: bool) -> st.SearchStrategy[list[int]]:
    """Short lists, and sometimes a long prompt: 63 KV blocks, or past the 4096-token context
    (a valid prompt near the context costs seconds of prefill per example on a CPU)."""
    if valid:
        return st.lists(st.integers(3, 1023), min_size=1, max_size=40) | st.just([7] * 1000)
    return st.lists(int32s(-2, 1030), max_size=40) | st.integers(4097, 4100).map(lambda k: [7] * k)


def prompts(valid: bool, chat: bool = True) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments for one arm of a request's prompt oneof (none at all when not valid)."""
    arms = [
        st.text(min_size=int(valid), max_size=40).map(lambda t: {"text": t}),
        token_ids(valid).map(lambda ids: {"token_ids": generation_pb2.TokenIds(ids=ids)}),
    ]
    if chat:
        arms.append(chats(valid).map(lambda c: {"chat": c}))
    return st.one_of(*arms) if valid else st.one_of(st.just({}), *arms)


def models(valid: bool) -> st.SearchStrategy[str]:
    served = st.sampled_from(["", SERVED])
    if valid:
        return served
    return st.one_of(served, served, served, st.just("nope") | TEXT)  # mostly the rest is judged


def generate_request(valid: bool) -> st.SearchStrategy[generation_pb2.GenerateRequest]:
    sampling = sampling_params(valid)
    return st.builds(
        lambda prompt, **fields: generation_pb2.GenerateRequest(**prompt, **fields),
        prompts(valid), model=models(valid),
        sampling=sampling if valid else st.none() | sampling,
        request_id=st.text(max_size=128 if valid else 130),
        priority=st.integers(-1000, 1000) if valid else int32s(-1001, 1001),
    )  # fmt: skip


def embed_request(valid: bool) -> st.SearchStrategy[generation_pb2.EmbedRequest]:
    return st.builds(
        lambda prompt, **fields: generation_pb2.EmbedRequest(**prompt, **fields),
        prompts(valid, chat=False), model=models(valid), normalize=st.booleans(),
        pooling=st.integers(0, 2) if valid else st.integers(-1, 3),  # an enum: open in proto3
        request_id=st.text(max_size=128 if valid else 130),
    )  # fmt: skip


def tokenize_request(valid: bool) -> st.SearchStrategy[generation_pb2.TokenizeRequest]:
    return st.builds(lambda f, **fields: generation_pb2.TokenizeRequest(**f, **fields),
                     flag("add_special_tokens"), model=models(valid), text=TEXT)


def detokenize_request(valid: bool) -> st.SearchStrategy[generation_pb2.DetokenizeRequest]:
    return st.builds(lambda f, **fields: generation_pb2.DetokenizeRequest(**f, **fields),
                     flag("skip_special_tokens"), model=models(valid), token_ids=token_ids(valid))


# ---- what every answer must look like -------------------------------------------------------
def assert_clear_refusal(error: grpc.RpcError, request: object) -> None:
    code, details = error.code(), error.details() or ""
    assert code in REFUSALS, f"{code.name} {details!r} for {request!r}"
    assert details, f"{code.name} without details for {request!r}"


def judge_refusal(
    error: grpc.RpcError, request: object, valid: bool, outcomes: Counter[str]
) -> None:
    """A refusal must be clear, and an in-bounds request is not refused (but a chat template
    may refuse an order of roles it does not accept)."""
    assert_clear_refusal(error, request)
    details = error.details() or ""
    assert not valid or details.startswith("messages: the chat template refused"), (
        f"in bounds, yet refused: {error.code().name} {details!r} for {request!r}")
    outcomes[error.code().name] += 1


def assert_whole_success(
    request: generation_pb2.GenerateRequest, responses: list[generation_pb2.GenerateResponse]
) -> None:
    """Every completion ended, each with its usage and within max_tokens."""
    s = request.sampling
    n = s.n if s.HasField("n") else 1
    max_tokens = s.max_tokens if s.HasField("max_tokens") else 16
    finals = {r.index: r for r in responses if r.finish_reason}
    assert sorted(finals) == list(range(n)), f"completions that ended: {sorted(finals)} of {n}"
    for i, last in finals.items():
        tokens = sum(len(r.token_ids) for r in responses if r.index == i)
        assert last.usage.completion_tokens == tokens <= max_tokens, (i, tokens, last)


def assert_stack_healthy(stack: Stack, channel: grpc.Channel, tiny_model: Path) -> None:
    """Every process alive, a plain request served, every KV block back where it belongs."""
    dead = [s.name for s in stack.services if s.process.poll() is not None]
    assert not dead, f"processes died: {dead}"
    stub = generation_pb2_grpc.GenerationStub(channel)
    responses = list(stub.Generate(greedy_request("still there?", 4), timeout=DEADLINE_S))
    assert sum(len(r.token_ids) for r in responses) == 4
    assert responses[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert_block_invariants(stack.redis_url, tiny_model, "worker-0", NUM_BLOCKS)


# ---- gRPC -----------------------------------------------------------------------------------
def test_any_generate_request_succeeds_whole_or_is_refused_clearly(
    fuzz_stack: tuple[Stack, str], channel: grpc.Channel, tiny_model: Path
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    outcomes: Counter[str] = Counter()

    @FUZZ
    @given(drawn=in_bounds_or_not(generate_request))
    def check(drawn: tuple[bool, generation_pb2.GenerateRequest]) -> None:
        valid, request = drawn
        try:
            responses = list(stub.Generate(request, timeout=DEADLINE_S))
        except grpc.RpcError as e:
            judge_refusal(e, request, valid, outcomes)
            return
        assert_whole_success(request, responses)
        outcomes["OK"] += 1

    check()
    assert outcomes["OK"] >= 10 and outcomes["INVALID_ARGUMENT"] >= 10, outcomes
    assert_stack_healthy(fuzz_stack[0], channel, tiny_model)


def test_any_embed_tokenize_or_detokenize_request_is_answered_or_refused_clearly(
    fuzz_stack: tuple[Stack, str], channel: grpc.Channel, tiny_model: Path
) -> None:
    stub = generation_pb2_grpc.GenerationStub(channel)
    outcomes: Counter[str] = Counter()
    calls = st.one_of(
        in_bounds_or_not(embed_request).map(lambda d: (stub.Embed, *d)),
        in_bounds_or_not(tokenize_request).map(lambda d: (stub.Tokenize, *d)),
        in_bounds_or_not(detokenize_request).map(lambda d: (stub.Detokenize, *d)),
    )

    @settings(FUZZ, max_examples=150)  # an embedding is a whole forward pass
    @given(call=calls)
    def check(call: tuple[Callable[..., Any], bool, Any]) -> None:
        method, valid, request = call
        try:
            method(request, timeout=DEADLINE_S)
        except grpc.RpcError as e:
            judge_refusal(e, request, valid, outcomes)
            return
        outcomes["OK"] += 1

    check()
    assert outcomes["OK"] >= 10 and outcomes["INVALID_ARGUMENT"] >= 10, outcomes
    assert_stack_healthy(fuzz_stack[0], channel, tiny_model)


def raw_methods(channel: grpc.Channel) -> dict[str, Callable[[bytes], object]]:
    """Every public method, fed bytes exactly as given (identity serializers)."""
    service = generation_pb2.DESCRIPTOR.services_by_name["Generation"]
    methods: dict[str, Callable[[bytes], object]] = {}
    identity = {"request_serializer": bytes, "response_deserializer": bytes}
    for m in service.methods:
        path = f"/{service.full_name}/{m.name}"
        if m.server_streaming:
            stream = channel.unary_stream(path, **identity)
            methods[m.name] = lambda data, call=stream: list(call(data, timeout=DEADLINE_S))
        else:
            unary = channel.unary_unary(path, **identity)
            methods[m.name] = lambda data, call=unary: call(data, timeout=DEADLINE_S)
    return methods


def test_raw_bytes_as_a_request_are_refused_clearly(
    fuzz_stack: tuple[Stack, str], channel: grpc.Channel, tiny_model: Path
) -> None:
    methods = raw_methods(channel)

    @FUZZ
    @given(name=st.sampled_from(sorted(methods)), data=st.binary(max_size=64))
    def check(name: str, data: bytes) -> None:
        try:
            methods[name](data)
        except grpc.RpcError as e:
            assert_clear_refusal(e, (name, data))

    check()
    assert_stack_healthy(fuzz_stack[0], channel, tiny_model)


# ---- HTTP -----------------------------------------------------------------------------------
# Integers stay small or extreme: a junk max_tokens of 3000 would be a valid 3000-step request.
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-10, 10), st.floats(),
                         st.sampled_from([2**31, -(2**31) - 1, 2**70]), st.text(max_size=8))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def well_formed(chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A body a careful client would send: known fields, values in bounds."""
    shared = ("temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids",
              "ignore_eos", "presence_penalty", "frequency_penalty")  # fmt: skip
    optional = {
        **{name: SAMPLING_FIELDS[name][0] for name in shared},
        "model": st.sampled_from([SERVED, ""]), "stream": st.booleans(),
        "stream_options": st.just({"include_usage": True}),
        "logprobs": st.booleans() if chat else st.integers(0, MAX_LOGPROBS),
    }  # fmt: skip
    if chat:
        message = st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)})
        required = {"messages": st.lists(message, min_size=1, max_size=3)}
    else:
        required = {"prompt": st.text(min_size=1, max_size=20) | token_ids(valid=True)}
    return st.fixed_dictionaries({**required, "max_tokens": st.integers(1, 8)}, optional=optional)


def mangled(chat: bool) -> st.SearchStrategy[dict[str, Any]]:
    """A well-formed body with one field (known or not) set to arbitrary JSON.

    max_tokens is never nulled: unset means "up to the context" on the chat route, thousands of
    decode steps for one example.
    """
    keys = ["model", "prompt", "messages", "max_tokens", "temperature", "top_p", "top_k", "n",
            "seed", "stop", "stop_token_ids", "stream", "stream_options", "logprobs",
            "top_logprobs", "echo", "best_of", "suffix", "logit_bias", "response_format",
            "tools", "tool_choice", "parallel_tool_calls"]
    edit = st.tuples(st.sampled_from(keys) | st.text(max_size=6), JSON).filter(
        lambda kv: kv != ("max_tokens", None))
    return st.tuples(well_formed(chat), edit).map(lambda b: {**b[0], b[1][0]: b[1][1]})


HTTP_CALLS = st.one_of(
    *(strategy(chat).map(lambda b, chat=chat: (ROUTES[chat], b))
      for strategy in (well_formed, mangled) for chat in (False, True)),
    st.binary(max_size=40).map(lambda raw: (ROUTES[False], raw)),
)  # fmt: skip


def post(base: str, path: str, body: dict[str, Any] | bytes) -> tuple[int, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    request = urllib.request.Request(base + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=DEADLINE_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def assert_openai_error(payload: object) -> None:
    """OpenAI's error object, with a client error's type (a 5xx would say server_error)."""
    assert isinstance(payload, dict) and set(payload) == {"error"}, payload
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] in ("invalid_request_error", "rate_limit_error"), error


def assert_http_answer(status: int, raw: bytes, body: dict[str, Any] | bytes) -> None:
    assert status == 200 or 400 <= status < 500, (status, raw[:500], body)
    if status != 200:
        assert_openai_error(json.loads(raw))
        return
    if isinstance(body, dict) and body.get("stream") is True:
        events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", raw[-200:]
        for event in map(json.loads, events[:-1]):
            if "error" in event:
                assert_openai_error(event)
        return
    answer = json.loads(raw)
    n = body.get("n") if isinstance(body, dict) else None
    expected = int(n) if isinstance(n, int | float) and not isinstance(n, bool) else 1
    assert len(answer["choices"]) == expected, answer


def test_any_openai_http_body_gets_200_or_a_4xx_in_openai_shape(
    fuzz_stack: tuple[Stack, str], channel: grpc.Channel, tiny_model: Path
) -> None:
    stack, base = fuzz_stack
    statuses: Counter[int] = Counter()

    @FUZZ
    @given(call=HTTP_CALLS)
    def check(call: tuple[str, dict[str, Any] | bytes]) -> None:
        path, body = call
        status, raw = post(base, path, body)
        assert_http_answer(status, raw, body)
        statuses[status] += 1

    check()
    assert statuses[200] >= 10 and statuses[400] >= 10, statuses
    assert_stack_healthy(stack, channel, tiny_model)
