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

from collections.abc import Callable

from router.tool_parser import ToolParser, new_call_id

__all__ = ["PARSERS", "HermesParser", "Llama3JsonParser", "MistralParser", "NamedParser",
           "required_parser"]


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
            rest = head[len(self.TAG):] if head.startswith(self.TAG) else head
            if not rest.strip() and not self._ended:
                return False  # the tag, then whitespace so far: what follows decides
            self._state = "calls" if rest.lstrip().startswith("{") else "text"
            if self._state == "calls":
                self._buf = rest
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
        if not name:  # "[TOOL_CALLS]{": not a call after all
            self._content(self.MARK + self._buf[:cut + skip])
            self._buf = self._buf[cut + skip:]
            self._state = "text"
            return True
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
