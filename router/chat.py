"""Chat prompts: role messages rendered by the model's chat template, then tokenized.

The template is the tokenizer's own (``chat_template`` in tokenizer_config.json) unless the router
was started with ``--chat-template FILE``. Templates that need a BOS write it themselves
(``{{ bos_token }}``), which is why transformers encodes a rendered chat with
``add_special_tokens=False``; doing the same here keeps the ids identical to
``tokenizer.apply_chat_template(messages, tokenize=True)`` and never puts BOS in twice.

A message given as parts renders as transformers' list-of-parts content: ``{"type": "text"}``
and ``{"type": "image"}`` items, which a vision model's template turns into its placeholder.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
import jinja2
from transformers import PreTrainedTokenizerBase

from pagewire.v1 import generation_pb2
from router.errors import RequestError

# OpenAI's roles. A template renders any string, but an unknown role is almost always a client
# bug (a typo, a provider-specific role) that would otherwise pass silently into the prompt.
ROLES = ("system", "developer", "user", "assistant", "tool")


def check_messages(chat: generation_pb2.Chat, max_chars: int, takes_images: bool = False) -> None:
    """Refuse an empty conversation, unknown roles, content over ``max_chars`` in total, a
    message with both content and parts, and image parts to a model that takes no images."""
    if not chat.messages:
        raise RequestError.invalid("messages", "must not be empty")
    total = 0
    for i, message in enumerate(chat.messages):
        if message.role not in ROLES:
            raise RequestError.invalid(
                f"messages[{i}].role", f"must be one of {', '.join(ROLES)}; got {message.role!r}"
            )
        total += len(message.content) + sum(len(c.arguments) for c in message.tool_calls)
        if message.parts and message.content:
            raise RequestError.invalid(f"messages[{i}].content",
                                       "set either content or parts, not both")
        for j, part in enumerate(message.parts):
            kind = part.WhichOneof("part")
            if kind is None:
                raise RequestError.invalid(f"messages[{i}].content[{j}]", "an empty part")
            if kind == "image" and not takes_images:
                raise RequestError.invalid(f"messages[{i}].content[{j}]",
                                           "this model takes no images (it is text-only)")
            total += len(part.text)
    if total > max_chars:
        raise RequestError.invalid(
            "messages", f"content is {total} characters in all; the limit is {max_chars}"
        )


def render_chat(
    tokenizer: PreTrainedTokenizerBase,
    chat: generation_pb2.Chat,
    template: str | None,
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """The conversation's prompt token ids. Call :func:`check_messages` first. ``tools``: as
    transformers' ``apply_chat_template(tools=...)`` takes them (router.tools checks them)."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "chat",
            "the model has no chat template; start the router with --chat-template FILE",
        )
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    messages = [_message(m, i) for i, m in enumerate(chat.messages)]
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=add_prompt,
            chat_template=template,
        )
    except jinja2.TemplateError as e:  # the template's raise_exception(): roles must alternate...
        raise RequestError.invalid("messages", f"the chat template refused them: {e}") from None
    assert isinstance(text, str)
    return tokenizer.encode(text, add_special_tokens=False)


def _message(message: generation_pb2.ChatMessage, i: int) -> dict[str, Any]:
    """One message as chat templates read it. Calls' arguments are given as objects, as
    templates (Qwen's, Llama's, Hermes') expect: they serialise them with ``tojson``."""
    shaped: dict[str, Any] = {"role": message.role, "content": _content(message)}
    if message.tool_calls:
        shaped["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": _arguments(c.arguments, i, j)}}
            for j, c in enumerate(message.tool_calls)
        ]
    if message.tool_call_id:
        shaped["tool_call_id"] = message.tool_call_id
    if message.name:
        shaped["name"] = message.name
    return shaped


def _arguments(text: str, i: int, j: int) -> dict[str, Any]:
    path = f"messages[{i}].tool_calls[{j}].function.arguments"
    try:
        value = json.loads(text or "{}")
    except ValueError as e:
        raise RequestError.invalid(path, f"is not JSON: {e}") from None
    if not isinstance(value, dict):
        raise RequestError.invalid(path, "must be a JSON object")
    return value


def image_parts(chat: generation_pb2.Chat) -> list[tuple[str, generation_pb2.ImagePart]]:
    """The conversation's image parts in prompt order, each with the field that names it."""
    return [(f"messages[{i}].content[{j}]", part.image)
            for i, m in enumerate(chat.messages) for j, part in enumerate(m.parts)
            if part.WhichOneof("part") == "image"]


def _content(message: generation_pb2.ChatMessage) -> str | list[dict[str, str]]:
    if not message.parts:
        return message.content
    return [{"type": "text", "text": p.text} if p.WhichOneof("part") == "text" else
            {"type": "image"} for p in message.parts]
