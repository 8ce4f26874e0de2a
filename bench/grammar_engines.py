"""Grammar engines side by side: xgrammar and llguidance, compile time and mask-fill time.

For each tokenizer (the test model's 1024-token BPE, and a 128k-token byte-level vocabulary built
here from the committed corpus, Llama-3 sized) and each constraint (a nested JSON schema, a regex,
a choice), it measures:

- compile: spec -> ready matcher (the engine's compile + first matcher), cold (cache off);
- fill: one ``fill_next_token_bitmask`` at each position of a valid output walked token by token
  (the per-token, per-sequence cost the worker pays each step), median and p90 in microseconds;
- batch fill: 64 matchers at the same positions filled by the engine's batched call (xgrammar
  ``BatchGrammarMatcher``, llguidance ``fill_next_token_bitmask_par``), per step;
- rollback: whether ``rollback(k)`` after accepting k tokens gives the same mask as before.

    python bench/grammar_engines.py --out bench/results/grammar_engines.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

import llguidance
import llguidance.hf
import llguidance.torch as llt
import torch
import xgrammar as xgr
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from pagewire.testmodel import make_model

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 10}, "zip": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "address"],
    "additionalProperties": False,
}
SCHEMA_TEXT = (
    '{"name": "Ada Lovelace", "age": 36, "role": "admin", "tags": ["math", "poet"], '
    '"address": {"city": "London", "zip": "W1"}}'
)
REGEX = r"\d{3}-\d{3}-\d{4} \([A-Z][a-z]{2,9}\)"
REGEX_TEXT = "555-123-4567 (Boston)"
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
CASES = {
    "json_schema": ("json", json.dumps(SCHEMA), SCHEMA_TEXT),
    "regex": ("regex", REGEX, REGEX_TEXT),
    "choice": ("choice", json.dumps(CHOICES), "mixed feelings"),
}
BATCH = 64


def big_tokenizer(size: int = 128_256) -> PreTrainedTokenizerFast:
    """A byte-level BPE vocabulary of ``size`` tokens: the 256 byte symbols, then the corpus's most
    frequent substrings (with and without a leading space), then seeded random strings. No merges
    are needed: the engines read only the token strings, as they do for Llama 3's 128k vocab."""
    corpus = (Path(__file__).parent.parent / "pagewire" / "testmodel_corpus.txt").read_text()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_map = {chr(b): c for b, c in zip(range(256), sorted(alphabet, key=_byte_of), strict=True)}
    counts: Counter[str] = Counter()
    for word in corpus.split():
        for n in range(2, min(len(word), 12) + 1):
            for i in range(len(word) - n + 1):
                counts[word[i : i + n]] += 1
                if i == 0:
                    counts[" " + word[:n]] += 1
    vocab = {"<|end_of_text|>": 0}
    for c in sorted(alphabet, key=_byte_of):
        vocab.setdefault(c, len(vocab))
    for s, _ in counts.most_common():
        if len(vocab) >= size:
            break
        vocab.setdefault("".join(byte_map.get(ch, ch) for ch in s), len(vocab))
    rng = random.Random(0)
    pool = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:;\"'{}[]-_"
    while len(vocab) < size:
        s = "".join(rng.choice(pool) for _ in range(rng.randint(2, 8)))
        vocab.setdefault("".join(byte_map.get(ch, ch) for ch in s), len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>")


def _byte_of(c: str) -> int:
    """The byte a ByteLevel alphabet symbol stands for (GPT-2's bytes_to_unicode inverse)."""
    o = ord(c)
    if 33 <= o <= 126 or 161 <= o <= 172 or 174 <= o <= 255:
        return o
    return {v: k for k, v in _gpt2_extra().items()}[o]


def _gpt2_extra() -> dict[int, int]:
    bs = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    out, n = {}, 0
    for b in range(256):
        if b not in bs:
            out[b] = 256 + n
            n += 1
    return out


def _walk(engine, kind: str, spec: str, tok: PreTrainedTokenizerFast, text: str) -> list[int]:
    """The tokens a model would emit for ``text`` under the engine's mask: at each position the
    longest allowed token that continues the text (an engine may allow only the canonical split
    of a forced string, so the path is the engine's own)."""
    strings = [tok.convert_tokens_to_string([t]) for t in tok.convert_ids_to_tokens(range(len(tok)))]
    m = engine.compile(kind, spec)
    mask = engine.bitmask(1)
    ids, i = [], 0
    while i < len(text):
        engine.fill(m, mask, 0)
        bits = mask[0]
        best = max(
            (j for j, s in enumerate(strings) if s and text.startswith(s, i)
             and (bits[j // 32] >> (j % 32)) & 1),
            key=lambda j: len(strings[j]),
        )
        assert engine.accept(m, best)
        ids.append(best)
        i += len(strings[best])
    return ids


class Xgr:
    name = "xgrammar 0.2.9"

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=len(tok))
        self.vocab = len(tok)

    def compile(self, kind: str, spec: str):
        c = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        if kind == "json":
            g = c.compile_json_schema(spec, any_whitespace=False)
        elif kind == "regex":
            g = c.compile_regex(spec)
        else:
            alts = " | ".join(json.dumps(s) for s in json.loads(spec))
            g = c.compile_grammar(f"root ::= {alts}")
        return xgr.GrammarMatcher(g)

    def fork(self, m, compiled_from):
        return xgr.GrammarMatcher(m.compiled) if hasattr(m, "compiled") else compiled_from()

    def bitmask(self, n: int) -> torch.Tensor:
        return xgr.allocate_token_bitmask(n, self.vocab)

    def fill(self, m, mask: torch.Tensor, row: int) -> None:
        m.fill_next_token_bitmask(mask, row)

    def accept(self, m, t: int) -> bool:
        return m.accept_token(t)

    def batch_fill(self, ms, mask: torch.Tensor) -> None:
        self._batch = getattr(self, "_batch", None) or xgr.BatchGrammarMatcher(max_threads=2)
        self._batch.batch_fill_next_token_bitmask(ms, mask)

    def rollback(self, m, k: int) -> None:
        m.rollback(k)


class Llg:
    name = "llguidance 1.9.1"

    def __init__(self, tok: PreTrainedTokenizerFast) -> None:
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=len(tok))
        self.vocab = len(tok)
        self.executor = llguidance.LLExecutor(2)

    def compile(self, kind: str, spec: str):
        if kind == "json":
            g = llguidance.LLMatcher.grammar_from_json_schema(
                spec, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
            )
        elif kind == "regex":
            g = llguidance.LLMatcher.grammar_from_regex(spec)
        else:
            g = llguidance.grammar_from("lark", "start: " + " | ".join(
                json.dumps(s) for s in json.loads(spec)))
        m = llguidance.LLMatcher(self.tok, g)
        assert not m.is_error(), m.get_error()
        return m

    def bitmask(self, n: int) -> torch.Tensor:
        return llt.allocate_token_bitmask(n, self.vocab)

    def fill(self, m, mask: torch.Tensor, row: int) -> None:
        llt.fill_next_token_bitmask(m, mask, row)

    def accept(self, m, t: int) -> bool:
        return m.consume_token(t)

    def batch_fill(self, ms, mask: torch.Tensor) -> None:
        llt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(ms)], mask)

    def rollback(self, m, k: int) -> None:
        m.rollback(k)


