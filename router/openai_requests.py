"""OpenAI request bodies translated into pagewire's API messages (GenerateRequest, EmbedRequest).

Only the translation lives here: types are checked (each error names the JSON field), values are
copied into the proto; bounds are checked once, by the shared path, for gRPC and HTTP alike.
Besides OpenAI's fields, vLLM's sampling extras are accepted (``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``stop_token_ids``, ``ignore_eos``,
``skip_special_tokens``, ``include_stop_str_in_output``, ``prompt_logprobs``) so clients that
send them through ``extra_body`` get vLLM's behaviour, and the structured-output fields
(``response_format``, vLLM's ``guided_*`` and ``structured_outputs``: router/openai_structured.py).
Chat's tool fields are translated by ``router.openai_tools``; vLLM's other extras
(``chat_template_kwargs``, ``cache_salt``, ``truncate_prompt_tokens``, ...) by
``router.vllm_extras``, which also holds the list of those refused by name. Unknown fields are
ignored; known fields pagewire cannot honour (``suffix``, tools in completions, beam search...)
are refused rather than silently dropped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pagewire.v1 import common_pb2, generation_pb2
from router import openai_structured, vllm_extras
from router.errors import RequestError
from router.openai_fields import Fields, is_int32, parse_body
from router.openai_tools import set_message_tools, set_tools

__all__ = ["chat_call", "completion_call", "embedding_call", "parse_body"]

MAX_EMBEDDING_INPUTS = 2048  # OpenAI's own limit per request
MAX_PROMPTS = 2048  # prompts in one completions request, each its own request downstream
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
    """A /v1/completions or /v1/chat/completions request, as the shared path takes it: one
    GenerateRequest per prompt (a completions list of prompts fans out; chat has one)."""

    requests: list[generation_pb2.GenerateRequest]
    chat: bool
    stream: bool
    include_usage: bool
    continuous_usage: bool  # vLLM's stream_options.continuous_usage_stats, with include_usage
    logprobs: bool  # render logprobs in the answer
    prompt_logprobs: bool = False  # render vLLM's prompt_logprobs field (asked for by name)
    structured_field: str = ""  # the JSON field sampling.structured came from (named in errors)

    @property
    def request(self) -> generation_pb2.GenerateRequest:
        """The only request: a chat's, or a completions call's with one prompt."""
        assert len(self.requests) == 1, "a list of prompts has one request per prompt"
        return self.requests[0]


@dataclass(frozen=True)
class EmbeddingCall:
    requests: list[generation_pb2.EmbedRequest]
    base64: bool


def completion_call(body: dict[str, Any]) -> CompletionCall:
    f = Fields(body)
    for name in ("tools", "tool_choice"):
        f.refuse(name)  # a chat field
    f.refuse("user_defined_tokens")
    if f.get("suffix") not in (None, ""):
        raise RequestError.invalid(
            "suffix", "is not supported: the served model has no fill-in-the-middle (infill) mode"
        )
    base = generation_pb2.GenerateRequest(model=f.string("model") or "")
    base.echo = bool(f.boolean("echo"))
    vllm_extras.set_extras(base, f, chat=False)
    _set_sampling(base.sampling, f)
    logprobs = f.integer("logprobs")
    if logprobs is not None:
        base.sampling.logprobs = logprobs
        if base.echo:  # the echoed prompt's tokens carry logprobs too
            asked = base.sampling.prompt_logprobs if base.sampling.HasField("prompt_logprobs") else 0
            base.sampling.prompt_logprobs = max(asked, logprobs)
    best_of = f.integer("best_of")
    if best_of is not None:
        base.sampling.best_of = best_of
    call = _call(base, f, chat=False, logprobs=logprobs is not None)
    if call.stream and best_of is not None and best_of != (f.integer("n") or 1):
        raise RequestError.invalid("best_of", "cannot be streamed (candidates are ranked once done)")
    return dataclasses.replace(call, requests=_fan_out(base, _prompts(f), f))


def chat_call(body: dict[str, Any]) -> CompletionCall:
    f = Fields(body)
    for name in ("functions", "function_call", "audio"):
        f.refuse(name)
    request = generation_pb2.GenerateRequest(model=f.string("model") or "")
    set_messages(request.chat, f)
    set_tools(request.chat, f)
    vllm_extras.set_extras(request, f, chat=True)
    _set_sampling(request.sampling, f, max_tokens=("max_completion_tokens", "max_tokens"))
    logprobs = bool(f.boolean("logprobs"))
    top = f.integer("top_logprobs")
    if top is not None and not logprobs:
        raise RequestError.invalid("top_logprobs", "requires logprobs: true")
    if logprobs:
        request.sampling.logprobs = top or 0
    return _call(request, f, chat=True, logprobs=logprobs)


def _call(
    request: generation_pb2.GenerateRequest, f: Fields, chat: bool, logprobs: bool
) -> CompletionCall:
    options = f.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise RequestError.invalid("stream_options", "must be an object")
    stream_options = Fields(options or {})
    include_usage = bool(stream_options.boolean("include_usage"))
    try:
        continuous = bool(stream_options.boolean("continuous_usage_stats"))
    except RequestError as e:
        raise e.renamed("stream_options.continuous_usage_stats") from None
    constraint = openai_structured.read(f.body)
    if constraint is not None:
        request.sampling.structured.CopyFrom(constraint.output.to_proto())
    return CompletionCall(
        [request], chat, bool(f.boolean("stream")), include_usage, include_usage and continuous,
        logprobs,
        prompt_logprobs=f.get("prompt_logprobs") is not None,
        structured_field=constraint.field if constraint else "",
    )


def _fan_out(base: Any, items: list[tuple[str, str | list[int]]], f: Fields) -> list[Any]:
    """One copy of ``base`` (a GenerateRequest or EmbedRequest) per input: text or token ids."""
    requests = []
    for path, item in items:
        request = type(base)()
        request.CopyFrom(base)
        if isinstance(item, str):
            request.text = item
        else:
            request.token_ids.ids.extend(f.token_ids(path, item))
        requests.append(request)
    return requests


def _prompts(f: Fields) -> list[tuple[str, str | list[int]]]:
    """(field path, prompt) pairs: a string or a token list alone, or a list of either."""
    prompt = f.get("prompt")
    if isinstance(prompt, str):
        return [("prompt", prompt)]
    if not isinstance(prompt, list):
        raise RequestError.invalid("prompt", "must be a string, a list of token ids, or a list of them")
    if not prompt or not isinstance(prompt[0], str | list):
        return [("prompt", prompt)]  # one token list (its type is checked by the caller)
    if len(prompt) > MAX_PROMPTS:
        raise RequestError.invalid("prompt", f"at most {MAX_PROMPTS} prompts per request")
    if len(prompt) == 1:
        return [("prompt", prompt[0])]  # a batch of one: errors name "prompt"
    for i, item in enumerate(prompt):
        if not isinstance(item, str | list):
            raise RequestError.invalid(f"prompt[{i}]", "must be a string or a list of token ids")
    return [(f"prompt[{i}]", item) for i, item in enumerate(prompt)]


def set_messages(chat: generation_pb2.Chat, f: Fields) -> None:
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
        content = _content(message.get("content"), f"messages[{i}]")
        if isinstance(content, str):
            added = chat.messages.add(role=role, content=content)
        else:
            added = chat.messages.add(role=role, parts=content)
        set_message_tools(added, message, f"messages[{i}]")
    add = f.boolean("add_generation_prompt")
    if add is not None:
        chat.add_generation_prompt = add


def _content(content: Any, path: str) -> str | list[generation_pb2.ContentPart]:
    """A message's text (a string, null for an assistant turn with tool calls, or text parts
    joined), or its parts when it has an image."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError.invalid(f"{path}.content", "must be a string or a list of parts")
    parts = [_part(part, f"{path}.content[{j}]") for j, part in enumerate(content)]
    if all(p.WhichOneof("part") == "text" for p in parts):
        return "".join(p.text for p in parts)
    return parts


