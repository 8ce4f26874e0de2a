"""What the worker keeps per sequence, as columns: one row per sequence it holds.

Packed decodes are the bulk of a steady-state step. With the state in arrays, gathering their block
tables, last tokens and sampling parameters is one fancy index per column, and appending their new
blocks is one vectorized write, instead of a loop over sequences. What only a few sequences need
(token history for penalties, prompt-logprob and pooling carry-over between chunks) lives in a
:class:`SeqExtras` object on the row. Rows are reused after release; columns grow by doubling.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2, worker_pb2

if TYPE_CHECKING:
    from worker_svc.constraints import GrammarState

NONE = -1  # "no token yet", "no seed", "no logprobs", "unknown id" in the int columns


class TokenHistory:
    """Token ids by position (prompt, then output) of a sequence with penalties.

    Written by position, not appended, so a chunk re-sent at a position the worker already has
    (the token it sampled, now named explicitly) overwrites instead of duplicating.
    """

    def __init__(self) -> None:
        self.ids = np.full(64, NONE, dtype=np.int64)
        self.n = 0

    def put(self, pos: int, ids: Sequence[int] | np.ndarray) -> None:
        """Set the tokens from ``pos`` on and forget any after them. A gap (a prefix the worker
        never saw, served from the prefix cache) stays NONE and is not counted."""
        end = pos + len(ids)
        if end > len(self.ids):
            grown = np.full(max(end, 2 * len(self.ids)), NONE, dtype=np.int64)
            grown[: self.n] = self.ids[: self.n]
            self.ids = grown
        if pos > self.n:
            self.ids[self.n : pos] = NONE
        self.ids[pos:end] = ids
        self.n = end

    def split(self, prompt_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(prompt ids, output ids) views."""
        cut = min(prompt_len, self.n)
        return self.ids[:cut], self.ids[cut : self.n]


@dataclass
class SeqExtras:
    """Per-sequence state that only some sequences need, or that is not a number."""

    params: SamplingParams
    # Leading tokens that are the prompt. None: everything fed before the first sample.
    prompt_len: int | None
    pooling: int
    stop_ids: np.ndarray  # masked while output_index < min_tokens: eos (unless ignore_eos) + stop ids
    # logit_bias as two aligned arrays (token ids, biases), added to the logits at every sample.
    bias_ids: np.ndarray
    bias_values: np.ndarray
    # allowed_token_ids (empty: every token): all other logits are masked at every sample.
    allowed_ids: np.ndarray
    history: TokenHistory | None = None  # sequences with penalties or bad words only
    # Prompt logprobs: final hidden state of the last position fed, for the next chunk's first token.
    prompt_hidden: Tensor | None = None
    # Pooling: running sum (MEAN) or last hidden state (LAST), float32, and positions summed.
    pooled: Tensor | None = None
    pooled_count: int = 0
    # Structured output: the sequence's grammar matcher (set by the runner when it is sent new).
    grammar: GrammarState | None = None


