"""One tool call's JSON read as its text arrives: the function name, then its arguments' text.

Models write a call as ``{"name": "f", "arguments": {...}}`` (Hermes, Llama 3, Mistral, the
``required`` schema's items; Llama 3 says ``parameters``), or, for a function already named by
``tool_choice``, as the bare arguments object. The arguments are passed on as the model wrote
them, character for character, so streamed fragments concatenate to exactly the text a whole
answer carries (no re-serialisation that could differ in spacing or key order). A client reads
``arguments`` as JSON text, which it is whenever the model wrote valid JSON.

The scan is a small character state machine (string, escape and depth tracking): it never
re-reads text, so a long argument costs linear time however finely it is split. Fragments are
released only once the name is known, so a call is announced (id, name) before its arguments.
"""

from __future__ import annotations

import json

_ARGUMENT_KEYS = ("arguments", "parameters")
_OPEN, _CLOSE = "{[", "}]"


class JsonCall:
    """Scans one call object. ``name`` given: the object is the arguments themselves."""

    def __init__(self, name: str | None = None) -> None:
        self.bare = name is not None
        self.name = name
        self.done = False  # the object closed
        self.failed = False  # not a call object: the caller decides what the text was
        self._args: list[str] = []  # argument text not yet taken
        self._args_seen = False
        self._depth = 0
        self._in_str = self._escape = False
        self._slot = "key"  # object mode, depth 1: key, colon, value, in_value, after
        self._key = ""
        self._kind = ""  # the value being read: args, name, or skip
        self._raw: list[str] = []  # the key, or a value kept whole

    def feed(self, text: str) -> int:
        """Reads ``text`` up to the end of the object; returns how many characters it used."""
        for i, ch in enumerate(text):
            if self.done or self.failed:
                return i
            self._step(ch)
        return len(text)

    def take_arguments(self) -> str:
        """Argument text read since the last call, once the name is known ("" until then)."""
        if self.name is None:
            return ""
        text = "".join(self._args)
        self._args.clear()
        return text

    # ---- the state machine ---------------------------------------------------------------
    def _step(self, ch: str) -> None:
        if self._depth == 0:
            if ch.isspace():
                return
            if ch != "{":
                self.failed = True
                return
            self._depth = 1
            if self.bare:
                self._args.append(ch)
            return
        if self.bare:
            self._args.append(ch)
            self._track(ch)
            self.done = self._depth == 0
            return
        if self._slot == "in_value":
            self._value_char(ch)
        elif self._slot == "in_key":
            self._key_char(ch)
        else:
            self._structural(ch)

    def _structural(self, ch: str) -> None:
        """A character at depth 1, outside keys and values."""
        if ch.isspace():
            return
        if self._slot == "key" and ch == '"':
            self._slot, self._raw = "in_key", [ch]
        elif self._slot == "colon" and ch == ":":
            self._slot = "value"
        elif self._slot == "value":
            self._start_value(ch)
        elif self._slot == "after" and ch == ",":
            self._slot = "key"
        elif self._slot in ("key", "after") and ch == "}":
            self._depth = 0
            self._finish()
        else:
            self.failed = True

    def _key_char(self, ch: str) -> None:
        self._raw.append(ch)
        if self._escape:
            self._escape = False
        elif ch == "\\":
            self._escape = True
        elif ch == '"':
            try:
                self._key = json.loads("".join(self._raw))
            except ValueError:  # a raw control character: not JSON
                self.failed = True
            self._slot = "colon"

    def _start_value(self, ch: str) -> None:
        if self._key == "name" and self.name is None:
            self._kind = "name"
        elif self._key in _ARGUMENT_KEYS and not self._args_seen:
            self._kind = "args"
            self._args_seen = True
        else:
            self._kind = "skip"
        self._raw = []
        self._slot = "in_value"
        self._value_char(ch)

    def _value_char(self, ch: str) -> None:
        first = not self._raw
        scalar = not first and self._raw[0] not in _OPEN and self._raw[0] != '"'
        if scalar and (ch in ",}" or ch.isspace()):  # a number, true, false, null has ended
            self._end_value()
            self._structural(ch)
            return
        self._raw.append(ch)
        was_in_str = self._in_str
        self._track(ch)
        streams = self._kind == "args" and self._raw[0] in _OPEN
        if streams:
            self._args.append(ch)
        ended_container = self._raw[0] in _OPEN and self._depth == 1 and not first
        ended_string = self._raw[0] == '"' and was_in_str and not self._in_str
        if ended_container or ended_string:
            self._end_value()

    def _end_value(self) -> None:
        raw = "".join(self._raw)
        self._slot = "after"
        if self._kind == "name":
            try:
                name = json.loads(raw)
            except ValueError:
                name = None
            if isinstance(name, str) and name:
                self.name = name
        elif self._kind == "args" and raw[0] not in _OPEN:
            # Arguments written as a JSON string of JSON (some models do): the string's text.
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            self._args.append(value if isinstance(value, str) else raw)

    def _finish(self) -> None:
        self.done = True
        if not self._args_seen:
            self._args.append("{}")

    def _track(self, ch: str) -> None:
        """String, escape and bracket depth bookkeeping for one character."""
        if self._in_str:
            if self._escape:
                self._escape = False
            elif ch == "\\":
                self._escape = True
            elif ch == '"':
                self._in_str = False
        elif ch == '"':
            self._in_str = True
        elif ch in _OPEN:
            self._depth += 1
        elif ch in _CLOSE:
            self._depth -= 1
