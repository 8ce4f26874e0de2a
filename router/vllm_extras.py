"""vLLM's extra request fields (beyond OpenAI's) on the OpenAI HTTP API: served, or refused by name.

vLLM clients send these through ``extra_body``. Each is either translated into pagewire's
GenerateRequest here, or listed in :data:`REFUSED` with the one value that means "off" (vLLM's
default) and why pagewire cannot honour anything else: a request that sets one is a 400 naming
the field, never served as if it were absent. The sampling extras vLLM shares with pagewire's
SamplingParams (top_k, min_p, ...) are read by ``router.openai_requests``; the structured-output
ones by ``router.openai_structured``.

The steps that need the served model (truncating the tokenized prompt, tokenizing bad words,
checking template variables) are here too, called by the shared path for gRPC and HTTP alike.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from transformers import PreTrainedTokenizerBase

from pagewire.sampling import MAX_BAD_WORD_CHARS, MAX_BAD_WORDS
from pagewire.v1 import common_pb2, generation_pb2
from router.errors import RequestError
from router.openai_fields import Fields

MAX_TEMPLATE_KWARGS_CHARS = 65536

# field -> (values that mean "off", why anything else is refused). One list, also in the README.
REFUSED: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not implemented"),
    "length_penalty": ((1, 1.0), "applies to beam search only, which is not implemented"),
    "logits_processors": (([],), "custom logits processors are not loaded per request"),
    "vllm_xargs": (({},), "no custom extensions are installed to read them"),
    "kv_transfer_params": (({},), "disaggregated prefill (KV transfer) is not supported"),
    "prompt_embeds": (("", []), "prompts are text, token ids or chats, not embeddings"),
    "mm_processor_kwargs": (({},), "the image processor runs with the model's own settings"),
    "spaces_between_special_tokens": (
        (True,), "false is not honoured: special tokens are decoded as the tokenizer joins them"),
    "documents": (([],), "documents are not passed to the chat template"),
    "chat_template": (
        ("",), "per-request templates are not accepted (a template is code the router runs); "
        "start the router with --chat-template FILE"),
    "return_tokens_as_token_ids": ((False,), "logprobs' tokens are always their text"),
    "structural_tag": (("",), "structural tags are not implemented"),
    "include_reasoning": ((True,), "reasoning is always returned (with --reasoning-parser)"),
    "echo": ((False,), "chat echo (prepending the last message) is not implemented"),
}
CHAT_ONLY = ("chat_template_kwargs", "continue_final_message", "documents", "chat_template",
             "echo", "add_generation_prompt")
# Variables the renderer passes itself: a chat_template_kwargs key may not replace them.
RESERVED_TEMPLATE_KEYS = frozenset({
    "messages", "conversation", "tools", "documents", "add_generation_prompt",
    "continue_final_message", "chat_template", "tokenize", "return_dict", "return_tensors",
    "padding", "truncation", "max_length", "tokenizer_kwargs", "return_assistant_tokens_mask",
    "sanitize_control_tokens", "bos_token", "eos_token", "unk_token", "pad_token",
    "raise_exception", "strftime_now",
})


def refuse_unserved(f: Fields, chat: bool) -> None:
    """400 naming the first field of :data:`REFUSED` set to anything but its "off" value.
    ``echo`` is served by completions, so it is refused in chat only."""
    for name, (off, why) in REFUSED.items():
        if name == "echo" and not chat:
            continue
        value = f.get(name)
        # The type must match too: True is not length_penalty 1, nor 0 use_beam_search false.
        if value is None or any(value == v and type(value) is type(v) for v in off):
            continue
        raise RequestError.invalid(name, f"is not supported by this server: {why}")


def set_extras(request: generation_pb2.GenerateRequest, f: Fields, chat: bool) -> None:
    """Copy the served vLLM extras onto ``request`` (types checked here, bounds downstream)."""
    refuse_unserved(f, chat)
    if not chat:
        for name in CHAT_ONLY:
            if name != "echo":
                f.refuse(name)  # a chat field sent to completions
    truncate = f.integer("truncate_prompt_tokens")
    if truncate is not None:
        request.truncate_prompt_tokens = truncate  # >= 1: checked by router.generation
    salt = f.string("cache_salt")
    if salt is not None:
        if not salt:  # vLLM's rule: an empty salt is a client bug, not "unsalted"
            raise RequestError.invalid("cache_salt", "must be a non-empty string")
        request.cache_salt = salt  # its length is checked by router.generation
    request.return_prompt_token_ids = bool(f.boolean("return_token_ids"))
    add = f.boolean("add_special_tokens")
    if add is not None:
        request.add_special_tokens = add
    rid = f.string("request_id")
    if rid:
        request.request_id = rid  # an X-Request-Id header wins (router.openai_http)
    priority = f.integer("priority")
    if priority is not None:
        request.priority = -priority  # vLLM: lower runs first; pagewire: higher runs first
    request.sampling.bad_words.extend(f.strings("bad_words"))
    if f.get("allowed_token_ids") is not None:
        request.sampling.allowed_token_ids.extend(f.token_ids("allowed_token_ids"))
    if chat:
        _set_chat_extras(request.chat, f)


def _set_chat_extras(chat: generation_pb2.Chat, f: Fields) -> None:
    kwargs = f.get("chat_template_kwargs")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise RequestError.invalid("chat_template_kwargs", "must be an object")
        chat.template_kwargs = json.dumps(kwargs)  # checked by router.chat with the gRPC path's
    chat.continue_final_message = bool(f.boolean("continue_final_message"))


def truncate(prompt: list[int], keep: int, images: bool) -> list[int]:
    """The last ``keep`` prompt tokens (vLLM's truncate_prompt_tokens)."""
    if keep < 1:
        raise RequestError.invalid("truncate_prompt_tokens", f"must be >= 1, got {keep}")
    if images and keep < len(prompt):
        raise RequestError.invalid("truncate_prompt_tokens",
                                   "cannot cut a prompt with images (a placeholder run would split)")
    return prompt[-keep:]


def with_bad_words_ids(
    sampling: common_pb2.SamplingParams, tokenizer: PreTrainedTokenizerBase
) -> common_pb2.SamplingParams:
    """``sampling`` with its bad words' token sequences added (a copy), for the worker. Words
    past the bounds are left untokenized: pagewire.sampling.validate refuses them."""
    words = sampling.bad_words
    if not words or len(words) > MAX_BAD_WORDS or any(len(w) > MAX_BAD_WORD_CHARS for w in words):
        return sampling
    copy = common_pb2.SamplingParams()
    copy.CopyFrom(sampling)
    copy.bad_words_token_ids.extend(
        common_pb2.TokenSequence(ids=ids) for ids in bad_words_token_ids(tokenizer, words))
    return copy


def bad_words_token_ids(tokenizer: PreTrainedTokenizerBase, words: Sequence[str]) -> list[list[int]]:
    """vLLM's tokenization of bad words: each word as written (leading spaces dropped), and again
    after a space when that gives other tokens of the same length (the word mid-sentence, for a
    tokenizer that folds the space into the word's first token)."""
    runs: list[list[int]] = []
    for word in words:
        bare = tokenizer.encode(word.lstrip(), add_special_tokens=False)
        spaced = tokenizer.encode(" " + word.lstrip(), add_special_tokens=False)
        runs.append(bare)
        if bare and spaced and spaced[0] != bare[0] and len(spaced) == len(bare):
            runs.append(spaced)
    return [r for r in runs if r]


def template_kwargs(chat: generation_pb2.Chat) -> dict[str, Any]:
    """The chat's template variables, checked: a JSON object whose keys are not the renderer's
    own (a ``messages`` key would replace the conversation)."""
    if not chat.template_kwargs:
        return {}
    if len(chat.template_kwargs) > MAX_TEMPLATE_KWARGS_CHARS:
        raise RequestError.invalid("chat_template_kwargs",
                                   f"at most {MAX_TEMPLATE_KWARGS_CHARS} characters of JSON")
    try:
        kwargs = json.loads(chat.template_kwargs)
    except ValueError as e:
        raise RequestError.invalid("chat_template_kwargs", f"is not JSON: {e}") from None
    if not isinstance(kwargs, dict):
        raise RequestError.invalid("chat_template_kwargs", "must be a JSON object")
    clash = sorted(k for k in kwargs if k in RESERVED_TEMPLATE_KEYS)
    if clash:
        raise RequestError.invalid("chat_template_kwargs", f"may not set {', '.join(clash)}: "
                                   "the server sets them (use the request's own fields)")
    return kwargs
