"""pagewire's GenerateResponse messages shaped as OpenAI answers: whole bodies or SSE chunks.

An :class:`Answer` follows one request: each response is recorded under its completion's index
(and, when streaming, shaped into a chunk at once); the final body and the usage chunk are built
from what was recorded. Usage sums completions the way OpenAI does for ``n > 1``: the prompt is
counted once; cached tokens are the fewest any completion had, so they never exceed the prompt.
(With a list of prompts, each prompt is counted once: the prompt figure is their sum.)

Completions with ``echo`` put the prompt before each choice's text; with logprobs, the prompt's
tokens lead the choice's ``logprobs`` too, the first with ``null`` token_logprob and
top_logprobs (nothing predicts it), as OpenAI's legacy API and lm-eval-harness read them.

A streamed response that is text and nothing else (no logprobs, ids, echo, reasoning or tool
calls, not the first chat delta nor the last; vLLM's running usage may follow) -- the one sent
for almost every token -- is encoded from a template made once per answer, byte for byte what
the general path encodes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagewire.v1 import common_pb2, generation_pb2

FINISH_REASONS = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_ABORT: "abort",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))  # one, not one per body
_STRING = json.encoder.encode_basestring  # a JSON string as _ENCODER writes it (non-ASCII kept)


def dumps(body: dict[str, Any]) -> bytes:
    """A JSON body as every OpenAI answer and chunk is written: compact, UTF-8."""
    return _ENCODER.encode(body).encode()


def sse(body: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``body``."""
    return b"data: " + dumps(body) + b"\n\n"


