"""The structured-output fields of an OpenAI / vLLM request, read into one StructuredOutput.

Served, on completions and chat alike:

- OpenAI's ``response_format``: ``{"type": "text"}`` (none), ``{"type": "json_object"}``,
  ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ...}}``
  (``strict`` is accepted either way: schemas are always enforced, in the engine's strict mode);
- vLLM's ``extra_body`` fields ``guided_json`` (a schema, as an object or JSON text),
  ``guided_regex``, ``guided_choice`` (a list of strings), ``guided_grammar`` (EBNF), and
  ``structured_outputs`` with one of ``json``, ``regex``, ``choice``, ``grammar``, ``json_object``.

At most one constraint per request. Each error names the JSON field; a spec the engine cannot
compile is refused later, by the shared path, and renamed to the field it came from
(:attr:`Constraint.field`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagewire import structured as so
from pagewire.structured import StructuredOutput
from router.errors import RequestError

# vLLM's structured_outputs keys pagewire does not serve (refused rather than ignored).
_UNSERVED = ("structural_tag", "whitespace_pattern")


@dataclass(frozen=True)
class Constraint:
    field: str  # the JSON field it came from, named in errors
    output: StructuredOutput


def read(body: dict[str, Any]) -> Constraint | None:
    """The request's one constraint, or None."""
    found = [c for c in (_response_format(body), *_guided(body), *_structured_outputs(body)) if c]
    if len(found) > 1:
        raise RequestError.invalid(
            found[1].field,
            f"only one structured-output constraint per request (also {found[0].field})",
        )
    return found[0] if found else None


def _response_format(body: dict[str, Any]) -> Constraint | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise RequestError.invalid("response_format", "must be an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("response_format", StructuredOutput(so.JSON_OBJECT, ""))
    if kind != "json_schema":
        raise RequestError.invalid(
            "response_format.type", f"must be text, json_object or json_schema, got {kind!r}"
        )
    js = fmt.get("json_schema")
    if not isinstance(js, dict):
        raise RequestError.invalid("response_format.json_schema", "must be an object")
    strict = js.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise RequestError.invalid("response_format.json_schema.strict", "must be a boolean")
    field = "response_format.json_schema.schema"
    return Constraint(field, StructuredOutput(so.JSON_SCHEMA, _schema(js.get("schema"), field)))


def _guided(body: dict[str, Any]) -> list[Constraint | None]:
    out: list[Constraint | None] = []
    if body.get("guided_json") is not None:
        spec = _schema(body["guided_json"], "guided_json")
        out.append(Constraint("guided_json", StructuredOutput(so.JSON_SCHEMA, spec)))
    for name, kind in (("guided_regex", so.REGEX), ("guided_grammar", so.GRAMMAR)):
        if body.get(name) is not None:
            out.append(Constraint(name, StructuredOutput(kind, _text(body[name], name))))
    if body.get("guided_choice") is not None:
        spec = _choices(body["guided_choice"], "guided_choice")
        out.append(Constraint("guided_choice", StructuredOutput(so.CHOICE, spec)))
    return out


def _structured_outputs(body: dict[str, Any]) -> list[Constraint | None]:
    value = body.get("structured_outputs")
    if value is None:
        return []
    if not isinstance(value, dict):
        raise RequestError.invalid("structured_outputs", "must be an object")
    for name in _UNSERVED:
        if value.get(name) is not None:
            raise RequestError.invalid(f"structured_outputs.{name}", "is not supported")
    out: list[Constraint | None] = []
    path = "structured_outputs."
    if value.get("json") is not None:
        spec = _schema(value["json"], path + "json")
        out.append(Constraint(path + "json", StructuredOutput(so.JSON_SCHEMA, spec)))
    for name, kind in (("regex", so.REGEX), ("grammar", so.GRAMMAR)):
        if value.get(name) is not None:
            spec = _text(value[name], path + name)
            out.append(Constraint(path + name, StructuredOutput(kind, spec)))
    if value.get("choice") is not None:
        spec = _choices(value["choice"], path + "choice")
        out.append(Constraint(path + "choice", StructuredOutput(so.CHOICE, spec)))
    json_object = value.get("json_object")
    if json_object is not None and not isinstance(json_object, bool):
        raise RequestError.invalid(path + "json_object", "must be a boolean")
    if json_object:
        out.append(Constraint(path + "json_object", StructuredOutput(so.JSON_OBJECT, "")))
    return out


def _schema(value: Any, field: str) -> str:
    """A JSON schema given as an object (or a boolean) or as JSON text; its JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise RequestError.invalid(field, "must be a JSON schema (an object)") from None
    if not isinstance(value, dict | bool):
        raise RequestError.invalid(field, "must be a JSON schema (an object)")
    return json.dumps(value)


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise RequestError.invalid(field, "must be a non-empty string")
    return value


def _choices(value: Any, field: str) -> str:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
        raise RequestError.invalid(field, "must be a non-empty list of non-empty strings")
    return json.dumps(value)
