"""The served model as the router sees it: its name, tokenizer, context length and chat template.

Turning a request's prompt (text, token ids or a chat) into token ids lives here, because the
gRPC and HTTP fronts, generation and embeddings all need exactly the same rules.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import Message
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pagewire.config import RouterConfig
from pagewire.model_dir import is_vision, text_config
from pagewire.structured import SpecError, StructuredOutput
from pagewire.v1 import common_pb2
from router import reasoning_parsers, tool_parsers
from router.chat import check_messages, image_parts, render_chat
from router.errors import RequestError
from router.image_sources import ImageLimits
from router.images import ModelImages

if TYPE_CHECKING:  # the grammar engine is imported on the first constrained request
    from pagewire.grammar import Compiler

TOKENIZE_IN_THREAD_CHARS = 16_384  # longer prompts are tokenized off the event loop
# The router compiles specs only to refuse malformed ones; repeats hit xgrammar's cache.
SPEC_CACHE_BYTES = 64 << 20
T = TypeVar("T")


def max_model_len(cfg: RouterConfig, hf_config: dict) -> int:
    """``--max-model-len`` (which must match the workers'), else the model's own context; the
    workers refuse a longer one, so the router does too."""
    trained = int(hf_config.get("max_position_embeddings", 4096))
    if cfg.max_model_len > trained:
        raise SystemExit(f"--max-model-len {cfg.max_model_len} exceeds the model's "
                         f"max_position_embeddings {trained} (config.json)")
    return cfg.max_model_len or trained


@dataclass
class ServedModel:
    name: str
    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    vocab_size: int
    max_prompt_chars: int
    chat_template: str | None = None  # None: the tokenizer's own
    tool_call_parser: str = ""  # --tool-call-parser: tool_choice auto parses calls with it
    reasoning_parser: str = ""  # --reasoning-parser: chat output split into reasoning, content
    _compiler: Compiler | None = field(default=None, repr=False)
    _compiler_lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)
    images: ModelImages | None = None  # a vision-language model's image side

    @classmethod
    def load(cls, cfg: RouterConfig) -> ServedModel:
        full_config = json.loads((Path(cfg.model) / "config.json").read_text())
        hf_config = text_config(full_config)
        template = None
        if cfg.chat_template:
            path = Path(cfg.chat_template)
            if not path.is_file():
                raise SystemExit(f"--chat-template: no such file {path}")
            template = path.read_text()
        for flag, name, known in (
            ("--tool-call-parser", cfg.tool_call_parser, tool_parsers.PARSERS),
            ("--reasoning-parser", cfg.reasoning_parser, reasoning_parsers.PARSERS),
        ):
            if name and name not in known:
                raise SystemExit(f"{flag}: unknown parser {name!r}; known: {', '.join(known)}")
        return cls(
            name=cfg.served_model_name or Path(cfg.model).resolve().name,
            tokenizer=AutoTokenizer.from_pretrained(cfg.model),
            max_model_len=max_model_len(cfg, hf_config),
            vocab_size=int(hf_config["vocab_size"]),
            max_prompt_chars=cfg.max_prompt_chars,
            chat_template=template,
            tool_call_parser=cfg.tool_call_parser,
            reasoning_parser=cfg.reasoning_parser,
            images=(ModelImages(cfg.model, image_limits(cfg), cfg.image_cache_bytes)
                    if is_vision(full_config) else None),
        )

    def check_name(self, model: str) -> None:
        """Empty means this model; anything else must be its name (NOT_FOUND, as OpenAI answers)."""
        if model and model != self.name:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                "model",
                f"unknown model {model!r}; served: {self.name!r}",
            )

    def check_ids(self, ids: Sequence[int], field: str = "token_ids") -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise RequestError.invalid(
                field, f"each id must be in [0, {self.vocab_size}), got {bad}"
            )

    async def prompt(
        self, request: Message, oneof: str, tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[common_pb2.ImageInput]]:
        """Token ids and images of a generation prompt: a chat's image parts fetched, decoded
        and preprocessed, each one's placeholder expanded to its run."""
        kind = request.WhichOneof(oneof)
        parts = image_parts(request.chat) if kind == "chat" else []
        if not parts or self.images is None:  # a text-only model refuses them in prompt_ids
            ids = await self.prompt_ids(request, oneof, tools, images_ok=True)
            if self.images is not None:
                self.images.refuse_unserved(ids, "messages" if kind == "chat" else kind or oneof)
            if self.images is not None and self.images.token_id in ids:
                # Placeholders with no image: transformers refuses the mismatch too.
                raise RequestError.invalid(
                    "messages" if kind == "chat" else kind or oneof,
                    f"contains the image placeholder {self.images.token!r} but no image; send "
                    "images as chat image parts")
            return ids, []
        check_messages(request.chat, self.max_prompt_chars, takes_images=True)  # before fetching
        pixels = await self.images.pixels(parts)
        ids = await self.prompt_ids(request, oneof, tools, images_ok=True)
        return self.images.expand(ids, pixels)

    async def prompt_ids(
        self, request: Message, oneof: str, tools: list[dict[str, Any]] | None = None,
        images_ok: bool = False,
    ) -> list[int]:
        """Token ids of the request's ``oneof`` prompt (text, token_ids or chat); [] if unset.

        Text is tokenized as the tokenizer does for a prompt (BOS added); ids are used as given.
        A chat is rendered with ``tools`` (checked by router.tools) when it has any; its image
        parts are refused unless ``images_ok`` (:meth:`prompt` handles them).
        """
        kind = request.WhichOneof(oneof)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)  # type: ignore[attr-defined]
            self.check_ids(ids)
            return ids
        if kind == "chat":
            chat = request.chat  # type: ignore[attr-defined]
            check_messages(chat, self.max_prompt_chars, takes_images=self.images is not None)
            if not images_ok and image_parts(chat):
                raise RequestError.invalid(image_parts(chat)[0][0], "images are accepted by "
                                           "generation only (Generate, chat completions)")
            size = sum(len(m.content) for m in chat.messages)
            add = bool(getattr(request, "add_special_tokens", False))
            return await _maybe_in_thread(
                size, lambda: render_chat(self.tokenizer, chat, self.chat_template, tools, add)
            )
        text: str = request.text if kind == "text" else ""  # type: ignore[attr-defined]
        add = request.add_special_tokens if _has(request, "add_special_tokens") else True
        return await self.encode(text, field=oneof, add_special_tokens=add)

    async def check_structured(self, spec: StructuredOutput) -> None:
        """Compile ``spec`` for this tokenizer (off the event loop, cached per spec): a spec the
        engine refuses is an INVALID_ARGUMENT naming ``structured``, before anything is submitted.
        The worker compiles it again for generation; this copy only validates."""
        try:
            from pagewire.grammar import Compiler
        except ImportError:  # a deployment without the engine still serves everything else
            raise RequestError.invalid(
                "structured", "is not served: the grammar engine (xgrammar) is not installed"
            ) from None
        async with self._compiler_lock:
            if self._compiler is None:
                self._compiler = await asyncio.to_thread(
                    Compiler, self.tokenizer, self.vocab_size, cache_bytes=SPEC_CACHE_BYTES
                )
        try:
            await asyncio.to_thread(self._compiler.compile, spec)
        except SpecError as e:
            raise RequestError.invalid("structured", str(e)) from None

    async def encode(self, text: str, field: str, add_special_tokens: bool = True) -> list[int]:
        if len(text) > self.max_prompt_chars:
            raise RequestError.invalid(
                field, f"is {len(text)} characters; the limit is {self.max_prompt_chars}"
            )
        if not text:
            return []
        return await _maybe_in_thread(
            len(text), lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        )


def _has(request: Message, name: str) -> bool:
    """Whether ``request`` (any prompt-carrying message) has the optional field set."""
    return name in request.DESCRIPTOR.fields_by_name and request.HasField(name)


async def _maybe_in_thread(size: int, work: Callable[[], T]) -> T:
    """Short work inline (a thread hop costs more than it); long work off the event loop."""
    if size > TOKENIZE_IN_THREAD_CHARS:
        return await asyncio.to_thread(work)
    return work()


def image_limits(cfg: RouterConfig) -> ImageLimits:
    return ImageLimits(
        max_images=cfg.max_images, max_pixels=cfg.max_image_pixels,
        max_bytes=cfg.max_image_bytes, url_hosts=ImageLimits.parse_hosts(cfg.image_url_hosts),
        fetch_timeout_s=cfg.image_fetch_timeout_s,
    )