class TokenTexts:
    """Token id -> its text, decoded once per id: logprobs name tokens by their text."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            self._texts[token_id] = text
        return text


@dataclass
class _Choice:
    text: list[str] = field(default_factory=list)
    logprobs: list[generation_pb2.Logprobs] = field(default_factory=list)
    prompt_logprobs: list[generation_pb2.Logprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: str | None = None
    usage: common_pb2.Usage | None = None
    text_offset: int = 0  # characters of token text before the next logprobs entry (streaming)
    echo_text: str = ""  # echo: the prompt, before the text
    echo_ids: list[int] = field(default_factory=list)
    prompt_ids: list[int] = field(default_factory=list)  # return_token_ids
    token_ids: list[int] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI's shape, in order

    def add_calls(self, deltas: Sequence[generation_pb2.ToolCallDelta]) -> None:
        for delta in deltas:
            if delta.id:
                function = {"name": delta.name, "arguments": ""}
                self.tool_calls.append({"id": delta.id, "type": "function", "function": function})
            self.tool_calls[delta.index]["function"]["arguments"] += delta.arguments


class Answer:
    def __init__(
        self, rid: str, model: str, n: int, chat: bool, logprobs: bool, tokens: TokenTexts,
        prompt_logprobs: bool = True, prompts: int = 1, echo: bool = False,
        token_ids: bool = False, prompt_tokens: Sequence[int] = (), continuous_usage: bool = False,
    ) -> None:
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.model = model
        self.created = int(time.time())
        self.chat = chat
        self.logprobs = logprobs
        self.tokens = tokens
        self.show_prompt_logprobs = prompt_logprobs  # vLLM's field, when asked for by name
        self.prompts = prompts  # choices are prompt-major: choice p * (n) + i
        self.choices = [_Choice() for _ in range(n)]
        self.echo = echo  # completions' echo: the prompt leads the text (and logprobs)
        self.token_ids = token_ids  # vLLM's return_token_ids: prompt and output ids shown
        self._prompt_ids_sent = False  # chat streams them once, at the top of a chunk
        # vLLM's continuous_usage_stats: each streamed chunk says its choice's usage so far
        self.continuous_usage = continuous_usage
        self.prompt_tokens = list(prompt_tokens)  # per prompt, for the running usage
        # A plain text chunk: head + index + field + the text as a JSON string + tail.
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = dumps({"id": self.id, "object": kind, "created": self.created, "model": model})
        self._plain_head = "data: " + head.decode()[:-1] + ',"choices":[{"index":'
        self._plain_field = ',"delta":{"content":' if chat else ',"text":'
        self._plain_tail = ('}' if chat else '') + ',"logprobs":null,"finish_reason":null}]'

    def record(self, response: generation_pb2.GenerateResponse) -> _Choice:
        """Keep a response for the whole answer (:meth:`body`)."""
        choice = self.choices[response.index]
        choice.text.append(response.text)
        choice.reasoning.append(response.reasoning_text)
        if response.tool_calls:
            choice.add_calls(response.tool_calls)
        if response.logprobs:
            choice.logprobs.extend(response.logprobs)
        if response.prompt_logprobs:
            choice.prompt_logprobs.extend(response.prompt_logprobs)
        choice.token_ids.extend(response.token_ids)
        if response.prompt_token_ids:
            choice.prompt_ids = list(response.prompt_token_ids)
        if response.prompt_token_ids and self.echo:
            choice.echo_ids = list(response.prompt_token_ids)
            choice.echo_text = response.prompt_text
        if response.finish_reason:
            choice.finish_reason = FINISH_REASONS.get(response.finish_reason, "stop")
            choice.stop_string = response.stop_string or None
            choice.usage = response.usage
        return choice

    def stream_event(self, response: generation_pb2.GenerateResponse) -> bytes:
        """Record a streamed response; return its SSE chunk (``data: {...}\\n\\n``)."""
        if self._plain(response):
            self.record(response)
            end = "}\n\n"
            if self.continuous_usage:
                # three ints, written out: 1.5 us a chunk less than the encoder; the general
                # path's bytes (tests/router/test_openai_responses.py)
                u = self.running_usage(response.index)
                end = (f',"usage":{{"prompt_tokens":{u["prompt_tokens"]},"completion_tokens":'
                       f'{u["completion_tokens"]},"total_tokens":{u["total_tokens"]}}}}}\n\n')
            return (self._plain_head + str(response.index) + self._plain_field
                    + _STRING(response.text) + self._plain_tail + end).encode()
        body = self.chunk([self.stream_choice(response)])
        if self.continuous_usage:
            body["usage"] = self.running_usage(response.index)
        return sse(body)

    @property
    def _per_prompt(self) -> int:
        """Choices per prompt (``n``): they are prompt-major."""
        return max(len(self.choices) // self.prompts, 1)

    def running_usage(self, index: int) -> dict[str, int]:
        """One choice's usage so far, as vLLM puts it on every chunk: its prompt's tokens and
        the output tokens streamed for it (the last chunk's count is the final usage's)."""
        prompt = self.prompt_tokens[index // self._per_prompt]
        completion = len(self.choices[index].token_ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion,
                "total_tokens": prompt + completion}

    def _plain(self, response: generation_pb2.GenerateResponse) -> bool:
        """Text and nothing else, mid-stream (not a chat's first delta, which names the role)."""
        if self.logprobs or self.token_ids or response.finish_reason or response.prompt_token_ids \
                or response.prompt_logprobs:
            return False
        if self.chat:
            return (bool(self.choices[response.index].text) and not response.reasoning_text
                    and not response.tool_calls)
        return not response.prompt_text

    def stream_choice(self, response: generation_pb2.GenerateResponse) -> dict[str, Any]:
        """Record a response; return it as one SSE chunk's choice object."""
        first = not self.choices[response.index].text
        choice = self.record(response)
        shaped: dict[str, Any] = {"index": response.index}
        if self.chat:
            delta = _chat_delta(response)
            shaped["delta"] = {"role": "assistant", **delta} if first else delta
        else:
            shaped["text"] = response.prompt_text + response.text
        shaped["logprobs"] = None
        if self.logprobs:
            echo = (response.prompt_token_ids if self.echo else [], response.prompt_logprobs)
            shaped["logprobs"] = self._logprobs(choice, response.logprobs, *echo)
        shaped["finish_reason"] = choice.finish_reason if response.finish_reason else None
        if response.finish_reason:
            shaped["stop_reason"] = choice.stop_string
        if response.prompt_logprobs and self.show_prompt_logprobs:
            shaped["prompt_logprobs"] = self._prompt_logprobs(response.prompt_logprobs)
        if self.token_ids:
            shaped["token_ids"] = list(response.token_ids)
            if response.prompt_token_ids and not self.chat:
                shaped["prompt_token_ids"] = list(response.prompt_token_ids)
        return shaped

    def chunk(self, choices: list[dict[str, Any]], usage: bool = False) -> dict[str, Any]:
        """An SSE chunk carrying ``choices`` (the last chunk: none, and the usage)."""
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage:
            body["usage"] = self.usage()
        if self.token_ids and self.chat and not self._prompt_ids_sent and self.choices[0].prompt_ids:
            body["prompt_token_ids"] = self.choices[0].prompt_ids
            self._prompt_ids_sent = True
        return body

    def body(self) -> dict[str, Any]:
        """The whole answer, once every completion has finished."""
        choices = []
        for index, choice in enumerate(self.choices):
            text = "".join(choice.text)
            shaped: dict[str, Any] = {"index": index}
            if self.chat:
                shaped["message"] = _chat_message(choice, text)
            else:
                shaped["text"] = choice.echo_text + text
            choice.text_offset = 0  # the whole text: offsets count from its start
            shaped["logprobs"] = None
            if self.logprobs:
                echo = (choice.echo_ids, choice.prompt_logprobs)
                shaped["logprobs"] = self._logprobs(choice, choice.logprobs, *echo)
            shaped["finish_reason"] = choice.finish_reason
            shaped["stop_reason"] = choice.stop_string
            if choice.prompt_logprobs and self.show_prompt_logprobs:
                shaped["prompt_logprobs"] = self._prompt_logprobs(choice.prompt_logprobs)
            if self.token_ids:
                shaped["token_ids"] = choice.token_ids
                if not self.chat:
                    shaped["prompt_token_ids"] = choice.prompt_ids
            choices.append(shaped)
        kind = "chat.completion" if self.chat else "text_completion"
        body = {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": self.usage(),
        }
        if self.token_ids and self.chat:
            body["prompt_token_ids"] = self.choices[0].prompt_ids if self.choices else []
        return body

    def usage(self) -> dict[str, Any]:
        usages = [c.usage for c in self.choices if c.usage is not None]
        firsts = self.choices[:: self._per_prompt]
        prompt = sum(c.usage.prompt_tokens for c in firsts if c.usage is not None)
        completion = sum(u.completion_tokens for u in usages)
        cached = min((u.cached_tokens for u in usages), default=0)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
        }

    def _logprobs(
        self,
        choice: _Choice,
        entries: Sequence[generation_pb2.Logprobs],
        echo_ids: Sequence[int] = (),
        prompt_entries: Sequence[generation_pb2.Logprobs] = (),
    ) -> Any:
        """Chat's shape, or the legacy one; with ``echo_ids``, the prompt's tokens lead, the
        first unscored (``prompt_entries`` score each prompt token after the first)."""
        if self.chat:
            return {"content": [self._chat_entry(e) for e in entries], "refusal": None}
        tokens = [self.tokens(t) for t in echo_ids] + [self.tokens(e.token_id) for e in entries]
        scored = list(prompt_entries[: max(len(echo_ids) - 1, 0)]) if echo_ids else []
        unscored: list[None] = [None] * (len(echo_ids) - len(scored))
        offsets = []
        for token in tokens:
            offsets.append(choice.text_offset)
            choice.text_offset += len(token)
        return {
            "tokens": tokens,
            "token_logprobs": [*unscored, *(e.logprob for e in [*scored, *entries])],
            "top_logprobs": [*unscored, *(self._top_dict(e) for e in [*scored, *entries])],
            "text_offset": offsets,
        }

    def _chat_entry(self, entry: generation_pb2.Logprobs) -> dict[str, Any]:
        top = [
            self._token_logprob(t, lp)
            for t, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=True)
        ]
        return {**self._token_logprob(entry.token_id, entry.logprob), "top_logprobs": top}

    def _token_logprob(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.tokens(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _top_dict(self, entry: generation_pb2.Logprobs) -> dict[str, float]:
        """Legacy completions: the top alternatives and the chosen token, by text. Two ids with
        one text (byte pieces, spacing variants) keep the likelier one's logprob."""
        top: dict[str, float] = {}
        for t, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=True):
            top.setdefault(self.tokens(t), lp)
        top.setdefault(self.tokens(entry.token_id), entry.logprob)
        return top

    def _prompt_logprobs(self, entries: Sequence[generation_pb2.Logprobs]) -> list[Any]:
        """vLLM's shape: None for the first prompt token, then {id: {logprob, rank, text}}."""
        shaped: list[Any] = [None]
        for e in entries:
            ranked = {e.token_id: (e.logprob, e.rank)}
            for rank, (t, lp) in enumerate(zip(e.top_token_ids, e.top_logprobs, strict=True), 1):
                ranked.setdefault(t, (lp, rank))
            shaped.append(
                {
                    str(t): {"logprob": lp, "rank": r, "decoded_token": self.tokens(t)}
                    for t, (lp, r) in ranked.items()
                }
            )
        return shaped


def _chat_delta(response: generation_pb2.GenerateResponse) -> dict[str, Any]:
    """A chunk's delta, as OpenAI streams it: content, vLLM's reasoning_content, and tool
    calls (a call's first delta with id, type and name; later ones its arguments only)."""
    delta: dict[str, Any] = {}
    if response.text or not (response.reasoning_text or response.tool_calls):
        delta["content"] = response.text
    if response.reasoning_text:
        delta["reasoning_content"] = response.reasoning_text
    calls = []
    for call in response.tool_calls:
        shaped: dict[str, Any] = {"index": call.index}
        if call.id:
            shaped["id"], shaped["type"] = call.id, "function"
            shaped["function"] = {"name": call.name, "arguments": call.arguments}
        else:
            shaped["function"] = {"arguments": call.arguments}
        calls.append(shaped)
    if calls:
        delta["tool_calls"] = calls
    return delta


def _chat_message(choice: _Choice, text: str) -> dict[str, Any]:
    """The whole message: content null when the model only called tools, as OpenAI answers."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    reasoning = "".join(choice.reasoning)
    if reasoning:
        message["reasoning_content"] = reasoning
    if choice.tool_calls:
        message["tool_calls"] = choice.tool_calls
        message["content"] = text or None
    return message
