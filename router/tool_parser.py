"""The machinery every tool-call parser shares: call deltas, held-back text, one open call.

A format (``router.tool_parsers``) is a small state machine over ``ToolParser._buf``; this base
holds what is common: content with its whitespace held until text follows (a call drops it), a
call read by :class:`~router.json_call.JsonCall` and announced (index, id, name) once its name is
known, argument fragments after, a block that turns out not to be a call given back as content,
and calls after the first dropped when ``parallel_tool_calls`` is false.
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
        if not self._announced:  # kept only while it may have to be given back
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
