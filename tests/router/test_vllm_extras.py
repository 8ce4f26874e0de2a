"""vLLM's extra request fields: each served one lands on the API's messages, each refused one is
a 400 naming it unless it has its "off" value (what vLLM does when it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest
from transformers import AutoTokenizer

from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.openai_requests import chat_call, completion_call
from router.vllm_extras import REFUSED, bad_words_token_ids, template_kwargs, truncate

USER = [{"role": "user", "content": "hi"}]


def refused(call: object, body: dict) -> RequestError:
    with pytest.raises(RequestError) as e:
        call(body)  # type: ignore[operator]
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return e.value


def test_served_extras_land_on_the_request() -> None:
    r = completion_call({"prompt": "hi", "truncate_prompt_tokens": 5, "cache_salt": "s1",
                         "return_token_ids": True, "add_special_tokens": False, "priority": 3,
                         "allowed_token_ids": [4, 2], "request_id": "mine",
                         "bad_words": ["cache", "paged memory"]}).request
    assert r.truncate_prompt_tokens == 5 and r.cache_salt == "s1" and r.return_prompt_token_ids
    assert r.HasField("add_special_tokens") and not r.add_special_tokens
    assert r.priority == -3, "vLLM runs lower priorities first; pagewire higher ones"
    assert list(r.sampling.allowed_token_ids) == [4, 2] and r.request_id == "mine"
    assert list(r.sampling.bad_words) == ["cache", "paged memory"]


def test_absent_extras_leave_the_request_as_before() -> None:
    r = chat_call({"messages": USER}).request
    assert not r.HasField("truncate_prompt_tokens") and not r.HasField("add_special_tokens")
    assert (r.cache_salt, r.return_prompt_token_ids, r.priority) == ("", False, 0)
    assert r.chat.template_kwargs == "" and not r.chat.continue_final_message


def test_every_prompt_of_a_list_carries_the_extras() -> None:
    call = completion_call({"prompt": ["a", "b"], "cache_salt": "s", "truncate_prompt_tokens": 1})
    assert [(r.cache_salt, r.truncate_prompt_tokens) for r in call.requests] == [("s", 1)] * 2


def test_chat_extras_land_on_the_chat() -> None:
    chat = chat_call({"messages": USER, "chat_template_kwargs": {"enable_thinking": False},
                      "continue_final_message": True, "add_generation_prompt": False}).request.chat
    assert json.loads(chat.template_kwargs) == {"enable_thinking": False}
    assert chat.continue_final_message and not chat.add_generation_prompt


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_fields_are_named_unless_off(name: str) -> None:
    off, _ = REFUSED[name]
    for value in off:
        chat_call({"messages": USER, name: value})  # the default: served as if absent
    bad = {"use_beam_search": True, "length_penalty": 2, "spaces_between_special_tokens": False,
           "return_tokens_as_token_ids": True, "echo": True,
           "include_reasoning": False}.get(name, ["x"])
    assert refused(chat_call, {"messages": USER, name: bad}).field == name


def test_completions_serve_echo_and_refuse_the_chat_fields() -> None:
    assert completion_call({"prompt": "hi", "echo": True}).request.echo
    for name, value in (("chat_template_kwargs", {"a": 1}), ("continue_final_message", True),
                        ("add_generation_prompt", False), ("documents", [{"text": "x"}])):
        assert refused(completion_call, {"prompt": "hi", name: value}).field == name


@pytest.mark.parametrize(("body", "field"), [
    ({"truncate_prompt_tokens": "5"}, "truncate_prompt_tokens"),
    ({"cache_salt": ""}, "cache_salt"),
    ({"cache_salt": 7}, "cache_salt"),
    ({"return_token_ids": "yes"}, "return_token_ids"),
    ({"allowed_token_ids": [1.5]}, "allowed_token_ids"),
    ({"chat_template_kwargs": "enable_thinking"}, "chat_template_kwargs"),
    ({"continue_final_message": 1}, "continue_final_message"),
    ({"length_penalty": "1"}, "length_penalty"),
])
def test_wrong_types_are_named(body: dict, field: str) -> None:
    assert refused(chat_call, {"messages": USER, **body}).field == field


def chat_with(kwargs: str) -> generation_pb2.Chat:
    return generation_pb2.Chat(template_kwargs=kwargs)


def test_template_kwargs_are_a_json_object_without_the_renderers_own_keys() -> None:
    assert template_kwargs(chat_with("")) == {}
    assert template_kwargs(chat_with('{"enable_thinking": false}')) == {"enable_thinking": False}
    for bad in ("[1]", "{", '{"messages": []}', '{"tools": null, "x": 1}',
                '{"add_generation_prompt": true}', "{" + '"k": 1, ' * 20000 + '"z": 0}'):
        with pytest.raises(RequestError) as e:
            template_kwargs(chat_with(bad))
        assert e.value.field == "chat_template_kwargs"


def test_bad_words_are_tokenized_as_written_and_after_a_space(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for word in ("cache", "  paged memory", "zq"):
        bare = tok.encode(word.lstrip(), add_special_tokens=False)
        spaced = tok.encode(" " + word.lstrip(), add_special_tokens=False)
        expected = [bare] + ([spaced] if spaced[0] != bare[0] and len(spaced) == len(bare) else [])
        assert bad_words_token_ids(tok, [word]) == expected
    assert len(bad_words_token_ids(tok, ["cache"])) == 2, "this tokenizer folds the space in"


def test_truncate_keeps_the_last_k_and_never_splits_an_image() -> None:
    assert truncate([1, 2, 3, 4], 2, images=False) == [3, 4]
    assert truncate([1, 2], 5, images=False) == [1, 2]
    assert truncate([1, 2], 5, images=True) == [1, 2]  # nothing cut: images are whole
    for keep, images in ((0, False), (1, True)):
        with pytest.raises(RequestError) as e:
            truncate([1, 2], keep, images)
        assert e.value.field == "truncate_prompt_tokens"
