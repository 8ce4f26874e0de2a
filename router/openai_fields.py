"""Typed reads of an OpenAI JSON request body: each wrong type is a 400 naming the field.

Split from ``router.openai_requests`` (which maps fields onto pagewire's messages) so that the
checks on JSON values live in one place: a body must be a UTF-8 JSON object, numbers are numbers
(not booleans), integers fit 32 bits unless said otherwise, token id lists are lists of ints.
"""

from __future__ import annotations

import json
from typing import Any

from router.errors import RequestError

INT32 = (-(1 << 31), (1 << 31) - 1)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body; a 400 naming the field whose text is not UTF-8.

    Invalid bytes are kept as lone surrogates (``surrogateescape``), as are ``\\ud800``-style
    escapes, so the JSON still parses and the walk below can say which string held them.
    """
    try:
        body = json.loads(raw.decode("utf-8", "surrogateescape"))
    except ValueError as e:
        raise RequestError.invalid("body", f"not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise RequestError.invalid("body", "must be a JSON object")
    path = _invalid_text(body, "")
    if path is not None:
        raise RequestError.invalid(path or "body", "not valid UTF-8")
    return body


def _invalid_text(value: object, path: str) -> str | None:
    """Path of the first string (value or key) that cannot be encoded as UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _invalid_text(key, path)  # a bad key: blame the object holding it
            if found is None:
                found = _invalid_text(item, f"{path}.{key}" if path else key)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _invalid_text(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


class Fields:
    """Typed reads of a JSON object's fields; a wrong type is a 400 naming the field."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body

    def get(self, name: str) -> Any:
        return self.body.get(name)

    def number(self, name: str) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError.invalid(name, f"must be a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise RequestError.invalid(name, "is out of range") from None

    def integer(self, name: str, lo: int = INT32[0], hi: int = INT32[1]) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise RequestError.invalid(name, f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise RequestError.invalid(name, f"must be in [{lo}, {hi}], got {value}")
        return value

    def boolean(self, name: str) -> bool | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, bool):
            raise RequestError.invalid(name, f"must be true or false, got {value!r}")
        return value

    def string(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, str):
            raise RequestError.invalid(name, f"must be a string, got {value!r}")
        return value

    def strings(self, name: str) -> list[str]:
        """A string or a list of strings (``stop``)."""
        value = self.body.get(name)
        if value is None:
            return []
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise RequestError.invalid(name, "must be a string or a list of strings")
        return value

    def token_ids(self, name: str, value: Any = None) -> list[int]:
        value = self.body.get(name) if value is None else value
        if not isinstance(value, list) or not all(is_int32(v) for v in value):
            raise RequestError.invalid(name, "must be a list of 32-bit integer token ids")
        return value

    def refuse(self, name: str, allowed: object = None) -> None:
        """A known field pagewire does not implement: present with another value is an error."""
        value = self.body.get(name)
        if value is not None and value != allowed and value != {} and value != []:
            raise RequestError.invalid(name, "is not supported by this server")


def is_int32(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT32[0] <= value <= INT32[1]
