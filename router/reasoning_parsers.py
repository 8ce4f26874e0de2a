"""Reasoning split from the answer: ``<think>...</think>`` as DeepSeek-R1 and Qwen3 write it.

Chosen by the router's ``--reasoning-parser`` (vLLM's flag of the same name):

- ``deepseek_r1``: the output opens in reasoning (R1's chat template puts ``<think>`` in the
  prompt; a ``<think>`` the model writes itself is dropped) and reasoning runs to ``</think>``;
  an output that never closes it is all reasoning.
- ``qwen3``: reasoning only when there is a think block: the output starts with ``<think>``, or
  the rendered prompt ends with it (a template that opens the block for the model). Otherwise
  (thinking switched off, the template closed an empty block) the output is all content.

Deciding from the prompt rather than from a later ``</think>`` keeps the parser streamable: what
is reasoning is known as it arrives. Pure and incremental like the tool parsers: a tag split
across deltas is held back until it is whole, so any split gives the same result. Whitespace
between ``</think>`` and the answer is dropped.
"""

from __future__ import annotations

from router.tool_parser import Parsed, held_prefix

OPEN, CLOSE = "<think>", "</think>"


class ThinkParser:
    def __init__(self, opens_in_reasoning: bool) -> None:
        self.opens_in_reasoning = opens_in_reasoning
        self._state = "start"  # start, reasoning, gap (whitespace after </think>), content
        self._buf = ""

    def feed(self, text: str, ended: bool = False) -> Parsed:
        self._buf += text
        out = Parsed()
        while self._buf and self._step(out, ended):
            pass
        return out

    def finish(self) -> Parsed:
        out = self.feed("", ended=True)
        if self._state == "reasoning":
            out.reasoning += self._buf
        elif self._state == "content":
            out.content += self._buf
        self._buf = ""
        return out

    def _step(self, out: Parsed, ended: bool) -> bool:
        if self._state == "start":
            head = self._buf.lstrip()
            if OPEN.startswith(head) and not ended:
                return False  # whitespace, or the start of the tag
            if head.startswith(OPEN):
                self._buf = head[len(OPEN):]
                self._state = "reasoning"
            else:
                self._state = "reasoning" if self.opens_in_reasoning else "content"
            return True
        if self._state == "reasoning":
            at = self._buf.find(CLOSE)
            if at < 0:
                keep = 0 if ended else held_prefix(self._buf, CLOSE)
                out.reasoning += self._buf[: len(self._buf) - keep]
                self._buf = self._buf[len(self._buf) - keep:]
                return False
            out.reasoning += self._buf[:at]
            self._buf = self._buf[at + len(CLOSE):]
            self._state = "gap"
            return True
        if self._state == "gap":
            self._buf = self._buf.lstrip()
            if not self._buf:
                return False
            self._state = "content"
        out.content += self._buf
        self._buf = ""
        return False


def deepseek_r1(prompt_tail: str) -> ThinkParser:
    return ThinkParser(opens_in_reasoning=True)


def qwen3(prompt_tail: str) -> ThinkParser:
    return ThinkParser(opens_in_reasoning=prompt_tail.rstrip().endswith(OPEN))


PARSERS = {"deepseek_r1": deepseek_r1, "qwen3": qwen3}
