"""A chat's tools and tool_choice: checked once for both fronts, each error naming the field."""

from __future__ import annotations

import json

import jsonschema
import pytest

from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.tools import check_tools, output_spec, required_schema

Mode = generation_pb2.ToolChoice.Mode
WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}


def chat(*tools: tuple[str, str], mode: int = Mode.MODE_UNSPECIFIED, function: str = "",
         parallel: bool | None = None) -> generation_pb2.Chat:
    c = generation_pb2.Chat(
        tools=[generation_pb2.Tool(name=n, parameters=p) for n, p in tools],
        tool_choice=generation_pb2.ToolChoice(mode=mode, function=function),
    )
    if parallel is not None:
        c.parallel_tool_calls = parallel
    return c


def refused(c: generation_pb2.Chat, parser: str = "hermes") -> RequestError:
    with pytest.raises(RequestError) as e:
        output_spec(check_tools(c), parser, "", "")
    return e.value


def test_auto_is_the_default_with_tools_and_parses_with_the_routers_parser():
    spec = output_spec(check_tools(chat(("get_weather", json.dumps(WEATHER)))), "hermes", "", "")
    assert spec is not None and spec.tool_parser == "hermes" and spec.parallel


def test_without_tools_or_with_none_nothing_is_parsed():
    assert output_spec(check_tools(chat()), "hermes", "", "") is None
    none = chat(("f", ""), mode=Mode.MODE_NONE)
    assert output_spec(check_tools(none), "hermes", "", "") is None
    reasoning = output_spec(check_tools(none), "", "qwen3", "x")
    assert reasoning is not None and reasoning.tool_parser is None


def test_auto_without_a_parser_is_refused_naming_tool_choice():
    error = refused(chat(("f", "")), parser="")
    assert error.field == "tool_choice" and "--tool-call-parser" in str(error)


@pytest.mark.parametrize(
    ("c", "field"),
    [
        (chat(("bad name", "")), "tools[0].function.name"),
        (chat(("", "")), "tools[0].function.name"),
        (chat(("f", ""), ("f", "")), "tools[1].function.name"),
        (chat(("f", "[1]")), "tools[0].function.parameters"),
        (chat(("f", '{"type": "string"}')), "tools[0].function.parameters"),
        (chat(("f", '{"type": 5}')), "tools[0].function.parameters"),
        (chat(("f", "{not json")), "tools[0].function.parameters"),
        (chat(("f", ""), mode=Mode.MODE_FUNCTION, function="g"), "tool_choice"),
        (chat(mode=Mode.MODE_REQUIRED), "tool_choice"),
        (chat(*[(f"f{i}", "") for i in range(129)]), "tools"),
    ],
)
def test_bad_tools_name_the_field(c: generation_pb2.Chat, field: str):
    assert refused(c).field == field


def test_required_schema_accepts_calls_to_the_tools_only():
    tools = check_tools(chat(("get_weather", json.dumps(WEATHER)), ("now", ""), parallel=False))
    schema = required_schema(tools)
    good = [{"name": "get_weather", "parameters": {"city": "Oslo"}}]
    jsonschema.validate(good, schema)
    for bad in ([], good * 2, [{"name": "other", "parameters": {}}],
                [{"name": "get_weather", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    parallel = required_schema(check_tools(chat(("get_weather", json.dumps(WEATHER)))))
    jsonschema.validate(good * 2, parallel)
