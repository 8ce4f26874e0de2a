"""One completion's token events turned into client responses: text, stop strings, logprobs, usage.

Token ids and their logprobs go out as soon as an event brings them; text lags behind when the
detokenizer waits for a whole character or the stop-string matcher for a possible stop. So a
message's ``logprobs`` are always aligned with its ``token_ids``, not with its ``text``.

Events carry their index in the output, so a replay after a scheduler restart is trimmed to
what was not forwarded yet: nothing is lost or repeated.

Stop strings follow vLLM: they are looked for only once the output is longer than ``min_tokens``
tokens (text released before that is passed through unsearched), and the token that completes a
match is the last one counted; ids after it in the same event are dropped.

A chat with a reasoning or tool-call parser has its text split (``router.chat_output``) into
content, reasoning and call deltas before it leaves.

With echo, the first message carries the prompt (ids and text). A prompt-only completion (echo
with max_tokens 0, run downstream as max_tokens 1) drops its one generated token: no ids, no
text, no logprobs, completion_tokens 0, finish_reason LENGTH.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2, generation_pb2, scheduler_pb2
from router.chat_output import ChatOutput, OutputSpec
from router.detokenizer import IncrementalDetokenizer
from router.stop_strings import StopStringMatcher

UNFINISHED = common_pb2.FINISH_REASON_UNSPECIFIED
STOP = common_pb2.FINISH_REASON_STOP
LENGTH = common_pb2.FINISH_REASON_LENGTH


class CompletionStream:
    def __init__(
        self,
        rid: str,
        index: int,
        prompt: list[int],
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
        echo_text: str | None = None,
        prompt_only: bool = False,
        output: OutputSpec | None = None,
        send_prompt_ids: bool = False,
    ) -> None:
        self.rid = rid
        self.index = index
        self.prompt = prompt
        self.prompt_tokens = len(prompt)
        self.echo_text = echo_text  # None: no echo, or already sent
        self.prompt_only = prompt_only
        self.send_prompt_ids = send_prompt_ids  # return_prompt_token_ids, until sent
        self.min_tokens = params.min_tokens
        self.detok = IncrementalDetokenizer(tokenizer, prompt, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        self.completion = 0  # output tokens forwarded
        self.done = False  # the client has had this completion's last message
        self.scheduler_done = False  # the scheduler finished it: nothing to abort downstream
        self.finish_reason = UNFINISHED
        self.cached_tokens = 0
        self._prompt_logprobs_sent = False
        self._text: list[str] = []
        self.output = ChatOutput(output) if output is not None else None

    def on_event(self, event: scheduler_pb2.TokenEvent) -> generation_pb2.GenerateResponse | None:
        """The response this event makes, or None if it adds nothing the client can see yet."""
        assert not self.done, "event after the completion ended"
        finished = event.finish_reason != UNFINISHED
        self.scheduler_done = self.scheduler_done or finished
        # Told on the first event and the last: a stop string may end the completion between.
        self.cached_tokens = event.cached_tokens or self.cached_tokens
        skip = max(self.completion - event.index, 0)
        ids = [] if self.prompt_only else list(event.token_ids[skip:])
        resp = generation_pb2.GenerateResponse(request_id=self.rid, index=self.index)
        if self.echo_text is not None:
            resp.prompt_token_ids.extend(self.prompt)
            resp.prompt_text, self.echo_text = self.echo_text, None
        elif self.send_prompt_ids:
            resp.prompt_token_ids.extend(self.prompt)
        self.send_prompt_ids = False
        if event.prompt_logprobs and not self._prompt_logprobs_sent:
            resp.prompt_logprobs.extend(event.prompt_logprobs)
            self._prompt_logprobs_sent = True
        # The EOS / stop token that ended generation is an output id, but its text is not output.
        silent_last = finished and event.finish_reason == STOP
        stop_string = None
        for i, token in enumerate(ids):
            self.completion += 1
            resp.token_ids.append(token)
            if skip + i < len(event.logprobs):  # a replay after a restart has none
                resp.logprobs.append(event.logprobs[skip + i])
            if silent_last and i == len(ids) - 1:
                break
            stop_string = self._release(self.detok.add([token]))
            if stop_string is not None:
                break
        if stop_string is None and finished:
            stop_string = self._release(self.detok.finish())
            if stop_string is None:
                self._text.append(self.stops.flush())
        resp.text = "".join(self._text)
        self._text.clear()
        if stop_string is None and not finished:
            if self.output is not None:
                self.output.apply(resp)
            has_news = (resp.text or resp.token_ids or resp.prompt_logprobs or resp.prompt_token_ids
                        or resp.reasoning_text or resp.tool_calls)
            return resp if has_news else None
        self.done = True
        resp.finish_reason = STOP if stop_string is not None else event.finish_reason
        if self.prompt_only:
            resp.finish_reason = LENGTH
        if self.output is not None:
            self.output.apply(resp)  # the last message: may become TOOL_CALLS
        self.finish_reason = resp.finish_reason
        resp.stop_string = stop_string or ""
        resp.usage.CopyFrom(
            common_pb2.Usage(
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion,
                cached_tokens=self.cached_tokens,
            )
        )
        return resp

    def _release(self, delta: str) -> str | None:
        """Queue ``delta`` for the client through the stop strings; returns the one that matched."""
        if self.completion <= self.min_tokens:
            self._text.append(delta)
            return None
        matched = self.stops.feed(delta)
        self._text.append(matched.text)
        return matched.stop_string if matched.stopped else None
