"""A chat's images into the model's prompt: token for token what transformers' processor makes.

The router's ModelImages (decode, the model's own image processor, placeholder expansion) is
held to transformers' processor on the same directory (LlavaProcessor; Qwen2.5-VL's, images
only); pixel values (and Qwen's grids) must be equal, and each image's run must sit where the
processor put its placeholders.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import vlm_cases

from pagewire.config import RouterConfig
from pagewire.images import pixels
from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.images import decode
from router.model import ServedModel
from router.openai_requests import chat_call


def load(model: Path, **cfg: object) -> ServedModel:
    return ServedModel.load(RouterConfig(model=str(model), **cfg))


def chat(turns: list[tuple[str, list[int], str]]) -> generation_pb2.GenerateRequest:
    """(role, image seeds, text) per turn."""
    messages = []
    for role, seeds, text in turns:
        parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(
            data=vlm_cases.png(vlm_cases.image(s)))) for s in seeds]
        parts.append(generation_pb2.ContentPart(text=text))
        messages.append(generation_pb2.ChatMessage(role=role, parts=parts))
    return generation_pb2.GenerateRequest(chat=generation_pb2.Chat(messages=messages))


@pytest.mark.parametrize("turns", [
    [("user", [], "no picture")],
    [("user", [1], "one")],
    [("user", [2, 3], "two, side by side")],
    [("user", [4], "first"), ("assistant", [], "a cat"), ("user", [5], "and this?")],
])
def test_prompt_and_pixels_equal_the_processors(vlm_model: Path, turns) -> None:
    model = load(vlm_model)
    ids, images = asyncio.run(model.prompt(chat(turns), "prompt"))
    proc = vlm_cases.processor(vlm_model)
    msgs = [{"role": r, "content": [*({"type": "image"} for _ in s), {"type": "text", "text": t}]}
            for r, s, t in turns]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    pics = [vlm_cases.image(s) for _, seeds, _ in turns for s in seeds]
    ref = proc(text=text, images=pics or None, return_tensors="np", add_special_tokens=False)
    assert ids == ref["input_ids"][0].tolist()
    assert len(images) == len(pics)
    assert [im.SerializeToString() for im in images] == [
        im.SerializeToString() for im in vlm_cases.image_inputs(vlm_model, ref)]
    for im in images:
        assert set(ids[im.offset : im.offset + im.length]) == {proc.image_token_id}
    if "image_grid_thw" in ref:  # Qwen2.5-VL: the grid travels; each image its own length
        assert [list(im.grid_thw) for im in images] == ref["image_grid_thw"].tolist()
        assert [im.length for im in images] == [t * h * w // 4 for t, h, w in
                                                ref["image_grid_thw"].tolist()]
    else:
        assert all(im.length == 36 and not im.grid_thw for im in images)


def test_qwen_images_of_other_sizes_get_other_placeholder_counts(qwenvl_model: Path) -> None:
    """Dynamic resolution: the processor's grid, not a fixed size, sets an image's length."""
    model = load(qwenvl_model)
    lengths = {}
    for seed in range(5):  # vlm_cases.SIZES: five sizes and aspect ratios
        _, (im,) = asyncio.run(model.prompt(chat([("user", [seed], "x")]), "prompt"))
        assert pixels(im).shape == (im.length * 4, 3 * 2 * 8 * 8)
        lengths[vlm_cases.SIZES[seed]] = im.length
    assert len(set(lengths.values())) == 5, lengths


def test_qwen_video_placeholder_in_text_is_refused(qwenvl_model: Path) -> None:
    request = chat([("user", [], "look: <|video_pad|>")])
    with pytest.raises(RequestError, match="video inputs are not supported"):
        asyncio.run(load(qwenvl_model).prompt(request, "prompt"))


def test_same_pixels_same_hash_whatever_the_file(llava_model: Path) -> None:
    import io

    model = load(llava_model)
    img = vlm_cases.image(9)
    as_bmp = io.BytesIO()
    img.save(as_bmp, format="BMP")
    a = chat([("user", [9], "x")])
    b = chat([("user", [9], "x")])
    b.chat.messages[0].parts[0].image.data = as_bmp.getvalue()
    (_, (ia,)), (_, (ib,)) = (asyncio.run(model.prompt(r, "prompt")) for r in (a, b))
    assert ia.hash == ib.hash
    c = chat([("user", [10], "x")])
    assert asyncio.run(model.prompt(c, "prompt"))[1][0].hash != ia.hash


def test_image_parts_outside_generation_are_refused(llava_model: Path) -> None:
    model = load(llava_model)
    with pytest.raises(RequestError, match=r"^messages\[0\]\.content\[0\]: images are accepted"):
        asyncio.run(model.prompt_ids(chat([("user", [1], "x")]), "prompt"))


def test_a_text_model_refuses_image_parts(tiny_model: Path) -> None:
    model = load(tiny_model)
    with pytest.raises(RequestError, match=r"^messages\[0\]\.content\[1\]: this model takes no"):
        asyncio.run(model.prompt(chat([("user", [], "x")]).__class__(chat=generation_pb2.Chat(
            messages=[generation_pb2.ChatMessage(role="user", parts=[
                generation_pb2.ContentPart(text="look"),
                generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=b"x"))])])),
            "prompt"))


def test_content_and_parts_together_are_refused(llava_model: Path) -> None:
    request = chat([("user", [], "x")])
    request.chat.messages[0].content = "also"
    with pytest.raises(RequestError, match=r"^messages\[0\]\.content: set either"):
        asyncio.run(load(llava_model).prompt(request, "prompt"))


def test_decode_names_the_part() -> None:
    with pytest.raises(RequestError, match="^p: is not an image"):
        decode(b"GIF89a-not-really", "p", 10**6)
    png = vlm_cases.png(vlm_cases.image(1))
    with pytest.raises(RequestError, match="^p: the image is truncated"):
        decode(png[: len(png) - 40], "p", 10**6)
    with pytest.raises(RequestError, match=r"^p: the image is 30x100 = 3000 pixels; the limit is 1000"):
        decode(png, "p", 1000)


def test_openai_parts_become_content_parts() -> None:
    call = chat_call({"messages": [
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text",
                                                                         "text": "brief"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:x"}},
                                     {"type": "text", "text": "hi"}]},
    ]})
    (request,) = call.requests
    system, user = request.chat.messages
    assert system.content == "be brief" and not system.parts  # text only: as before
    assert [p.WhichOneof("part") for p in user.parts] == ["image", "text"]
    assert user.parts[0].image.url == "data:x"
    with pytest.raises(RequestError, match=r"content\[0\]\.image_url\.detail"):
        chat_call({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:x", "detail": "high"}}]}]})
    with pytest.raises(RequestError, match=r"messages\[0\]\.content\[0\]: only text and image"):
        chat_call({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]})


@pytest.mark.parametrize("request_", [
    generation_pb2.GenerateRequest(text="look: <image> here"),
    generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=[0, 5, 9])),
    generation_pb2.GenerateRequest(chat=generation_pb2.Chat(messages=[
        generation_pb2.ChatMessage(role="user", content="see <image>")])),
])
def test_placeholders_without_images_are_refused(llava_model: Path, request_) -> None:
    with pytest.raises(RequestError, match="contains the image placeholder '<image>' but no image"):
        asyncio.run(load(llava_model).prompt(request_, "prompt"))
