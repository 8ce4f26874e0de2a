"""The grammar engine: a :class:`~pagewire.structured.StructuredOutput` compiled for a tokenizer.

xgrammar (bench/grammar_engines.py and docs/structured_outputs.md say why it and not llguidance).
The router compiles every spec at validation so a malformed one is refused before anything is
submitted; the worker compiles it again for the model it serves and masks its logits with it. Both
call :class:`Compiler`, so a spec means the same thing on both sides: JSON without free whitespace
(", " and ": " separators: a random-weight or weak model cannot stall in endless whitespace), and
a schema read in strict mode (an object without ``additionalProperties`` allows no other keys, as
OpenAI's ``strict`` schemas do).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

import xgrammar as xgr
from transformers import PreTrainedTokenizerBase

from pagewire import structured as so
from pagewire.structured import SpecError, StructuredOutput

# Compiled grammars kept per compiler (xgrammar's own cache, least recently used evicted): a
# JSON schema over a 128k vocabulary compiles to a few MB at most.
CACHE_BYTES = 256 << 20
_ANY_OBJECT = '{"type": "object"}'
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # "[hh:mm:ss] /project/cpp/file.cc:94: "
MAX_ERROR_CHARS = 300


class Compiler:
    """Compiles specs for one tokenizer (and the model's vocabulary size, which may exceed the
    tokenizer's: padding ids are never allowed). Thread-safe; the cache is shared by threads."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        vocab_size: int,
        stop_token_ids: Sequence[int] = (),
        threads: int = 1,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        stops = list(stop_token_ids) or None  # None: the tokenizer's own EOS
        self.info = xgr.TokenizerInfo.from_huggingface(
            tokenizer, vocab_size=vocab_size, stop_token_ids=stops
        )
        self.vocab_size = vocab_size
        self._xgr = xgr.GrammarCompiler(
            self.info, max_threads=threads, cache_enabled=True, cache_limit_bytes=cache_bytes
        )

    def compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        """The compiled grammar; SpecError with the engine's reason when the spec is malformed."""
        so.check(spec)
        try:
            return self._compile(spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise SpecError(_reason(e)) from None

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        c = self._xgr
        if spec.kind == so.JSON_SCHEMA:
            schema = json.dumps(bounded_strings_as_patterns(json.loads(spec.spec)))
            return c.compile_json_schema(schema, any_whitespace=False)
        if spec.kind == so.JSON_OBJECT:
            return c.compile_json_schema(_ANY_OBJECT, any_whitespace=False, strict_mode=False)
        if spec.kind == so.REGEX:
            return c.compile_regex(spec.spec)
        if spec.kind == so.CHOICE:
            # EBNF string literals take JSON's escapes, so each choice is matched literally.
            alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in so.choice_list(spec.spec))
            return c.compile_grammar("root ::= " + alts)
        return c.compile_grammar(spec.spec)


def bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with every length-bounded string (minLength / maxLength, no pattern or format)
    rewritten as the same bounds on a pattern of characters that need no escape.

    xgrammar 0.2.9 compiles a length-bounded string to a rule that admits raw control characters
    (U+0000-U+001F), which JSON forbids inside strings (json.loads refuses the output). The pattern
    admits only what JSON allows unescaped, minus the quote and the backslash: the output is valid
    JSON of the same length bounds, its strings just never use escapes.
    """
    if isinstance(schema, list):
        return [bounded_strings_as_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded_strings_as_patterns(v) for k, v in schema.items()}
    bounded = "minLength" in out or "maxLength" in out
    if out.get("type") == "string" and bounded and not {"pattern", "format"} & out.keys():
        lo, hi = out.pop("minLength", 0), out.pop("maxLength", "")
        out["pattern"] = f'^[^\\x00-\\x1f"\\\\]{{{lo},{hi}}}$'
    return out


def matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    """A fresh matcher at the start of the output."""
    return xgr.GrammarMatcher(compiled)


def _reason(e: Exception) -> str:
    text = _LOCATION.sub("", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    return text[:MAX_ERROR_CHARS]