def measure(engine, kind: str, spec: str, ids: list[int]) -> dict[str, object]:
    t0 = time.perf_counter()
    engine.compile(kind, spec)
    compile_ms = (time.perf_counter() - t0) * 1e3
    m = engine.compile(kind, spec)
    mask = engine.bitmask(1)
    fills = []
    for t in ids:
        t0 = time.perf_counter()
        engine.fill(m, mask, 0)
        fills.append((time.perf_counter() - t0) * 1e6)
        assert engine.accept(m, t)
    ms = [engine.compile(kind, spec) for _ in range(BATCH)]
    big = engine.bitmask(BATCH)
    steps = []
    for t in ids:
        t0 = time.perf_counter()
        engine.batch_fill(ms, big)
        steps.append((time.perf_counter() - t0) * 1e6)
        for x in ms:
            engine.accept(x, t)
    # Rollback: accept k tokens, roll them back, the mask must equal the one before.
    r = engine.compile(kind, spec)
    k = max(1, len(ids) // 2)
    before, after = engine.bitmask(1), engine.bitmask(1)
    for t in ids[:k]:
        engine.accept(r, t)
    engine.fill(r, before, 0)
    for t in ids[k:]:
        engine.accept(r, t)
    engine.rollback(r, len(ids) - k)
    engine.fill(r, after, 0)
    fills.sort()
    return {
        "tokens": len(ids),
        "compile_ms": round(compile_ms, 2),
        "fill_us_median": round(statistics.median(fills), 1),
        "fill_us_p90": round(fills[int(0.9 * (len(fills) - 1))], 1),
        "batch64_step_us_median": round(statistics.median(steps), 1),
        "rollback_exact": bool(torch.equal(before, after)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/grammar_engines.json")
    ap.add_argument("--model-dir", default=str(Path.home() / ".cache/pagewire/models/tiny-seed0"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    small = PreTrainedTokenizerFast.from_pretrained(str(make_model(args.model_dir)))
    tokenizers = {"test model (1024)": small, "byte-level 128k": big_tokenizer()}
    rows = []
    for tname, tok in tokenizers.items():
        engines = [Xgr(tok), Llg(tok)]
        for case, (kind, spec, text) in CASES.items():
            for engine in engines:
                ids = _walk(engine, kind, spec, tok, text)
                row = {"tokenizer": tname, "vocab": len(tok), "case": case, "engine": engine.name}
                row.update(measure(engine, kind, spec, ids))
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    print(table(rows))


def table(rows: list[dict]) -> str:
    head = ("| tokenizer | case | engine | compile ms | fill µs median / p90 | 64-row step µs "
            "| rollback exact |\n|---|---|---|---:|---:|---:|---|")
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['case']} | {r['engine']} | {r['compile_ms']} | "
            f"{r['fill_us_median']} / {r['fill_us_p90']} | {r['batch64_step_us_median']} | "
            f"{r['rollback_exact']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
