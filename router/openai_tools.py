"""OpenAI's tool fields translated into the Chat message: ``tools``, ``tool_choice``,
``parallel_tool_calls``, and the ``tool_calls`` / ``tool_call_id`` of a conversation's turns.

Only shapes and types are checked here (each error names the JSON path); what the values mean
(unique names, valid schemas, a named function among the tools, a parser for auto) is checked
by ``router.tools`` for gRPC and HTTP alike.
"""

from __future__ import annotations

import json
from typing import Any

from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.openai_fields import Fields

Mode = generation_pb2.ToolChoice.Mode
_MODES = {"none": Mode.MODE_NONE, "auto": Mode.MODE_AUTO, "required": Mode.MODE_REQUIRED}


def set_tools(chat: generation_pb2.Chat, f: Fields) -> None:
    tools = f.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise RequestError.invalid("tools", "must be a list of tools")
        for i, tool in enumerate(tools):
            chat.tools.append(_tool(tool, f"tools[{i}]"))
    _set_tool_choice(chat.tool_choice, f.get("tool_choice"))
    parallel = f.boolean("parallel_tool_calls")
    if parallel is not None:
        chat.parallel_tool_calls = parallel


def _tool(tool: Any, path: str) -> generation_pb2.Tool:
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise RequestError.invalid(f"{path}.type", 'must be "function" (the only kind of tool)')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise RequestError.invalid(f"{path}.function", "must be an object")
    name = function.get("name")
    if not isinstance(name, str):
        raise RequestError.invalid(f"{path}.function.name", "must be a string")
    description = function.get("description", "") or ""
    if not isinstance(description, str):
        raise RequestError.invalid(f"{path}.function.description", "must be a string")
    if function.get("strict"):
        raise RequestError.invalid(
            f"{path}.function.strict", "is not supported: arguments are not constrained in auto"
        )
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError.invalid(f"{path}.function.parameters", "must be a JSON Schema object")
    text = "" if parameters is None else json.dumps(parameters, ensure_ascii=False)
    return generation_pb2.Tool(name=name, description=description, parameters=text)


def _set_tool_choice(choice: generation_pb2.ToolChoice, value: Any) -> None:
    if value is None:
        return
    if isinstance(value, str):
        if value not in _MODES:
            raise RequestError.invalid(
                "tool_choice", f'must be "none", "auto", "required" or a function; got {value!r}'
            )
        choice.mode = _MODES[value]
        return
    value = value if isinstance(value, dict) else {}
    function = value.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if value.get("type") != "function" or not isinstance(name, str):
        raise RequestError.invalid(
            "tool_choice", 'must be a string or {"type": "function", "function": {"name": ...}}'
        )
    choice.mode = Mode.MODE_FUNCTION
    choice.function = name


def set_message_tools(
    message: generation_pb2.ChatMessage, body: dict[str, Any], path: str
) -> None:
    """An assistant turn's ``tool_calls``; a tool turn's ``tool_call_id`` (and ``name``)."""
    calls = body.get("tool_calls")
    if calls is not None:
        if not isinstance(calls, list):
            raise RequestError.invalid(f"{path}.tool_calls", "must be a list of tool calls")
        for j, call in enumerate(calls):
            message.tool_calls.append(_call(call, f"{path}.tool_calls[{j}]"))
    for name in ("tool_call_id", "name"):
        value = body.get(name)
        if value is not None and not isinstance(value, str):
            raise RequestError.invalid(f"{path}.{name}", "must be a string")
        setattr(message, name, value or "")
    if message.role == "tool" and not message.tool_call_id:
        raise RequestError.invalid(f"{path}.tool_call_id", "is required in a tool message")


def _call(call: Any, path: str) -> generation_pb2.ToolCall:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict):
        raise RequestError.invalid(f"{path}.function", "must be an object")
    fields = {"id": call.get("id", ""), "name": function.get("name"),
              "arguments": function.get("arguments", "{}")}
    for key, value in fields.items():
        if not isinstance(value, str):
            where = f"{path}.id" if key == "id" else f"{path}.function.{key}"
            raise RequestError.invalid(where, "must be a string")
    return generation_pb2.ToolCall(**fields)
