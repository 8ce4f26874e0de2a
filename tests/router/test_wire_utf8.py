"""Locating the string field that is not UTF-8 in a serialized message, for an error naming it."""

from __future__ import annotations

import pytest
from google.protobuf.message import DecodeError

from pagewire.v1 import common_pb2, generation_pb2
from router.wire_utf8 import find_invalid_utf8

MARK = "\u00a7MARK\u00a7"  # a placeholder whose UTF-8 bytes are swapped for invalid ones
BAD = b"\xff\xfe\xfd\xfc\xfb\xfa\xf9\xf8"  # same length as MARK's 8 bytes


def corrupt(message: generation_pb2.GenerateRequest) -> bytes:
    data = message.SerializeToString()
    assert len(MARK.encode()) == len(BAD) and data.count(MARK.encode()) == 1
    return data.replace(MARK.encode(), BAD)


@pytest.mark.parametrize(
    ("message", "path"),
    [
        (generation_pb2.GenerateRequest(text=MARK), "text"),
        (generation_pb2.GenerateRequest(model=MARK, text="ok"), "model"),
        (
            generation_pb2.GenerateRequest(
                text="ok", sampling=common_pb2.SamplingParams(max_tokens=3, stop=["a", MARK])
            ),
            "sampling.stop[1]",
        ),
        (
            generation_pb2.GenerateRequest(
                chat=generation_pb2.Chat(
                    messages=[
                        generation_pb2.ChatMessage(role="user", content="fine"),
                        generation_pb2.ChatMessage(role="user", content=MARK),
                    ]
                )
            ),
            "chat.messages[1].content",
        ),
    ],
)
def test_the_first_invalid_string_is_named_by_its_path(
    message: generation_pb2.GenerateRequest, path: str
) -> None:
    data = corrupt(message)
    with pytest.raises(DecodeError):  # what protobuf does, and why this module exists
        generation_pb2.GenerateRequest.FromString(data)
    assert find_invalid_utf8(generation_pb2.GenerateRequest.DESCRIPTOR, data) == path


def test_a_valid_message_has_no_invalid_field() -> None:
    message = generation_pb2.GenerateRequest(text="Café 東京 🙂", request_id="x")
    data = message.SerializeToString()
    assert find_invalid_utf8(generation_pb2.GenerateRequest.DESCRIPTOR, data) is None


def test_a_truncated_message_is_not_blamed_on_a_field() -> None:
    data = generation_pb2.GenerateRequest(text="hello").SerializeToString()[:-2]
    assert find_invalid_utf8(generation_pb2.GenerateRequest.DESCRIPTOR, data) is None
