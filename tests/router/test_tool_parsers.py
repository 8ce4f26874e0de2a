"""Tool-call parsers: each format's calls, content around them, and split-independence."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from parsed_util import run, same_for_every_split

from router.tool_parsers import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    NamedParser,
    required_parser,
)

WEATHER = '{"city": "Paris", "days": [1, 2], "note": "a \\"quoted\\" } brace"}'


def call(name: str, arguments: str) -> dict[str, str]:
    return {"name": name, "arguments": arguments}


def test_hermes_call_with_content_before_it():
    text = f'Let me look.\n<tool_call>\n{{"name": "get_weather", "arguments": {WEATHER}}}\n</tool_call>'
    got = same_for_every_split(HermesParser, text)
    assert got == {"content": "Let me look.", "reasoning": "", "calls": [call("get_weather", WEATHER)]}
    assert json.loads(got["calls"][0]["arguments"])["note"] == 'a "quoted" } brace'


def test_hermes_parallel_calls_and_arguments_before_name():
    text = (
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>{"arguments": {"y": {"z": []}}, "name": "b"}</tool_call>\n'
    )
    got = same_for_every_split(HermesParser, text)
    assert got["calls"] == [call("a", '{"x": 1}'), call("b", '{"y": {"z": []}}')]
    assert got["content"] == ""


def test_hermes_without_parallel_keeps_the_first_call():
    text = '<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", "arguments": {}}</tool_call>'
    got = same_for_every_split(lambda: HermesParser(parallel=False), text)
    assert got["calls"] == [call("a", "{}")]


def test_hermes_plain_text_is_all_content():
    text = "No tools needed: 1 < 2 and <tool is not a tag.\n"
    assert same_for_every_split(HermesParser, text) == {
        "content": text, "reasoning": "", "calls": []
    }


def test_hermes_block_that_is_not_a_call_is_content():
    text = "before <tool_call>not json</tool_call> after"
    got = same_for_every_split(HermesParser, text)
    assert got["calls"] == []
    assert got["content"] == "before <tool_call>not json</tool_call> after"


def test_hermes_call_without_arguments_gets_an_empty_object():
    got = same_for_every_split(HermesParser, '<tool_call>{"name": "now"}</tool_call>')
    assert got["calls"] == [call("now", "{}")]


def test_hermes_string_arguments_are_unwrapped():
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert same_for_every_split(HermesParser, text)["calls"] == [call("f", '{"a": 1}')]


def test_hermes_output_cut_inside_a_call_keeps_what_arrived():
    got = run(HermesParser, ['<tool_call>{"name": "f", "arguments": {"a": "unfini'])
    assert got["calls"] == [call("f", '{"a": "unfini')]
    unnamed = run(HermesParser, ['Hi <tool_call>{"argu'])
    assert unnamed == {"content": 'Hi <tool_call>{"argu', "reasoning": "", "calls": []}


def test_hermes_announces_a_call_before_its_arguments_arrive():
    parser = HermesParser(new_id=lambda: "call_1")
    first = parser.feed('<tool_call>{"name": "f", "arguments": {"a"')
    assert [(d.index, d.id, d.name) for d in first.tool_calls] == [(0, "call_1", "f")]
    assert first.tool_calls[0].arguments == '{"a"'
    second = parser.feed(": 1}}")
    assert [(d.index, d.id, d.arguments) for d in second.tool_calls] == [(0, "", ": 1}")]


def test_llama3_json_calls_separated_by_semicolons():
    text = '<|python_tag|>{"name": "a", "parameters": {"q": "x;y"}}; {"name": "b", "parameters": {}}'
    got = same_for_every_split(Llama3JsonParser, text)
    assert got == {"content": "", "reasoning": "", "calls": [call("a", '{"q": "x;y"}'), call("b", "{}")]}


def test_llama3_json_text_output_is_content():
    text = "  The answer is {not a call}."
    assert same_for_every_split(Llama3JsonParser, text)["content"] == text


def test_mistral_array_of_calls():
    text = 'Sure. [TOOL_CALLS] [{"name": "a", "arguments": {"n": 1}}, {"name": "b", "arguments": {"m": [2]}}]'
    got = same_for_every_split(MistralParser, text)
    assert got == {"content": "Sure.", "reasoning": "", "calls": [call("a", '{"n": 1}'), call("b", '{"m": [2]}')]}


def test_mistral_v11_name_then_arguments():
    text = '[TOOL_CALLS]get_weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]now[ARGS]{}'
    got = same_for_every_split(MistralParser, text)
    assert got["calls"] == [call("get_weather", '{"city": "Oslo"}'), call("now", "{}")]


def test_named_function_output_is_its_arguments():
    got = same_for_every_split(lambda: NamedParser("get_weather"), f"  {WEATHER}\n")
    assert got == {"content": "", "reasoning": "", "calls": [call("get_weather", WEATHER)]}


@pytest.mark.parametrize("parallel", [True, False])
def test_required_output_is_an_array_of_calls(parallel):
    text = '[{"name": "a", "parameters": {"x": 1}}, {"name": "b", "parameters": {}}]'
    got = same_for_every_split(lambda: required_parser(parallel), text)
    expected = [call("a", '{"x": 1}'), call("b", "{}")]
    assert got["calls"] == (expected if parallel else expected[:1])


def test_required_output_cut_inside_an_unnamed_call_has_no_content():
    got = run(lambda: required_parser(True), ['[{"name": "a", "parameters": {}}, {"name": "b'])
    assert got == {"content": "", "reasoning": "", "calls": [call("a", "{}")]}


# Any text, built from the pieces parsers key on: no parser fails, and every split of it gives
# the answer the whole text gives.
_PIECES = ['<tool_call>', '</tool_call>', '[TOOL_CALLS]', '[ARGS]', '<|python_tag|>', '{"name": ',
           '"f"', '"arguments": ', '"parameters": ', '{', '}', '[', ']', '"', '\\', ',', ':', ';',
           " ", "\n", "x", "1", "<", "tool", '"name": "h"', '{"name": "g", "arguments": {}}']
_MAKERS = [HermesParser, Llama3JsonParser, MistralParser, lambda: required_parser(True),
           lambda: required_parser(False), lambda: HermesParser(parallel=False),
           lambda: NamedParser("f")]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=24), st.integers(0, len(_MAKERS) - 1))
def test_any_text_parses_the_same_however_it_is_split(pieces: list[str], which: int) -> None:
    make = _MAKERS[which]
    text = "".join(pieces)
    whole = run(make, [text])
    assert run(make, list(text)) == whole
    for cut in range(1, len(text)):
        assert run(make, [text[:cut], text[cut:]]) == whole
