"""A chat completion's output text split into reasoning, content and tool calls, per response.

The router's parsers (``--reasoning-parser``, ``--tool-call-parser``) run here, on the text the
stop strings have let through, in order: reasoning first, then tool calls out of the content part
only. Each GenerateResponse leaves with ``text`` = new content, ``reasoning_text`` and
``tool_calls`` deltas, so the gRPC and HTTP fronts both get parsed output. A completion that made
calls and ended naturally finishes with FINISH_REASON_TOOL_CALLS, as OpenAI's "tool_calls"
(except a function named by tool_choice: OpenAI ends those "stop").
"""

from __future__ import annotations

from dataclasses import dataclass

from pagewire.v1 import common_pb2, generation_pb2
from router import reasoning_parsers, tool_parsers
from router.reasoning_parsers import ThinkParser
from router.tool_parser import Parsed, ToolParser


@dataclass(frozen=True)
class OutputSpec:
    """How one chat request's output is parsed (None of it: the text is all content)."""

    tool_parser: str | None = None  # a PARSERS name, "named" or "required"
    function: str = ""  # tool_choice's named function
    parallel: bool = True
    reasoning_parser: str | None = None
    prompt_tail: str = ""  # the rendered prompt's last characters (does it open <think>?)

    @property
    def active(self) -> bool:
        return self.tool_parser is not None or self.reasoning_parser is not None


class ChatOutput:
    def __init__(self, spec: OutputSpec) -> None:
        self.think: ThinkParser | None = None
        if spec.reasoning_parser is not None:
            self.think = reasoning_parsers.PARSERS[spec.reasoning_parser](spec.prompt_tail)
        self.tools: ToolParser | None = None
        self.named = spec.tool_parser == "named"  # a forced function ends "stop", as OpenAI's
        if spec.tool_parser == "named":
            self.tools = tool_parsers.NamedParser(spec.function)
        elif spec.tool_parser == "required":
            self.tools = tool_parsers.required_parser(spec.parallel)
        elif spec.tool_parser is not None:
            self.tools = tool_parsers.PARSERS[spec.tool_parser](spec.parallel)

    def apply(self, response: generation_pb2.GenerateResponse) -> None:
        """Rewrite ``response``'s text as parsed deltas (the last response flushes the parsers)."""
        final = response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
        parsed = self._split(response.text, final)
        response.text = parsed.content
        response.reasoning_text = parsed.reasoning
        for call in parsed.tool_calls:
            response.tool_calls.add(
                index=call.index, id=call.id, name=call.name, arguments=call.arguments
            )
        made_calls = self.tools is not None and self.tools.calls > 0 and not self.named
        if final and made_calls and response.finish_reason == common_pb2.FINISH_REASON_STOP:
            response.finish_reason = common_pb2.FINISH_REASON_TOOL_CALLS

    def _split(self, text: str, final: bool) -> Parsed:
        if self.think is not None:
            out = self.think.feed(text)
            if final:
                _merge(out, self.think.finish())
        else:
            out = Parsed(content=text)
        if self.tools is not None:
            calls = self.tools.feed(out.content)
            if final:
                _merge(calls, self.tools.finish())
            out = Parsed(content=calls.content, reasoning=out.reasoning, tool_calls=calls.tool_calls)
        return out


def _merge(into: Parsed, more: Parsed) -> None:
    into.content += more.content
    into.reasoning += more.reasoning
    for call in more.tool_calls:
        into.add_call_delta(call)
