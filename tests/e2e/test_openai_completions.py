"""Completions parity, with the official ``openai`` client against a live stack: a list of prompts
in one call, echo with prompt logprobs (lm-eval-harness's loglikelihood request), max_tokens 0,
logit_bias and best_of. Logprobs are checked against transformers' log-softmax on the same model
files (float32 on both sides), so they are the model's, not a second computation's.
"""

from __future__ import annotations

import json
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import torch
from e2e_util import HFReference, launch

from pagewire.launcher import Stack, free_port

PROMPTS = [
    "In the beginning there was a small server that",
    "Once upon a time",
    "The cache",
    "A router, a scheduler and a worker",
    "Tokens flow",
    "Paged memory is",
    "Every block",
    "The last prompt of eight",
]


@pytest.fixture(scope="module")
def base_url(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    http_port = free_port()
    stack: Stack = launch(
        tiny_model,
        tmp_path_factory.mktemp("logs"),
        worker_args=["--num-blocks", "512", "--block-size", "16"],
        router_args=["--http-port", str(http_port)],
    )
    try:
        yield f"http://127.0.0.1:{http_port}/v1"
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> str:
    return tiny_model.resolve().name


def log_softmax(hf: HFReference, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab]: row i is the distribution of the token after ids[: i + 1]."""
    with torch.inference_mode():
        return torch.log_softmax(hf.model(torch.tensor([ids])).logits[0].float(), dim=-1)


def test_a_list_of_eight_prompts_is_eight_calls_in_one(client: openai.OpenAI, model: str) -> None:
    together = client.completions.create(model=model, prompt=PROMPTS, max_tokens=8,
                                         temperature=0)
    assert [c.index for c in together.choices] == list(range(8))
    alone = [client.completions.create(model=model, prompt=p, max_tokens=8, temperature=0)
             for p in PROMPTS]
    assert [c.text for c in together.choices] == [a.choices[0].text for a in alone]
    assert together.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert together.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)


def test_a_list_of_token_id_prompts_with_n_numbers_choices_prompt_major(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    ids = [hf_reference.tokenizer.encode(p) for p in PROMPTS[:3]]
    kw = {"model": model, "max_tokens": 6, "temperature": 1.0, "seed": 7, "n": 2}
    together = client.completions.create(prompt=ids, **kw)
    assert [c.index for c in together.choices] == list(range(6))
    for p, prompt in enumerate(ids):
        alone = client.completions.create(prompt=prompt, **kw)
        got = [together.choices[p * 2 + i].text for i in range(2)]
        assert got == [c.text for c in alone.choices]


def test_a_streamed_list_of_prompts_adds_up_to_the_whole_answer(
    client: openai.OpenAI, model: str
) -> None:
    whole = client.completions.create(model=model, prompt=PROMPTS[:4], max_tokens=8,
                                      temperature=0)
    texts: dict[int, str] = defaultdict(str)
    for chunk in client.completions.create(model=model, prompt=PROMPTS[:4], max_tokens=8,
                                           temperature=0, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
    assert [texts[i] for i in range(4)] == [c.text for c in whole.choices]


def test_echo_with_max_tokens_zero_scores_the_prompt_like_transformers(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    prompt_ids = hf_reference.tokenizer.encode(PROMPTS[0])
    out = client.completions.create(model=model, prompt=prompt_ids, max_tokens=0, echo=True,
                                    logprobs=2, temperature=0)
    choice = out.choices[0]
    assert out.usage.completion_tokens == 0 and choice.finish_reason == "length"
    assert choice.text == hf_reference.tokenizer.decode(prompt_ids)
    lp = choice.logprobs
    assert lp.tokens == [hf_reference.tokenizer.decode([t]) for t in prompt_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    rows = log_softmax(hf_reference, prompt_ids)
    for i, token in enumerate(prompt_ids[1:]):
        assert lp.token_logprobs[i + 1] == pytest.approx(rows[i, token].item(), abs=1e-4)
        top = torch.topk(rows[i], 2)
        expected: dict[str, float] = {}  # by text: two ids may share one, the likelier counts
        for t, value in zip(top.indices.tolist(), top.values.tolist(), strict=True):
            expected.setdefault(hf_reference.tokenizer.decode([t]), value)
        expected.setdefault(hf_reference.tokenizer.decode([token]), rows[i, token].item())
        assert lp.top_logprobs[i + 1] == pytest.approx(expected, abs=1e-4)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_echo_with_one_token_is_the_prompt_then_the_greedy_token(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    """lm-eval-harness's request: echo, max_tokens 1, logprobs 1; it reads [ctxlen:-1]."""
    prompt_ids = hf_reference.tokenizer.encode(PROMPTS[1])
    out = client.completions.create(model=model, prompt=[prompt_ids], max_tokens=1, echo=True,
                                    logprobs=1, temperature=0)
    lp = out.choices[0].logprobs
    greedy = hf_reference.greedy(prompt_ids, 1, stop_at_eos=False)
    assert len(lp.tokens) == len(prompt_ids) + 1
    assert lp.tokens[-1] == hf_reference.tokenizer.decode(greedy)
    last = log_softmax(hf_reference, prompt_ids)[-1]
    assert lp.token_logprobs[-1] == pytest.approx(last[greedy[0]].item(), abs=1e-4)
    assert out.choices[0].text.startswith(hf_reference.tokenizer.decode(prompt_ids))


def test_logit_bias_forces_and_bans_tokens(
    client: openai.OpenAI, model: str, hf_reference: HFReference
) -> None:
    prompt_ids = hf_reference.tokenizer.encode(PROMPTS[2])
    free = hf_reference.greedy(prompt_ids, 4, stop_at_eos=False)
    forced = 100 if free[0] != 100 else 101
    kw = {"model": model, "prompt": prompt_ids, "max_tokens": 4, "temperature": 0}
    extra = {"ignore_eos": True}
    out = client.completions.create(logit_bias={str(forced): 100}, extra_body=extra, **kw)
    assert out.usage.completion_tokens == 4
    assert out.choices[0].text == hf_reference.tokenizer.decode([forced] * 4)
    banned = client.completions.create(logit_bias={str(free[0]): -100}, logprobs=0,
                                       extra_body=extra, **kw)
    first = banned.choices[0].logprobs.tokens[0]
    assert first != hf_reference.tokenizer.decode([free[0]])


def test_best_of_returns_the_candidate_with_the_highest_cumulative_logprob(
    client: openai.OpenAI, model: str
) -> None:
    kw = {"model": model, "prompt": PROMPTS[3], "max_tokens": 6, "temperature": 1.0, "seed": 11}
    every = client.completions.create(n=4, logprobs=0, **kw)  # the same four candidates
    scores = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(best_of=4, **kw)
    assert len(best.choices) == 1 and best.choices[0].logprobs is None
    assert best.choices[0].text == every.choices[scores.index(max(scores))].text
    two = client.completions.create(best_of=4, n=2, logprobs=0, **kw)
    ranked = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [c.text for c in two.choices] == [every.choices[i].text for i in ranked]
    assert [c.index for c in two.choices] == [0, 1]


def test_unservable_fields_are_400_naming_them(base_url: str, model: str) -> None:
    for field, value in [("suffix", "the end"), ("guided_regex", "[a-"),
                         ("guided_json", {"type": "nope"})]:
        body = json.dumps({"model": model, "prompt": "hi", field: value}).encode()
        req = urllib.request.Request(f"{base_url}/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req, timeout=30)
        assert e.value.code == 400
        assert json.loads(e.value.read())["error"]["param"] == field