class SequenceTable:
    """Rows of per-sequence state, addressed by seq_id through ``rows``."""

    _COLUMNS = (
        "num_blocks", "last_token", "temperature", "top_p", "top_k", "min_p", "presence",
        "frequency", "repetition", "min_tokens", "logprobs", "seed", "penalized", "biased",
        "constrained", "restricted", "banning", "rope_delta", "rope_until",
    )

    def __init__(self, eos_token_ids: Sequence[int], capacity: int = 64, width: int = 16) -> None:
        self.eos = np.asarray(eos_token_ids, dtype=np.int64)
        self.rows: dict[int, int] = {}
        self.free: list[int] = list(range(capacity - 1, -1, -1))
        self.extras: list[SeqExtras | None] = [None] * capacity
        self.block_tables = np.zeros((capacity, width), dtype=np.int32)
        self.num_blocks = np.zeros(capacity, dtype=np.int64)
        self.last_token = np.full(capacity, NONE, dtype=np.int64)
        self.temperature = np.ones(capacity, dtype=np.float32)
        self.top_p = np.ones(capacity, dtype=np.float32)
        self.top_k = np.zeros(capacity, dtype=np.int64)
        self.min_p = np.zeros(capacity, dtype=np.float32)
        self.presence = np.zeros(capacity, dtype=np.float32)
        self.frequency = np.zeros(capacity, dtype=np.float32)
        self.repetition = np.ones(capacity, dtype=np.float32)
        self.min_tokens = np.zeros(capacity, dtype=np.int64)
        self.logprobs = np.full(capacity, NONE, dtype=np.int64)
        self.seed = np.full(capacity, NONE, dtype=np.int64)
        self.penalized = np.zeros(capacity, dtype=bool)
        self.biased = np.zeros(capacity, dtype=bool)
        self.constrained = np.zeros(capacity, dtype=bool)  # structured output (a grammar)
        self.restricted = np.zeros(capacity, dtype=bool)  # allowed_token_ids set
        self.banning = np.zeros(capacity, dtype=bool)  # bad_words set (reads the output history)
        # M-RoPE (worker_svc.mrope_positions): from index rope_until on, a token's rotary
        # position is its index + rope_delta (both 0 for sequences without images).
        self.rope_delta = np.zeros(capacity, dtype=np.int64)
        self.rope_until = np.zeros(capacity, dtype=np.int64)

    def clear(self) -> None:
        self.release(list(self.rows))

    def lookup(self, seq_ids: Iterable[int]) -> np.ndarray:
        """Rows of ``seq_ids`` (NONE for a sequence the worker does not hold)."""
        get = self.rows.get
        return np.fromiter((get(s, NONE) for s in seq_ids), dtype=np.int64)

    def release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            row = self.rows.pop(seq_id, None)
            if row is not None:
                self.extras[row] = None
                # Flags the runner checks every step (depends_on_pending, the grammar masks).
                self.penalized[row] = self.constrained[row] = self.banning[row] = False
                self.free.append(row)

    def add(self, s: worker_pb2.SequenceStep) -> int:
        """Hold ``s`` (a ``new`` SequenceStep) from scratch, replacing what was kept for it."""
        self.release([s.seq_id])
        if not self.free:
            self._grow_rows()
        row = self.free.pop()
        self.rows[s.seq_id] = row
        p = SamplingParams.from_proto(s.sampling)
        stop = list(p.stop_token_ids) if p.min_tokens > 0 else []
        if p.min_tokens > 0 and not p.ignore_eos:
            stop += self.eos.tolist()
        self.extras[row] = SeqExtras(
            params=p,
            prompt_len=s.prompt_len or None,
            pooling=s.pooling,
            stop_ids=np.asarray(stop, dtype=np.int64),
            bias_ids=np.asarray([t for t, _ in p.logit_bias], dtype=np.int64),
            bias_values=np.asarray([b for _, b in p.logit_bias], dtype=np.float32),
            allowed_ids=np.asarray(p.allowed_token_ids, dtype=np.int64),
            history=TokenHistory() if p.watches_output else None,
        )
        self.num_blocks[row] = 0
        self.extend_blocks(row, s.block_ids)
        self.last_token[row] = NONE
        self.temperature[row], self.top_p[row], self.top_k[row] = p.temperature, p.top_p, p.top_k
        self.min_p[row], self.min_tokens[row] = p.min_p, p.min_tokens
        self.presence[row], self.frequency[row] = p.presence_penalty, p.frequency_penalty
        self.repetition[row], self.penalized[row] = p.repetition_penalty, p.penalized
        self.biased[row] = bool(p.logit_bias)
        self.restricted[row] = bool(p.allowed_token_ids)
        self.banning[row] = bool(p.bad_words)
        self.constrained[row] = p.structured is not None
        self.logprobs[row] = NONE if p.logprobs is None else p.logprobs
        self.seed[row] = NONE if p.seed is None else p.seed
        self.rope_delta[row] = self.rope_until[row] = 0
        return row

    def extend_blocks(self, row: int, block_ids: Sequence[int]) -> None:
        n, k = int(self.num_blocks[row]), len(block_ids)
        if n + k > self.block_tables.shape[1]:
            self._grow_width(n + k)
        self.block_tables[row, n : n + k] = block_ids
        self.num_blocks[row] = n + k

    def append_blocks(self, rows: np.ndarray, block_ids: np.ndarray) -> None:
        """Append block_ids[i] to rows[i]'s table where block_ids[i] >= 0 (rows distinct)."""
        take = block_ids >= 0
        if not take.any():
            return
        rows, block_ids = rows[take], block_ids[take]
        ends = self.num_blocks[rows]
        if int(ends.max()) + 1 > self.block_tables.shape[1]:
            self._grow_width(int(ends.max()) + 1)
        self.block_tables[rows, ends] = block_ids
        self.num_blocks[rows] = ends + 1

    def extra(self, row: int) -> SeqExtras:
        extras = self.extras[row]
        assert extras is not None, f"row {row} holds no sequence"
        return extras

    def is_embedding(self, row: int) -> bool:
        return self.extra(row).pooling != common_pb2.POOLING_NONE

    def _grow_rows(self) -> None:
        old = len(self.last_token)
        for name in self._COLUMNS:  # add() sets every column of a row it hands out
            col = getattr(self, name)
            setattr(self, name, np.concatenate([col, np.zeros_like(col)]))
        self.block_tables = np.concatenate([self.block_tables, np.zeros_like(self.block_tables)])
        self.extras.extend([None] * old)
        self.free.extend(range(2 * old - 1, old - 1, -1))

    def _grow_width(self, need: int) -> None:
        rows, width = self.block_tables.shape
        grown = np.zeros((rows, max(need, 2 * width)), dtype=np.int32)
        grown[:, :width] = self.block_tables
        self.block_tables = grown