def _part(part: Any, path: str) -> generation_pb2.ContentPart:
    """One OpenAI content part: ``{"type": "text", "text"}`` or ``{"type": "image_url",
    "image_url": {"url"}}`` (a data: URL, or http(s) when the router fetches)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise RequestError.invalid(f"{path}.text", "must be a string")
        return generation_pb2.ContentPart(text=part["text"])
    if kind == "image_url":
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise RequestError.invalid(f"{path}.image_url.url", "must be a string")
        if isinstance(image, dict) and image.get("detail", "auto") != "auto":
            raise RequestError.invalid(f"{path}.image_url.detail",
                                       "only auto is supported (the model's processor decides)")
        return generation_pb2.ContentPart(image=generation_pb2.ImagePart(url=url))
    raise RequestError.invalid(path, "only text and image_url parts are supported")


def _set_sampling(
    sampling: common_pb2.SamplingParams, f: Fields, max_tokens: tuple[str, ...] = ("max_tokens",)
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
    _set_logit_bias(sampling, f)


def _set_logit_bias(sampling: common_pb2.SamplingParams, f: Fields) -> None:
    """OpenAI's ``{"token id": bias}``; ids and bounds are checked by the shared path."""
    bias = f.get("logit_bias")
    if bias is None:
        return
    if not isinstance(bias, dict):
        raise RequestError.invalid("logit_bias", "must be an object of token id -> bias")
    for key, value in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise RequestError.invalid("logit_bias", f"keys must be token ids, got {key!r}") from None
        if not is_int32(token):
            raise RequestError.invalid("logit_bias", f"token id {key} is out of range")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise RequestError.invalid("logit_bias", f"biases must be numbers, got {value!r}")
        try:
            sampling.logit_bias[token] = float(value)
        except OverflowError:
            raise RequestError.invalid("logit_bias", f"bias {value} is out of range") from None


def embedding_call(body: dict[str, Any]) -> EmbeddingCall:
    f = Fields(body)
    f.refuse("dimensions")
    if body.get("messages") is not None:
        raise RequestError.invalid("messages", "chat (and image) embeddings are not supported: "
                                   "pagewire embeds text and token ids only")
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
    return EmbeddingCall(_fan_out(base, _embedding_inputs(f.get("input")), f), fmt == "base64")


def _embedding_inputs(value: Any) -> list[tuple[str, str | list[int]]]:
    """(field path, input) pairs: a string, a token list, or a list of either."""
    if isinstance(value, list) and any(isinstance(v, dict) for v in value):
        raise RequestError.invalid("input", "embeddings of images (or other parts) are not "
                                   "supported: pagewire embeds text and token ids only")
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
