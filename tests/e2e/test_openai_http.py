"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client against a live stack.

Outputs are checked against transformers on the same model files (greedy), so the HTTP layer is
shown to be a translation of the same generation path, not a second one.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from e2e_util import HFReference, assert_block_invariants, launch

from pagewire.launcher import Stack, free_port

API_KEY = "sk-pagewire-test"
PROMPT = "In the beginning there was a small server that"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime number."},
]


@pytest.fixture(scope="module")
def http_stack(
    tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Stack, str]]:
    http_port = free_port()
    stack = launch(
        tiny_model,
        tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", "512", "--block-size", "16"],
        router_args=["--http-port", str(http_port), "--api-key", API_KEY],
    )
    try:
        yield stack, f"http://127.0.0.1:{http_port}/v1"
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(http_stack: tuple[Stack, str]) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=http_stack[1], api_key=API_KEY, max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> str:
    return tiny_model.resolve().name


def expected_text(hf: HFReference, prompt_ids: list[int], max_tokens: int) -> tuple[str, list[int]]:
    """transformers' greedy text (the EOS that ends it has no text) and ids."""
    ids = hf.greedy(prompt_ids, max_tokens)
    eos = set(hf.model.generation_config.eos_token_id or [])
    text_ids = ids[:-1] if ids and ids[-1] in eos and len(ids) < max_tokens else ids
    return hf.tokenizer.decode(text_ids, skip_special_tokens=True), ids


def chat_prompt_ids(hf: HFReference) -> list[int]:
    encoded = hf.tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def test_models_lists_and_retrieves_the_served_model(client: openai.OpenAI, model: str) -> None:
    assert [m.id for m in client.models.list()] == [model]
    assert client.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_a_missing_or_wrong_api_key_is_401(http_stack: tuple[Stack, str], model: str) -> None:
    with openai.OpenAI(base_url=http_stack[1], api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError):
            wrong.completions.create(model=model, prompt="hi", max_tokens=1)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()


def test_completion_is_transformers_greedy_text_with_usage(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    prompt_ids = hf_reference.tokenizer.encode(PROMPT)
    text, ids = expected_text(hf_reference, prompt_ids, 16)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0)
    assert out.object == "text_completion" and out.model == model
    [choice] = out.choices
    assert choice.text == text and choice.index == 0
    assert choice.finish_reason == ("length" if len(ids) == 16 else "stop")
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(ids)
    assert out.usage.total_tokens == len(prompt_ids) + len(ids)
    by_ids = client.completions.create(model=model, prompt=prompt_ids, max_tokens=16, temperature=0)
    assert by_ids.choices[0].text == text


def test_streamed_completion_adds_up_to_the_whole_one_and_ends_with_usage(
    client: openai.OpenAI, model: str
) -> None:
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text_chunks = [c for c in chunks if c.choices]
    assert len(text_chunks) > 1, "a stream should arrive in pieces"
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("chat", [False, True])
def test_continuous_usage_stats_count_every_chunks_tokens(
    client: openai.OpenAI, model: str, chat: bool, hf_reference: HFReference
) -> None:
    """vLLM's continuous_usage_stats: each chunk's usage is its prompt and the output tokens
    streamed so far, rising to the final usage's count (a benchmark client counts tokens by it)."""
    extra = {"stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    args = {"messages": MESSAGES} if chat else {"prompt": PROMPT}
    create = client.chat.completions.create if chat else client.completions.create
    chunks = list(create(model=model, max_tokens=20, temperature=0, stream=True,
                         extra_body={"ignore_eos": True}, **args, **extra))
    prompt = len(chat_prompt_ids(hf_reference) if chat else hf_reference.tokenizer.encode(PROMPT))
    with_choices = [c for c in chunks if c.choices]
    assert len(with_choices) > 1 and all(c.usage is not None for c in with_choices)
    counts = [c.usage.completion_tokens for c in with_choices]
    assert counts == sorted(counts) and counts[-1] == 20
    assert {(c.usage.prompt_tokens, c.usage.total_tokens - c.usage.completion_tokens)
            for c in with_choices} == {(prompt, prompt)}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_chat_completion_is_transformers_greedy_on_the_templated_prompt(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    prompt_ids = chat_prompt_ids(hf_reference)
    text, ids = expected_text(hf_reference, prompt_ids, 12)
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == text
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert out.usage.completion_tokens == len(ids)


def test_streamed_chat_opens_with_the_role_and_adds_up(client: openai.OpenAI, model: str) -> None:
    whole = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=12, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model=model, messages=MESSAGES, max_tokens=12, temperature=0, stream=True
        )
    )
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks)
        == whole.choices[0].message.content
    )
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_completions_come_indexed_each_reproducible_from_its_seed(
    client: openai.OpenAI, model: str
) -> None:
    kwargs = {"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 1.0}
    out = client.completions.create(n=2, seed=7, **kwargs)
    singles = [client.completions.create(seed=seed, **kwargs) for seed in (7, 8)]
    by_index = {c.index: c.text for c in out.choices}
    assert sorted(by_index) == [0, 1]
    assert [by_index[0], by_index[1]] == [s.choices[0].text for s in singles]
    assert by_index[0] != by_index[1]
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens  # counted once
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)


