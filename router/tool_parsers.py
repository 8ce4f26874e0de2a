"""Tool calls parsed out of a model's output text as it streams, in the formats real models use.

Chosen by the router's ``--tool-call-parser`` as vLLM's flag of the same name chooses:

- ``hermes``: Hermes / Qwen, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks
  amid ordinary text.
- ``llama3_json``: Llama 3.x, an output that is (after an optional ``<|python_tag|>``) one or
  more ``{"name": ..., "parameters": {...}}`` objects separated by ``;``; any other output is text.
- ``mistral``: ``[TOOL_CALLS]`` followed by a JSON array of call objects, or (newer tokenizers)
  by ``name[ARGS]{arguments}``, once per call.

Two more serve ``tool_choice`` values whose output the structured-output engine constrains:
``named`` (the output is the named function's arguments object) and ``required`` (a JSON array of
``{"name", "parameters"}`` objects).

Every parser is pure and incremental: :meth:`feed` takes the next text delta and returns what
became certain (content, and call deltas: the first for a call carries id and name, later ones
argument fragments); :meth:`finish` releases the rest. Text that may be the start of a marker is
held back until the next delta decides it, so the result does not depend on where the text was
split: fed whole or a character at a time, the deltas reassemble into the same answer.

Whitespace next to tool calls is dropped (a model's newline before ``<tool_call>`` is not
content); so is whitespace ending an output that made calls. A call block that is not a call
object (bad JSON before the name) is given back as content, as vLLM does. With
``parallel_tool_calls`` false, calls after the first are dropped.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from router.json_call import JsonCall


@dataclass
class ToolCallDelta:
    index: int  # which call of this completion, from 0
    id: str = ""  # first delta of a call only
    name: str = ""  # first delta of a call only
    arguments: str = ""  # the next fragment of the arguments' JSON text


@dataclass
class Parsed:
    """What one delta of output text turned out to be."""

    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def add_call_delta(self, delta: ToolCallDelta) -> None:
        last = self.tool_calls[-1] if self.tool_calls else None
        if last is not None and last.index == delta.index and not delta.id:
            last.arguments += delta.arguments  # one fragment per call per delta
        elif delta.id or delta.arguments:
            self.tool_calls.append(delta)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolParser:
    """The shared machinery: content with held whitespace, calls through :class:`JsonCall`.

    A subclass's :meth:`_step` consumes from ``self._buf`` and returns False when it needs more
    text to decide.
    """

    gives_back = True  # the text of a block that is not a call is content

    def __init__(self, parallel: bool = True, new_id: Callable[[], str] = new_call_id) -> None:
        self.parallel = parallel
        self.new_id = new_id
        self.calls = 0  # calls announced
        self._buf = ""
        self._ws = ""  # whitespace held: dropped if a call follows
        self._call: JsonCall | None = None
        self._call_text = ""  # the call's raw text, marker included (given back if no call)
        self._ws_before = ""  # whitespace dropped for the call (given back with it)
        self._announced = False
        self._out = Parsed()
        self._ended = False

    def feed(self, text: str) -> Parsed:
        self._buf += text
        while self._buf and self._step():
            pass
        out, self._out = self._out, Parsed()
        return out

    def finish(self) -> Parsed:
        """End of output: text held back is content after all (an unfinished call stays as is)."""
        self._ended = True
        out = self.feed("")
        rest, self._buf = self._buf, ""
        if self._call is not None and not self._announced:
            self._call = None
            self._give_back(out)
        if rest.strip():
            self._content(rest, out)
        if not self.calls:
            out.content += self._ws
        self._ws = ""
        return out

    def _step(self) -> bool:
        raise NotImplementedError

    # ---- helpers for subclasses -----------------------------------------------------------
    def _content(self, text: str, out: Parsed | None = None) -> None:
        """Content, with a whitespace tail held until text follows (or a call drops it)."""
        out = out or self._out
        body = text.rstrip()
        if body:
            out.content += self._ws + body
            self._ws = text[len(body):]
        else:
            self._ws += text

    def _text_until(self, marker: str) -> bool:
        """Content up to ``marker`` (consumed; True), or all that cannot start it (False)."""
        at = self._buf.find(marker)
        if at >= 0:
            self._content(self._buf[:at])
            self._buf = self._buf[at + len(marker):]
            return True
        keep = 0 if self._ended else held_prefix(self._buf, marker)
        self._content(self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep:]
        return False

    def _start_call(self, name: str | None = None, marker: str = "") -> None:
        self._ws_before, self._ws = self._ws, ""
        self._call = JsonCall(name)
        self._call_text = marker
        self._announced = False

    def _read_call(self) -> str:
        """Feed the open call; returns "done", "failed" (no call: give back ``_call_text``)
        or "more". A call that breaks after its name was announced ends there, as done."""
        call = self._call
        assert call is not None
        used = call.feed(self._buf)
        self._call_text += self._buf[:used]
        self._buf = self._buf[used:]
        if call.name is not None and not self._announced:
            self._announced = True
            if self.parallel or self.calls == 0:
                self._out.add_call_delta(ToolCallDelta(self.calls, self.new_id(), call.name))
            self.calls += 1
        fragment = call.take_arguments()
        if fragment and (self.parallel or self.calls == 1):
            self._out.add_call_delta(ToolCallDelta(self.calls - 1, arguments=fragment))
        if not (call.failed or call.done):
            return "more"
        self._call = None
        return "done" if self._announced else "failed"

    def _give_back(self, out: Parsed | None = None) -> None:
        """The text of a call that was not one, as content (with the whitespace before it).
        Constrained output (required, named) is calls only: a cut-off one is dropped."""
        if not self.gives_back:
            return
        self._ws = self._ws_before + self._ws
        self._content(self._call_text, out)

    def _skip_space(self, also: str = "") -> bool:
        """Drop leading whitespace (and ``also`` characters); True if anything is left."""
        self._buf = self._buf.lstrip(" \t\r\n" + also)
        return bool(self._buf)


class HermesParser(ToolParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, parallel: bool = True, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(parallel, new_id)
        self._state = "text"  # text, call, close

    def _step(self) -> bool:
        if self._state == "text":
            if not self._text_until(self.OPEN):
                return False
            self._start_call(marker=self.OPEN)
            self._state = "call"
            return True
        if self._state == "call":
            state = self._read_call()
            if state == "failed":  # not a call: the block's text was content
                self._give_back()
                self._state = "text"
            elif state == "done":
                self._state = "close"
            return state != "more"
        if not self._skip_space():
            return False
        if self._buf.startswith(self.CLOSE):
            self._buf = self._buf[len(self.CLOSE):]
        elif self.CLOSE.startswith(self._buf) and not self._ended:
            return False  # maybe the closing tag, split
        self._state = "text"  # closed, or the model left the tag out
        return True


class Llama3JsonParser(ToolParser):
    TAG = "<|python_tag|>"

    def __init__(self, parallel: bool = True, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(parallel, new_id)
        self._state = "start"  # start, calls, call, text

    def _step(self) -> bool:
        if self._state == "text":
            self._content(self._buf)
            self._buf = ""
            return False
        if self._state == "start":
            head = self._buf.lstrip()
            if self.TAG.startswith(head) and not self._ended:
                return False  # whitespace, or the start of the tag
            if head.startswith(self.TAG):
                head = head[len(self.TAG):]
            self._state = "calls" if head.lstrip().startswith("{") or not head.strip() else "text"
            if self._state == "calls":
                self._buf = head
            return True
        if self._state == "calls":
            if not self._skip_space(";"):
                return False
            if self._buf[0] != "{":
                self._state = "text"
                return True
            self._start_call()
            self._state = "call"
        state = self._read_call()
        if state == "failed":
            self._give_back()
            self._state = "text"
        elif state == "done":
            self._state = "calls"
        return state != "more"


class MistralParser(ToolParser):
    """``[TOOL_CALLS]`` then a JSON array of calls, or ``name[ARGS]{...}`` (v11 tokenizers)."""

    MARK, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self, parallel: bool = True, new_id: Callable[[], str] = new_call_id,
                 array_only: bool = False) -> None:
        super().__init__(parallel, new_id)
        self._state = "open" if array_only else "text"  # text, open, array, call, name
        self._call_name_given = False

    def _step(self) -> bool:
        if self._state == "text":
            if not self._text_until(self.MARK):
                return False
            self._state = "open"
            return True
        if self._state == "open":
            if not self._skip_space():
                return False
            self._state = "array" if self._buf[0] == "[" else "name"
            if self._state == "array":
                self._buf = self._buf[1:]
            return True
        if self._state == "array":
            if not self._skip_space(","):
                return False
            if self._buf[0] == "]":
                self._buf = self._buf[1:]
                self._state = "text"
                return True
            self._start_call()
            self._call_name_given = False
            self._state = "call"
        if self._state == "name":
            return self._read_name()
        state = self._read_call()
        if state == "failed":
            self._give_back()
            self._state = "text"
        elif state == "done":
            self._state = "text" if self._call_name_given else "array"
        return state != "more"

    def _read_name(self) -> bool:
        """v11: the function's name up to ``[ARGS]`` (or straight to its ``{``)."""
        end = self._buf.find(self.ARGS)
        brace = self._buf.find("{")
        if end < 0 and brace < 0:
            return False
        cut, skip = (end, len(self.ARGS)) if end >= 0 and (brace < 0 or end < brace) else (brace, 0)
        name = self._buf[:cut].strip()
        self._buf = self._buf[cut + skip:]
        self._start_call(name)
        self._call_name_given = True
        self._state = "call"
        return True


class NamedParser(ToolParser):
    """tool_choice naming a function: the whole output is that function's arguments."""

    gives_back = False

    def __init__(self, name: str, new_id: Callable[[], str] = new_call_id) -> None:
        super().__init__(True, new_id)
        self._start_call(name)

    def _step(self) -> bool:
        if self._call is None:
            self._buf = ""  # trailing text after the object (whitespace) is not content
            return False
        return self._read_call() != "more"


def required_parser(parallel: bool, new_id: Callable[[], str] = new_call_id) -> ToolParser:
    """tool_choice required: the output is a JSON array of {"name", "parameters"} objects."""
    parser = MistralParser(parallel, new_id, array_only=True)
    parser.gives_back = False
    return parser


PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
}
