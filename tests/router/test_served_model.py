"""Prompts into token ids: text, token ids, chats (with a --chat-template file), and their limits."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from pagewire.config import RouterConfig
from pagewire.structured import StructuredOutput
from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.model import ServedModel


def load(tiny_model: Path, **cfg: object) -> ServedModel:
    return ServedModel.load(RouterConfig(model=str(tiny_model), max_prompt_chars=50, **cfg))


def ids_of(model: ServedModel, request: generation_pb2.GenerateRequest) -> list[int]:
    return asyncio.run(model.prompt_ids(request, "prompt"))


def refusal(model: ServedModel, request: generation_pb2.GenerateRequest) -> RequestError:
    with pytest.raises(RequestError) as e:
        ids_of(model, request)
    return e.value


def test_text_is_tokenized_with_bos_and_ids_are_used_as_given(tiny_model: Path) -> None:
    model = load(tiny_model)
    text_ids = ids_of(model, generation_pb2.GenerateRequest(text="Hello"))
    assert (
        text_ids == model.tokenizer.encode("Hello") and text_ids[0] == model.tokenizer.bos_token_id
    )
    given = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[7, 8]))
    assert ids_of(model, given) == [7, 8]
    assert ids_of(model, generation_pb2.GenerateRequest()) == []


def test_limits_name_the_field(tiny_model: Path) -> None:
    model = load(tiny_model)
    too_long = refusal(model, generation_pb2.GenerateRequest(text="x" * 51))
    assert str(too_long) == "prompt: is 51 characters; the limit is 50"
    bad_id = generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[1, 10**6]))
    assert str(refusal(model, bad_id)).startswith("token_ids: each id must be in [0, 1024)")


def test_the_chat_template_file_overrides_the_tokenizers(tiny_model: Path, tmp_path: Path) -> None:
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    model = load(tiny_model, chat_template=str(template))
    chat = generation_pb2.Chat(messages=[generation_pb2.ChatMessage(role="user", content="Hi")])
    ids = ids_of(model, generation_pb2.GenerateRequest(chat=chat))
    assert model.tokenizer.decode(ids) == "<user>Hi"


def test_a_missing_chat_template_file_stops_the_router(tiny_model: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="--chat-template"):
        load(tiny_model, chat_template=str(tmp_path / "nope.jinja"))


def test_only_the_served_name_or_empty_is_known(tiny_model: Path) -> None:
    model = load(tiny_model, served_model_name="pw")
    model.check_name("")
    model.check_name("pw")
    with pytest.raises(RequestError) as e:
        model.check_name("gpt-4")
    assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.http_status == 404


def test_structured_specs_are_compiled_at_validation(tiny_model: Path) -> None:
    model = load(tiny_model)
    asyncio.run(model.check_structured(StructuredOutput("regex", "[a-z]{2}")))
    for _ in range(2):  # a refused spec is refused again (failures are not cached as success)
        with pytest.raises(RequestError) as e:
            asyncio.run(model.check_structured(StructuredOutput("regex", "(a")))
        assert e.value.field == "structured" and e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_context_length_is_the_flag_else_the_models_and_never_past_it(tiny_model: Path) -> None:
    assert load(tiny_model).max_model_len == 4096  # the test model's max_position_embeddings
    assert load(tiny_model, max_model_len=2048).max_model_len == 2048
    with pytest.raises(SystemExit, match="--max-model-len 8192 exceeds the model's"):
        load(tiny_model, max_model_len=8192)
