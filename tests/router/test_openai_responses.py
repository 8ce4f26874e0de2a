"""GenerateResponse messages shaped as OpenAI answers: bodies, SSE chunks, usage, logprobs."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from pagewire.v1 import common_pb2, generation_pb2
from router.openai_responses import Answer, TokenTexts

LENGTH, STOP = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP


@pytest.fixture
def tokens(bpe_tokenizer: PreTrainedTokenizerFast) -> TokenTexts:
    return TokenTexts(bpe_tokenizer)


def ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def entry(token: int, top: list[int]) -> common_pb2.Logprobs:
    return common_pb2.Logprobs(
        token_id=token, logprob=-0.5, rank=1, top_token_ids=top, top_logprobs=[-0.5] * len(top)
    )


def last(
    index: int, text: str, completion: int, cached: int, **fields: object
) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        index=index,
        text=text,
        finish_reason=fields.pop("finish", LENGTH),
        usage=common_pb2.Usage(
            prompt_tokens=10, completion_tokens=completion, cached_tokens=cached
        ),
        **fields,
    )


def test_usage_counts_the_prompt_once_and_sums_completions(tokens: TokenTexts) -> None:
    answer = Answer("r", "m", 2, chat=False, logprobs=False, tokens=tokens)
    answer.record(generation_pb2.GenerateResponse(index=1, text="b"))
    answer.record(last(0, "a", 3, cached=16))
    answer.record(last(1, "c", 4, cached=0, finish=STOP, stop_string="\n"))
    body = answer.body()
    assert body["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 7,
        "total_tokens": 17,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    assert [
        (c["index"], c["text"], c["finish_reason"], c["stop_reason"]) for c in body["choices"]
    ] == [
        (0, "a", "length", None),
        (1, "bc", "stop", "\n"),
    ]
    assert body["id"] == "cmpl-r" and body["object"] == "text_completion" and body["model"] == "m"


def test_chat_stream_opens_each_choice_with_the_assistant_role(tokens: TokenTexts) -> None:
    answer = Answer("r", "m", 1, chat=True, logprobs=False, tokens=tokens)
    first = answer.stream_choice(generation_pb2.GenerateResponse(text="Hel"))
    second = answer.stream_choice(last(0, "lo", 2, 0))
    assert first == {
        "index": 0,
        "delta": {"role": "assistant", "content": "Hel"},
        "logprobs": None,
        "finish_reason": None,
    }
    assert second["delta"] == {"content": "lo"} and second["finish_reason"] == "length"
    chunk = answer.chunk([second])
    assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == "chatcmpl-r"
    assert "usage" not in chunk
    assert answer.chunk([], usage=True)["usage"]["completion_tokens"] == 2
    assert answer.body()["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}


def test_chat_logprobs_name_tokens_by_text_and_bytes(
    tokens: TokenTexts, bpe_tokenizer: PreTrainedTokenizerFast
) -> None:
    hello, world = ids(bpe_tokenizer, "Hello world")[:2]
    answer = Answer("r", "m", 1, chat=True, logprobs=True, tokens=tokens)
    answer.record(
        last(0, "Hello", 1, 0, token_ids=[hello], logprobs=[entry(hello, [hello, world])])
    )
    content = answer.body()["choices"][0]["logprobs"]["content"]
    text = bpe_tokenizer.decode([hello])
    assert content == [
        {
            "token": text,
            "logprob": -0.5,
            "bytes": list(text.encode()),
            "top_logprobs": [
                {"token": text, "logprob": -0.5, "bytes": list(text.encode())},
                {
                    "token": bpe_tokenizer.decode([world]),
                    "logprob": -0.5,
                    "bytes": list(bpe_tokenizer.decode([world]).encode()),
                },
            ],
        }
    ]


def test_completion_logprobs_have_offsets_into_the_text(
    tokens: TokenTexts, bpe_tokenizer: PreTrainedTokenizerFast
) -> None:
    out = ids(bpe_tokenizer, "Hello world!")
    answer = Answer("r", "m", 1, chat=False, logprobs=True, tokens=tokens)
    answer.record(
        last(0, "Hello world!", len(out), 0, token_ids=out, logprobs=[entry(t, []) for t in out])
    )
    logprobs = answer.body()["choices"][0]["logprobs"]
    pieces = [bpe_tokenizer.decode([t]) for t in out]
    assert logprobs["tokens"] == pieces
    assert "".join(pieces) == "Hello world!"
    assert logprobs["text_offset"] == [len("".join(pieces[:i])) for i in range(len(pieces))]
    assert logprobs["top_logprobs"] == [{p: -0.5} for p in pieces]  # the chosen token is always in


def test_streamed_completion_offsets_continue_across_chunks(
    tokens: TokenTexts, bpe_tokenizer: PreTrainedTokenizerFast
) -> None:
    out = ids(bpe_tokenizer, "Hello world!")
    answer = Answer("r", "m", 1, chat=False, logprobs=True, tokens=tokens)
    offsets = []
    for i, token in enumerate(out):
        response = generation_pb2.GenerateResponse(token_ids=[token], logprobs=[entry(token, [])])
        offsets += answer.stream_choice(response)["logprobs"]["text_offset"]
        assert i == 0 or offsets[-1] > offsets[-2]
    assert offsets == [len(bpe_tokenizer.decode(out[:i])) for i in range(len(out))]


def test_prompt_logprobs_follow_vllms_shape(
    tokens: TokenTexts, bpe_tokenizer: PreTrainedTokenizerFast
) -> None:
    a, b = ids(bpe_tokenizer, "Hello world")[:2]
    answer = Answer("r", "m", 1, chat=False, logprobs=False, tokens=tokens)
    prompt_entry = common_pb2.Logprobs(
        token_id=b, logprob=-3.0, rank=4, top_token_ids=[a], top_logprobs=[-0.1]
    )
    answer.record(last(0, "x", 1, 0, prompt_logprobs=[prompt_entry]))
    assert answer.body()["choices"][0]["prompt_logprobs"] == [
        None,
        {
            str(b): {"logprob": -3.0, "rank": 4, "decoded_token": bpe_tokenizer.decode([b])},
            str(a): {
                "logprob": pytest.approx(-0.1),
                "rank": 1,
                "decoded_token": bpe_tokenizer.decode([a]),
            },
        },
    ]


def test_chat_tool_calls_and_reasoning_stream_and_collect_as_openai_shapes_them(
    tokens: TokenTexts,
) -> None:
    answer = Answer("r", "m", 1, chat=True, logprobs=False, tokens=tokens)
    delta = generation_pb2.ToolCallDelta
    first = answer.stream_choice(generation_pb2.GenerateResponse(
        reasoning_text="think", tool_calls=[delta(index=0, id="call_a", name="f", arguments='{"x"')],
    ))
    assert first["delta"] == {
        "role": "assistant", "reasoning_content": "think",
        "tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                        "function": {"name": "f", "arguments": '{"x"'}}],
    }
    second = answer.stream_choice(last(0, "", 3, 0, finish=common_pb2.FINISH_REASON_TOOL_CALLS,
                                       tool_calls=[delta(index=0, arguments=": 1}")]))
    assert second["delta"] == {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}
    assert second["finish_reason"] == "tool_calls"
    assert answer.body()["choices"][0]["message"] == {
        "role": "assistant", "content": None, "reasoning_content": "think",
        "tool_calls": [{"id": "call_a", "type": "function",
                        "function": {"name": "f", "arguments": '{"x": 1}'}}],
    }


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("chat", [False, True])
def test_every_streamed_chunk_is_the_general_paths_bytes(
    tokens: TokenTexts, chat: bool, usage: bool
) -> None:
    """Plain text chunks come from a template; they must be what chunk(stream_choice()) writes,
    for any text (quotes, escapes, control and non-ASCII characters), any choice, and with
    vLLM's running usage on every chunk."""
    import json

    from router.openai_responses import sse

    delta = generation_pb2.ToolCallDelta
    stream = [
        generation_pb2.GenerateResponse(index=0, text="He"),  # a chat's first names the role
        generation_pb2.GenerateResponse(index=1, text='"q" \\ \n\t\x01 é 漢 😀'),
        generation_pb2.GenerateResponse(index=0, text=""),
        generation_pb2.GenerateResponse(index=1, text="x", reasoning_text="r"),
        generation_pb2.GenerateResponse(index=1, tool_calls=[delta(index=0, id="c", name="f")]),
        generation_pb2.GenerateResponse(index=0, text="</s>", token_ids=[5, 6]),
        last(1, "end", 7, 0),
        last(0, "stop", 8, 0, finish=STOP, stop_string="."),
    ]
    kw = {"prompt_tokens": [12], "continuous_usage": usage}
    fast = Answer("r\"id", "m/ü", 2, chat=chat, logprobs=False, tokens=tokens, **kw)
    general = Answer("r\"id", "m/ü", 2, chat=chat, logprobs=False, tokens=tokens, **kw)
    general.created = fast.created
    for response in stream:
        event = fast.stream_event(response)
        body = general.chunk([general.stream_choice(response)])
        if usage:
            body["usage"] = general.running_usage(response.index)
        assert event == sse(body)
        assert event.startswith(b"data: {") and event.endswith(b"}\n\n")
        json.loads(event[6:])
    assert fast.chunk([], usage=True) == general.chunk([], usage=True)


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_puts_each_choices_running_usage_on_every_chunk(
    tokens: TokenTexts, chat: bool
) -> None:
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's prompt and
    output tokens so far; choices are prompt-major (two prompts of 10 and 3 tokens, n = 2)."""
    import json

    answer = Answer("r", "m", 4, chat=chat, logprobs=False, tokens=tokens, prompts=2,
                    prompt_tokens=[10, 3], continuous_usage=True)
    stream = [
        generation_pb2.GenerateResponse(index=0, text="a", token_ids=[4]),
        generation_pb2.GenerateResponse(index=3, text="bc", token_ids=[5, 6]),
        generation_pb2.GenerateResponse(index=0, text="d", token_ids=[7]),
        generation_pb2.GenerateResponse(index=2, text="", token_ids=[]),
        generation_pb2.GenerateResponse(
            index=3, text="", token_ids=[8], finish_reason=STOP,
            usage=common_pb2.Usage(prompt_tokens=3, completion_tokens=3)),
    ]
    seen = []
    for response in stream:
        body = json.loads(answer.stream_event(response)[6:])
        [choice] = body["choices"]
        assert choice["index"] == response.index
        usage = body["usage"]
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        seen.append((response.index, usage["prompt_tokens"], usage["completion_tokens"]))
    assert seen == [(0, 10, 1), (3, 3, 2), (0, 10, 2), (2, 3, 0), (3, 3, 3)]


def test_without_continuous_usage_no_chunk_but_the_last_has_usage(tokens: TokenTexts) -> None:
    import json

    answer = Answer("r", "m", 1, chat=False, logprobs=False, tokens=tokens, prompt_tokens=[10])
    body = json.loads(answer.stream_event(
        generation_pb2.GenerateResponse(index=0, text="a", token_ids=[4]))[6:])
    assert "usage" not in body
