"""OpenAI request bodies translated into pagewire's API messages (GenerateRequest, EmbedRequest).

Only the translation lives here: types are checked (each error names the JSON field), values are
copied into the proto; bounds are checked once, by the shared path, for gRPC and HTTP alike.
Besides OpenAI's fields, vLLM's sampling extras are accepted (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``prompt_logprobs``) so clients that
send them through ``extra_body`` get vLLM's behaviour. Unknown fields are ignored; known fields
pagewire cannot honour (``logit_bias``, ``echo``, ``suffix``, tools...) are refused rather than
silently dropped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagewire.v1 import common_pb2, generation_pb2
from router.errors import RequestError

INT32 = (-(1 << 31), (1 << 31) - 1)
MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request
_FLOATS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
_INTS = ("top_k", "min_tokens", "n", "prompt_logprobs")
_BOOLS = ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output")
_POOLINGS = {"mean": common_pb2.POOLING_MEAN, "last": common_pb2.POOLING_LAST}


@dataclass(frozen=True)
class CompletionCall:
    """A /v1/completions or /v1/chat/completions request, as the shared path takes it."""

    request: generation_pb2.GenerateRequest
    chat: bool
    stream: bool
    include_usage: bool
    logprobs: bool  # render logprobs in the answer


@dataclass(frozen=True)
class EmbeddingCall:
    requests: list[generation_pb2.EmbedRequest]
    base64: bool


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


class _Fields:
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
        if not isinstance(value, list) or not all(_is_int32(v) for v in value):
            raise RequestError.invalid(name, "must be a list of 32-bit integer token ids")
        return value

    def refuse(self, name: str, allowed: object = None) -> None:
        """A known field pagewire does not implement: present with another value is an error."""
        value = self.body.get(name)
        if value is not None and value != allowed and value != {} and value != []:
            raise RequestError.invalid(name, "is not supported by this server")


def _is_int32(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT32[0] <= value <= INT32[1]


def completion_call(body: dict[str, Any]) -> CompletionCall:
    f = _Fields(body)
    for name in ("suffix", "logit_bias", "user_defined_tokens"):
        f.refuse(name)
    f.refuse("echo", allowed=False)
    request = generation_pb2.GenerateRequest(model=f.string("model") or "")
    _set_prompt(request, f)
    _set_sampling(request.sampling, f)
    best_of = f.integer("best_of")
    if best_of is not None and best_of != (f.integer("n") or 1):
        raise RequestError.invalid("best_of", "must equal n (no server-side best-of)")
    logprobs = f.integer("logprobs")
    if logprobs is not None:
        request.sampling.logprobs = logprobs
    return _call(request, f, chat=False, logprobs=logprobs is not None)


def chat_call(body: dict[str, Any]) -> CompletionCall:
    f = _Fields(body)
    for name in ("logit_bias", "tools", "functions", "audio"):
        f.refuse(name)
    fmt = f.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise RequestError.invalid("response_format", 'only {"type": "text"} is supported')
    request = generation_pb2.GenerateRequest(model=f.string("model") or "")
    _set_messages(request.chat, f)
    _set_sampling(request.sampling, f, max_tokens=("max_completion_tokens", "max_tokens"))
    logprobs = bool(f.boolean("logprobs"))
    top = f.integer("top_logprobs")
    if top is not None and not logprobs:
        raise RequestError.invalid("top_logprobs", "requires logprobs: true")
    if logprobs:
        request.sampling.logprobs = top or 0
    return _call(request, f, chat=True, logprobs=logprobs)


def _call(
    request: generation_pb2.GenerateRequest, f: _Fields, chat: bool, logprobs: bool
) -> CompletionCall:
    options = f.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError.invalid("stream_options", "must be an object")
    include_usage = _Fields(options or {}).boolean("include_usage")
    return CompletionCall(request, chat, bool(f.boolean("stream")), bool(include_usage), logprobs)


def _set_prompt(request: generation_pb2.GenerateRequest, f: _Fields) -> None:
    prompt = f.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        request.text = prompt
    elif isinstance(prompt, list) and (not prompt or not isinstance(prompt[0], str | list)):
        request.token_ids.ids.extend(f.token_ids("prompt", prompt))
    elif isinstance(prompt, list):
        raise RequestError.invalid(
            "prompt", "a batch of several prompts is not supported; send one request per prompt"
        )
    else:
        raise RequestError.invalid("prompt", "must be a string or a list of token ids")


def _set_messages(chat: generation_pb2.Chat, f: _Fields) -> None:
    messages = f.get("messages")
    if not isinstance(messages, list):
        raise RequestError.invalid("messages", "must be a list of messages")
    chat.SetInParent()  # an empty list is still a chat (refused as such, naming "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError.invalid(f"messages[{i}]", "must be an object")
        role = message.get("role")
        if not isinstance(role, str):
            raise RequestError.invalid(f"messages[{i}].role", "must be a string")
        chat.messages.add(role=role, content=_content(message.get("content"), f"messages[{i}]"))
    add = f.boolean("add_generation_prompt")
    if add is not None:
        chat.add_generation_prompt = add


def _content(content: Any, path: str) -> str:
    """A message's text: a string, null (an assistant turn with tool calls) or text parts."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError.invalid(f"{path}.content", "must be a string or a list of parts")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise RequestError.invalid(f"{path}.content[{j}]", "only text parts are supported")
        if not isinstance(part.get("text"), str):
            raise RequestError.invalid(f"{path}.content[{j}].text", "must be a string")
        texts.append(part["text"])
    return "".join(texts)


