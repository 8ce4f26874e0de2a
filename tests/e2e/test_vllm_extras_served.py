"""vLLM's request extras through a live stack, over OpenAI HTTP, each checked against
transformers: the prompt the router built (shown by ``return_token_ids``) is the one
transformers builds from the same fields, and the output is transformers' greedy continuation
of it.

The router renders chats with a Qwen3-style template (``enable_thinking`` false writes an empty
think block), as ``chat_template_kwargs`` is most often used.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from e2e_util import HFReference, launch

from pagewire.launcher import Stack, free_port
from pagewire.testmodel_tokenizer import CHAT_TEMPLATE

THINK_TEMPLATE = CHAT_TEMPLATE + (
    "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
MESSAGES = [{"role": "user", "content": "Name a paged cache."}]
LONG = "A router, a scheduler and a worker share one paged cache of blocks. " * 6
BLOCK = 16


@pytest.fixture(scope="module")
def base(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    logs = tmp_path_factory.mktemp("logs")
    template = logs / "think.jinja"
    template.write_text(THINK_TEMPLATE)
    http_port = free_port()
    stack: Stack = launch(
        tiny_model, logs, worker_args=["--num-blocks", "512", "--block-size", str(BLOCK)],
        router_args=["--http-port", str(http_port), "--chat-template", str(template)],
    )
    try:
        yield f"http://127.0.0.1:{http_port}"
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def hf(hf_reference: HFReference) -> HFReference:
    return hf_reference


def post(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def chat(base: str, **body: Any) -> dict[str, Any]:
    return post(base, "/v1/chat/completions", {
        "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
        **body})


def hf_chat_ids(hf: HFReference, messages: list[dict], **kwargs: Any) -> list[int]:
    text = hf.tokenizer.apply_chat_template(messages, chat_template=THINK_TEMPLATE,
                                            tokenize=False, **kwargs)
    return hf.tokenizer.encode(text, add_special_tokens=False)


def test_chat_template_kwargs_reach_the_template(base: str, hf: HFReference) -> None:
    plain = chat(base)
    no_think = chat(base, chat_template_kwargs={"enable_thinking": False})
    expected = hf_chat_ids(hf, MESSAGES, add_generation_prompt=True, enable_thinking=False)
    assert no_think["prompt_token_ids"] == expected
    assert plain["prompt_token_ids"] == hf_chat_ids(hf, MESSAGES, add_generation_prompt=True)
    assert expected != plain["prompt_token_ids"]
    assert no_think["choices"][0]["token_ids"] == hf.greedy(expected, 8)
    assert no_think["usage"]["prompt_tokens"] == len(expected)


def test_continue_final_message_prefills_the_answer(base: str, hf: HFReference) -> None:
    messages = [*MESSAGES, {"role": "assistant", "content": "The answer is"}]
    got = chat(base, messages=messages, continue_final_message=True,
               add_generation_prompt=False)
    expected = hf_chat_ids(hf, messages, continue_final_message=True)
    assert got["prompt_token_ids"] == expected
    assert hf.tokenizer.decode(expected).endswith("The answer is")
    assert got["choices"][0]["token_ids"] == hf.greedy(expected, 8)


def test_add_special_tokens_puts_bos_before_the_templates(base: str, hf: HFReference) -> None:
    got = chat(base, add_special_tokens=True)
    text = hf.tokenizer.apply_chat_template(MESSAGES, chat_template=THINK_TEMPLATE,
                                            tokenize=False, add_generation_prompt=True)
    expected = hf.tokenizer.encode(text, add_special_tokens=True)
    assert got["prompt_token_ids"] == expected
    assert expected[:2] == [hf.tokenizer.bos_token_id] * 2
    assert got["choices"][0]["token_ids"] == hf.greedy(expected, 8)


def test_completions_add_special_tokens_false_drops_bos(base: str, hf: HFReference) -> None:
    got = post(base, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 6,
                                         "temperature": 0, "add_special_tokens": False,
                                         "return_token_ids": True})
    expected = hf.tokenizer.encode("Once upon a time", add_special_tokens=False)
    assert got["choices"][0]["prompt_token_ids"] == expected
    assert got["choices"][0]["token_ids"] == hf.greedy(expected, 6)


def test_truncate_prompt_tokens_keeps_the_last_k(base: str, hf: HFReference) -> None:
    got = post(base, "/v1/completions", {"prompt": LONG, "max_tokens": 6, "temperature": 0,
                                         "truncate_prompt_tokens": 20, "return_token_ids": True,
                                         "echo": True})
    kept = hf.tokenizer.encode(LONG)[-20:]
    choice = got["choices"][0]
    assert choice["prompt_token_ids"] == kept and got["usage"]["prompt_tokens"] == 20
    assert choice["token_ids"] == hf.greedy(kept, 6)
    assert choice["text"].startswith(hf.tokenizer.decode(kept))  # echo shows what was kept


def test_allowed_token_ids_restrict_every_draw(base: str, hf: HFReference) -> None:
    prompt = hf.tokenizer.encode("Once upon a time")
    allowed = sorted(set(hf.tokenizer.encode(" the a cache of blocks", add_special_tokens=False)))
    got = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                         "allowed_token_ids": allowed, "return_token_ids": True,
                                         "ignore_eos": True})
    ids, expected = list(prompt), []
    with torch.inference_mode():  # transformers' logits, argmax over the allowed ids only
        for _ in range(8):
            logits = hf.model(torch.tensor([ids])).logits[0, -1]
            token = allowed[int(logits[allowed].argmax())]
            expected.append(token)
            ids.append(token)
    assert got["choices"][0]["token_ids"] == expected


def test_cache_salt_shares_cached_blocks_only_within_a_salt(base: str, hf: HFReference) -> None:
    def run(**extra: Any) -> dict[str, Any]:
        return post(base, "/v1/completions", {"prompt": "Salted: " + LONG, "max_tokens": 4,
                                              "temperature": 0, **extra})

    full = len(hf.tokenizer.encode("Salted: " + LONG)) // BLOCK * BLOCK
    first = run(cache_salt="tenant-a")
    same = run(cache_salt="tenant-a")
    other = run(cache_salt="tenant-b")
    unsalted = run()
    cached = [r["usage"]["prompt_tokens_details"]["cached_tokens"] for r in
              (first, same, other, unsalted)]
    assert cached[0] == 0 and cached[1] >= full - BLOCK > 0
    assert cached[2] == 0 and cached[3] == 0  # neither another salt nor none finds them
    assert len({r["choices"][0]["text"] for r in (first, same, other, unsalted)}) == 1


def test_return_token_ids_streamed(base: str, hf: HFReference) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "return_token_ids": True,
            "stream": True}
    request = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    chunks = []
    with urllib.request.urlopen(request, timeout=120) as response:
        for line in response:
            if line.startswith(b"data: {"):
                chunks.append(json.loads(line[len(b"data: "):]))
    prompts = [c["prompt_token_ids"] for c in chunks if "prompt_token_ids" in c]
    expected = hf_chat_ids(hf, MESSAGES, add_generation_prompt=True)
    assert prompts == [expected]
    ids = [t for c in chunks for choice in c["choices"] for t in choice["token_ids"]]
    assert ids == hf.greedy(expected, 8)


def test_request_id_in_the_body_names_the_request(base: str) -> None:
    got = post(base, "/v1/completions", {"prompt": "hi", "max_tokens": 2,
                                         "request_id": "extras-rid-1"})
    assert got["id"] == "cmpl-extras-rid-1"


def test_bad_words_are_never_completed(base: str, hf: HFReference) -> None:
    prompt = hf.tokenizer.encode("Once upon a time")
    free = hf.greedy(prompt, 8, stop_at_eos=False)
    words = [hf.tokenizer.decode(free[2:4]), hf.tokenizer.decode(free[5:6])]
    runs = []  # vLLM's tokenization: as written, and after a space when that differs
    for word in words:
        bare = hf.tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = hf.tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        runs += [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])
    expected: list[int] = []
    with torch.inference_mode():
        for _ in range(8):
            logits = hf.model(torch.tensor([prompt + expected])).logits[0, -1].clone()
            for run in runs:
                if expected[len(expected) - len(run) + 1 :] == run[:-1] or len(run) == 1:
                    logits[run[-1]] = float("-inf")
            expected.append(int(logits.argmax()))
    got = post(base, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0,
                                         "bad_words": words, "ignore_eos": True,
                                         "return_token_ids": True})
    assert expected != free
    assert got["choices"][0]["token_ids"] == expected
