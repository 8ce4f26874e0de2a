"""Incremental detokenization: generated token ids in, UTF-8-safe text deltas out.

A token's text depends on its left neighbours (leading-space handling) and, with byte-level
BPE, one character can span several tokens. So each step decodes a small window of recent ids
rather than one token alone, and text is only released once it can no longer change:

- The window holds a few tokens of context (their text counts as already emitted) followed by
  the tokens added since the last clean boundary.
- A decode that ends in U+FFFD may be an unfinished character; that tail is held back and the
  text before it is released. U+FFFD is what HF tokenizers produce for an incomplete byte
  sequence, and text before the trailing run of U+FFFD cannot change when more bytes arrive.
- Once a decode ends cleanly with new text, the window slides: the tokens since the previous
  boundary become the new context. Work per token is one decode of a few tokens (plus one on a
  slide), never a re-decode of the whole output.
- If more than `_MAX_PENDING_TOKENS` tokens pass without a clean boundary, the output is not
  valid UTF-8 there (or is a run of skipped special tokens): the held text is released as
  decoded, U+FFFD included, and the window restarts, so the work stays bounded.

`finish()` releases whatever is still held, as the tokenizer decodes it: an output that ends in
the middle of a character ends in U+FFFD, exactly as `tokenizer.decode(output_ids)` would.

For tokenizers whose decode is a concatenation of token bytes (byte-level BPE), the deltas plus
`finish()` equal `tokenizer.decode(output_ids, skip_special_tokens=...)` for valid UTF-8 output.
For SentencePiece-style tokenizers they equal the text the output adds after the prompt, so the
first generated token keeps its leading space.
"""

from collections.abc import Callable, Sequence

from transformers import PreTrainedTokenizerBase

_CONTEXT_TOKENS = 5  # prompt tokens decoded as left context for the first generated token
_MAX_PENDING_TOKENS = 16  # a character is at most 4 bytes; waiting longer means invalid UTF-8
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text deltas, a few ids at a time."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_ids: Sequence[int],
        skip_special_tokens: bool = True,
    ) -> None:
        self._decode_ids = text_decoder(tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._deltas: list[str] = []
        self._finished = False
        self._restart([int(token_id) for token_id in prompt_ids[-_CONTEXT_TOKENS:]])

    @property
    def text(self) -> str:
        """All text emitted so far (by `add` and `finish`)."""
        return "".join(self._deltas)

    def add(self, token_ids: Sequence[int]) -> str:
        """Appends generated ids; returns the text that became final (may be "")."""
        assert not self._finished, "add() after finish()"
        # One id at a time: a chunk may end mid-character while a boundary inside it is clean,
        # and sliding at that boundary keeps the window small.
        delta = "".join([self._push(int(token_id)) for token_id in token_ids])
        self._deltas.append(delta)
        return delta

    def finish(self) -> str:
        """Releases the held-back tail (an unfinished character comes out as U+FFFD)."""
        assert not self._finished, "finish() called twice"
        self._finished = True
        tail = self._decode(self._window)[self._emitted :]
        self._deltas.append(tail)
        return tail

    def _push(self, token_id: int) -> str:
        self._window.append(token_id)
        text = self._decode(self._window)
        stable = len(text.rstrip(_REPLACEMENT_CHAR))
        delta = text[self._emitted : stable]
        self._emitted = max(self._emitted, stable)
        if stable == len(text) and len(text) > self._context_chars:
            # Clean boundary with new text: the tokens since the last boundary become the context.
            self._restart(self._window[self._read :])
        elif len(self._window) - self._read > _MAX_PENDING_TOKENS:
            delta += text[self._emitted :]
            self._restart(self._window[-_CONTEXT_TOKENS:])
        return delta

    def _restart(self, context: list[int]) -> None:
        """Makes `context` the whole window; whatever it decodes to counts as emitted."""
        self._window = context
        self._read = len(context)
        self._context_chars = len(self._decode(context))
        self._emitted = self._context_chars

    def _decode(self, ids: list[int]) -> str:
        return self._decode_ids(ids, self._skip_special_tokens)


Decoder = Callable[[list[int], bool], str]  # (ids, skip_special_tokens) -> text


def text_decoder(tokenizer: PreTrainedTokenizerBase) -> Decoder:
    """``tokenizer.decode`` as a function of (ids, skip_special_tokens); for a Rust-backed
    tokenizer whose decode adds nothing to its backend's, the backend's own.

    The detokenizer decodes two or three times per streamed token, and transformers' wrapper
    (argument conversion, keyword handling) costs twice the Rust decode of a few ids. It adds
    text only through ``clean_up_tokenization_spaces``, or through a subclass's own decode; with
    either, every call goes through it."""
    backend = getattr(tokenizer, "_tokenizer", None)
    owner = next((c for c in type(tokenizer).__mro__ if "_decode" in vars(c)), None)
    plain = (
        backend is not None and owner is not None
        and owner.__name__ in ("TokenizersBackend", "PreTrainedTokenizerFast")
        and type(tokenizer).decode is PreTrainedTokenizerBase.decode
        and not tokenizer.clean_up_tokenization_spaces
    )
    if plain:
        return lambda ids, skip: backend.decode(ids, skip_special_tokens=skip)
    return lambda ids, skip: tokenizer.decode(ids, skip_special_tokens=skip)
