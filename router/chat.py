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
        total += len(message.content)
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
    tokenizer: PreTrainedTokenizerBase, chat: generation_pb2.Chat, template: str | None
) -> list[int]:
    """The conversation's prompt token ids. Call :func:`check_messages` first."""
    if template is None and not getattr(tokenizer, "chat_template", None):
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "chat",
            "the model has no chat template; start the router with --chat-template FILE",
        )
    add_prompt = chat.add_generation_prompt if chat.HasField("add_generation_prompt") else True
    messages = [{"role": m.role, "content": _content(m)} for m in chat.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_prompt, chat_template=template
        )
    except jinja2.TemplateError as e:  # the template's raise_exception(): roles must alternate...
        raise RequestError.invalid("messages", f"the chat template refused them: {e}") from None
    assert isinstance(text, str)
    return tokenizer.encode(text, add_special_tokens=False)


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
