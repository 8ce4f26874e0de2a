"""Reasoning parsers: <think> blocks split from the answer, however the text is split."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from parsed_util import same_for_every_split

from router.chat_output import ChatOutput, OutputSpec
from router.reasoning_parsers import deepseek_r1, qwen3
from router.tool_parser import Parsed


def test_deepseek_r1_with_and_without_the_opening_tag():
    for text in ("<think>Plan: add.</think>\n\nIt is 4.", "Plan: add.</think>\n\nIt is 4."):
        got = same_for_every_split(lambda: deepseek_r1(""), text)
        assert (got["reasoning"], got["content"]) == ("Plan: add.", "It is 4.")


def test_deepseek_r1_unclosed_is_all_reasoning():
    got = same_for_every_split(lambda: deepseek_r1(""), "still thinking <thi")
    assert (got["reasoning"], got["content"]) == ("still thinking <thi", "")


def test_qwen3_reasoning_only_inside_a_think_block():
    got = same_for_every_split(lambda: qwen3("<|im_start|>assistant\n"), "<think>\nhm\n</think>\n\nHi")
    assert (got["reasoning"], got["content"]) == ("\nhm\n", "Hi")
    plain = same_for_every_split(lambda: qwen3("<|im_start|>assistant\n"), "Hi </think> there")
    assert (plain["reasoning"], plain["content"]) == ("", "Hi </think> there")


def test_qwen3_block_opened_by_the_template():
    got = same_for_every_split(lambda: qwen3("assistant\n<think>\n"), "hm</think>Hi")
    assert (got["reasoning"], got["content"]) == ("hm", "Hi")


def test_tool_calls_come_from_the_content_only():
    spec = OutputSpec(tool_parser="hermes", reasoning_parser="qwen3")
    text = (
        '<think>I could write <tool_call>{"name": "no", "arguments": {}}</tool_call></think>\n'
        'On it.\n<tool_call>{"name": "yes", "arguments": {"a": 1}}</tool_call>'
    )

    class Adapter:  # ChatOutput's parsing as a feed/finish parser
        def __init__(self) -> None:
            self.out = ChatOutput(spec)

        def feed(self, piece: str) -> Parsed:
            return self.out._split(piece, final=False)

        def finish(self) -> Parsed:
            return self.out._split("", final=True)

    got = same_for_every_split(Adapter, text)
    assert got["reasoning"] == 'I could write <tool_call>{"name": "no", "arguments": {}}</tool_call>'
    assert got["content"] == "On it."
    assert got["calls"] == [{"name": "yes", "arguments": '{"a": 1}'}]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["<think>", "</think>", "<th", "ink>", "</", " ", "\n", "a"]),
                max_size=16), st.booleans())
def test_any_text_splits_the_same_however_it_is_split(pieces: list[str], r1: bool) -> None:
    tail = "assistant\n<think>\n" if len(pieces) % 2 else ""
    same_for_every_split(lambda: deepseek_r1(tail) if r1 else qwen3(tail), "".join(pieces))