def test_streamed_n_completions_interleave_by_index(client: openai.OpenAI, model: str) -> None:
    chunks = list(
        client.completions.create(
            model=model, prompt=PROMPT, max_tokens=10, temperature=1.0, n=3, seed=1, stream=True
        )
    )
    finished = [c.choices[0].index for c in chunks if c.choices[0].finish_reason is not None]
    assert sorted(finished) == [0, 1, 2]


def test_closing_a_stream_aborts_the_request(
    client: openai.OpenAI, model: str, http_stack: tuple[Stack, str], tiny_model: Path
) -> None:
    stream = client.completions.create(
        model=model,
        prompt=PROMPT,
        max_tokens=3000,
        temperature=1.0,
        seed=3,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 3:
            break
    stream.close()
    # ~3000 tokens were left to generate: only an abort frees its blocks this soon.
    assert_block_invariants(http_stack[0].redis_url, tiny_model, "worker-0", 512, timeout=3.0)


def test_completion_logprobs_are_per_token_with_the_chosen_token_on_top(
    client: openai.OpenAI, model: str
) -> None:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2
    )
    lp = out.choices[0].logprobs
    assert (
        len(lp.tokens)
        == len(lp.token_logprobs)
        == len(lp.top_logprobs)
        == out.usage.completion_tokens
    )
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and len(top) <= 3 and top[token] == pytest.approx(logprob)
        assert logprob == pytest.approx(
            max(top.values())
        )  # greedy: the chosen token is the likeliest
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_carry_top_alternatives(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )


def test_repeated_prompt_reports_cached_tokens(client: openai.OpenAI, model: str) -> None:
    prompt = "A shared system prompt that is long enough to fill several KV blocks. " * 4
    first = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    second = client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= 16 and cached % 16 == 0 and cached < second.usage.prompt_tokens


def test_embeddings_are_transformers_mean_pooled_final_hidden_states(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    texts = ["Hello world", "Café, naïve, 東京 and 🙂"]
    out = client.embeddings.create(model=model, input=texts)  # the client asks for base64
    as_floats = client.embeddings.create(model=model, input=texts, encoding_format="float")
    assert [d.index for d in out.data] == [0, 1]
    total = 0
    for text, got, got_floats in zip(texts, out.data, as_floats.data, strict=True):
        ids = hf_reference.tokenizer.encode(text)
        total += len(ids)
        with torch.inference_mode():
            hidden = hf_reference.model.model(torch.tensor([ids])).last_hidden_state[0]
        expected = torch.nn.functional.normalize(hidden.mean(dim=0), dim=0)
        torch.testing.assert_close(torch.tensor(got.embedding), expected, atol=1e-4, rtol=1e-3)
        assert got_floats.embedding == pytest.approx(got.embedding, abs=1e-6)
    assert out.usage.prompt_tokens == total


def test_unknown_model_is_404_and_a_bad_field_is_400_naming_it(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="hi", max_tokens=1)
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="", messages=MESSAGES, temperature=-1)
    assert bad.value.param == "temperature"