def _set_sampling(
    sampling: common_pb2.SamplingParams, f: _Fields, max_tokens: tuple[str, ...] = ("max_tokens",)
) -> None:
    for name in _FLOATS:
        value = f.number(name)
        if value is not None:
            setattr(sampling, name, value)
    for name in (*_INTS, *max_tokens):
        value = f.integer(name)
        if value is not None:
            setattr(sampling, "max_tokens" if name in max_tokens else name, value)
    for name in _BOOLS:
        value = f.boolean(name)
        if value is not None:
            setattr(sampling, name, value)
    sampling.stop.extend(f.strings("stop"))
    if f.get("stop_token_ids") is not None:
        sampling.stop_token_ids.extend(f.token_ids("stop_token_ids"))
    seed = f.integer("seed", 0, (1 << 64) - 1)
    if seed is not None:
        sampling.seed = seed


def embedding_call(body: dict[str, Any]) -> EmbeddingCall:
    f = _Fields(body)
    f.refuse("dimensions")
    fmt = f.string("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise RequestError.invalid("encoding_format", f"must be float or base64, got {fmt!r}")
    pooling = f.string("pooling") or "mean"
    if pooling not in _POOLINGS:
        raise RequestError.invalid("pooling", f"must be mean or last, got {pooling!r}")
    normalize = f.boolean("normalize")
    base = generation_pb2.EmbedRequest(
        model=f.string("model") or "",
        pooling=_POOLINGS[pooling],
        normalize=True if normalize is None else normalize,  # OpenAI's vectors have unit length
    )
    requests = []
    for path, item in _embedding_inputs(f.get("input")):
        request = generation_pb2.EmbedRequest()
        request.CopyFrom(base)
        if isinstance(item, str):
            request.text = item
        else:
            request.token_ids.ids.extend(f.token_ids(path, item))
        requests.append(request)
    return EmbeddingCall(requests, fmt == "base64")


def _embedding_inputs(value: Any) -> list[tuple[str, str | list[int]]]:
    """(field path, input) pairs: a string, a token list, or a list of either."""
    if isinstance(value, str):
        return [("input", value)]
    if not isinstance(value, list) or not value:
        raise RequestError.invalid(
            "input", "must be a non-empty string, token list, or list of them"
        )
    if not isinstance(value[0], str | list):
        return [("input", value)]  # one token list
    if len(value) > MAX_EMBEDDING_INPUTS:
        raise RequestError.invalid("input", f"at most {MAX_EMBEDDING_INPUTS} inputs per request")
    for i, item in enumerate(value):
        if not isinstance(item, str | list):
            raise RequestError.invalid(f"input[{i}]", "must be a string or a list of token ids")
    return [(f"input[{i}]", item) for i, item in enumerate(value)]
