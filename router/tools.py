"""A chat's tools checked, shaped for the chat template, and turned into how its output is parsed.

The one home of the tool rules, for the gRPC and HTTP fronts alike: each tool a uniquely named
function whose ``parameters`` is a JSON Schema of an object; ``tool_choice`` resolved (unset:
auto with tools, none without); a named function must be one of the tools; auto needs the
router's ``--tool-call-parser`` (as vLLM's needs ``--enable-auto-tool-choice``), since a call the
router cannot parse would reach the client as plain text. ``required`` and a named function
constrain the output with the structured-output engine (the schemas here), so no parser is needed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import jsonschema

from pagewire import structured
from pagewire.structured import StructuredOutput
from pagewire.v1 import common_pb2, generation_pb2
from router.chat_output import OutputSpec
from router.errors import RequestError
from router.tool_parsers import PARSERS as TOOL_PARSERS

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_NO_PARAMETERS = {"type": "object", "properties": {}}
Mode = generation_pb2.ToolChoice.Mode


@dataclass(frozen=True)
class ChatTools:
    """A chat's checked tools: as the template takes them, and each function's schema."""

    template_tools: list[dict[str, Any]]
    schemas: dict[str, dict[str, Any]]
    mode: int  # a ToolChoice.Mode, resolved (never MODE_UNSPECIFIED)
    function: str  # MODE_FUNCTION's name
    parallel: bool


def check_tools(chat: generation_pb2.Chat) -> ChatTools:
    """Validate the chat's tools and tool_choice (each error names the field)."""
    if len(chat.tools) > MAX_TOOLS:
        raise RequestError.invalid("tools", f"at most {MAX_TOOLS} tools per request")
    template_tools, schemas = [], {}
    for i, tool in enumerate(chat.tools):
        path = f"tools[{i}].function"
        if not _NAME.fullmatch(tool.name):
            raise RequestError.invalid(
                f"{path}.name", f"must be 1 to 64 of a-z, A-Z, 0-9, _ and -; got {tool.name!r}"
            )
        if tool.name in schemas:
            raise RequestError.invalid(f"{path}.name", f"{tool.name!r} is given twice")
        schema = _schema(tool.parameters, f"{path}.parameters")
        schemas[tool.name] = schema
        function: dict[str, Any] = {"name": tool.name, "parameters": schema}
        if tool.description:
            function["description"] = tool.description
        template_tools.append({"type": "function", "function": function})
    mode, name = chat.tool_choice.mode, chat.tool_choice.function
    if mode == Mode.MODE_UNSPECIFIED:
        mode = Mode.MODE_AUTO if chat.tools else Mode.MODE_NONE
    if mode in (Mode.MODE_REQUIRED, Mode.MODE_FUNCTION) and not chat.tools:
        raise RequestError.invalid("tool_choice", "requires tools")
    if mode == Mode.MODE_FUNCTION and name not in schemas:
        raise RequestError.invalid(
            "tool_choice", f"names function {name!r}, which is not among the tools"
        )
    parallel = chat.parallel_tool_calls if chat.HasField("parallel_tool_calls") else True
    return ChatTools(template_tools, schemas, mode, name, parallel)


def output_spec(
    tools: ChatTools, tool_parser: str, reasoning_parser: str, prompt_tail: str
) -> OutputSpec | None:
    """How the output is parsed; None when it is plain content."""
    parser: str | None = None
    if tools.mode == Mode.MODE_AUTO and tools.template_tools:
        if not tool_parser:
            raise RequestError.invalid(
                "tool_choice",
                '"auto" needs the router started with --tool-call-parser '
                f"({', '.join(TOOL_PARSERS)}); or pass tool_choice \"none\"",
            )
        parser = tool_parser
    elif tools.mode == Mode.MODE_REQUIRED:
        parser = "required"
    elif tools.mode == Mode.MODE_FUNCTION:
        parser = "named"
    spec = OutputSpec(
        tool_parser=parser,
        function=tools.function,
        parallel=tools.parallel,
        reasoning_parser=reasoning_parser or None,
        prompt_tail=prompt_tail,
    )
    return spec if spec.active else None


def required_schema(tools: ChatTools) -> dict[str, Any]:
    """tool_choice required: a JSON array of calls to the tools, at most one unless parallel."""
    items = [
        {
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [name]}, "parameters": schema},
            "required": ["name", "parameters"],
        }
        for name, schema in tools.schemas.items()
    ]
    array: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
    if not tools.parallel:
        array["maxItems"] = 1
    return array


def constraint_schema(tools: ChatTools) -> dict[str, Any] | None:
    """The JSON schema the output must follow: required's array, a named function's
    parameters, or None (unconstrained)."""
    if tools.mode == Mode.MODE_REQUIRED:
        return required_schema(tools)
    if tools.mode == Mode.MODE_FUNCTION:
        return tools.schemas[tools.function]
    return None


def constrain(
    sampling: common_pb2.SamplingParams, tools: ChatTools
) -> common_pb2.SamplingParams | None:
    """For required or a named function, a copy of ``sampling`` held to the calls' JSON schema
    (as vLLM does), to be validated and compiled like any constraint; else None."""
    schema = constraint_schema(tools)
    if schema is None:
        return None
    if sampling.HasField("structured"):
        raise RequestError.invalid(
            "tool_choice", "required or a named function cannot be combined with structured "
            "outputs (response_format, structured_outputs, guided_*)",
        )
    spec = StructuredOutput(structured.JSON_SCHEMA, json.dumps(schema, ensure_ascii=False))
    constrained = common_pb2.SamplingParams()
    constrained.CopyFrom(sampling)
    constrained.structured.CopyFrom(spec.to_proto())
    return constrained


def _schema(text: str, path: str) -> dict[str, Any]:
    if not text:
        return dict(_NO_PARAMETERS)
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise RequestError.invalid(path, f"is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise RequestError.invalid(path, "must be a JSON Schema object")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as e:
        raise RequestError.invalid(path, f"is not a valid JSON Schema: {e.message}") from None
    if schema.get("type", "object") != "object":
        raise RequestError.invalid(path, 'must describe an object ("type": "object")')
    return schema
