"""Structured-output constraints on the worker: one grammar matcher per constrained sequence.

The worker's matchers are a cache the scheduler can rebuild, like the rest of its state: a
sequence sent ``new`` carries its spec (in SamplingParams) and its output tokens so far
(SequenceStep.output_ids); the matcher is rebuilt by replaying them. That covers the first sight, a
recompute after preemption, another worker after a loss and a restarted scheduler alike.

Compiling is off the step: it starts on a thread when the ``new`` SequenceStep arrives, so it runs
while the step's prefill computes; the first mask waits for what is left of it (nothing, for a spec
compiled before: the compiler keeps an LRU cache per spec). Per step, :meth:`Constraints.fill`
writes one row of a ``[S, ceil(V/32)]`` int32 bitmask per constrained row with the engine's native
fill (C++, threaded over the rows; no Python over the vocabulary), and after the draw
:meth:`GrammarState.accept` advances each matcher by its token.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from pagewire.structured import StructuredOutput

if TYPE_CHECKING:  # imported on first use: a worker that never sees a constraint never loads it
    import xgrammar as xgr

    from pagewire.grammar import Compiler

log = logging.getLogger(__name__)
# Threads for the batched mask fill: a few rows each; more than 8 buys nothing at 64 rows.
FILL_THREADS = max(1, min(8, (os.cpu_count() or 2) // 2))


class GrammarState:
    """One sequence's matcher: compiled in the background, then replayed to its output so far."""

    def __init__(self, compiled: Future[xgr.CompiledGrammar], output_ids: Sequence[int]) -> None:
        self._compiled = compiled
        self._replay = list(output_ids)
        self._matcher: xgr.GrammarMatcher | None = None
        self.broken = False  # the spec did not compile, or a token was refused: only EOS allowed

    def matcher(self) -> xgr.GrammarMatcher | None:
        """The matcher at the current position (waits for the compile on first use)."""
        if self._matcher is None and not self.broken:
            try:
                compiled = self._compiled.result()
                # Only now: the compile thread has imported the engine (and transformers, whose
                # lazy module is not safe to import from two threads at once).
                from pagewire.grammar import matcher

                m = matcher(compiled)
            except Exception as e:  # the router compiled it: a bad spec here, or no tokenizer
                log.error("structured output failed to compile on the worker: %s", e)
                self.broken = True
                return None
            for t in self._replay:
                if not m.accept_token(t):
                    log.error("replay refused token %d; the sequence can only end now", t)
                    self.broken = True
                    return None
            self._matcher, self._replay = m, []
        return self._matcher

    @property
    def done(self) -> bool:
        """The matcher accepted end-of-sequence: further tokens are discarded by the scheduler."""
        return self._matcher is not None and self._matcher.is_terminated()

    def accept(self, token: int) -> None:
        m = self._matcher
        if m is None or self.broken or m.is_terminated():
            return
        if not m.accept_token(token):
            log.error("matcher refused sampled token %d; the sequence can only end now", token)
            self.broken = True


class Constraints:
    """The worker's compiler and the per-step bitmask fill."""

    def __init__(self, model_dir: str | Path, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.model_dir, self.vocab_size = str(model_dir), vocab_size
        self.eos = list(eos_token_ids)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")
        # Importing transformers and loading the tokenizer and the engine's vocabulary table
        # is 1-2 s of Python holding the GIL: started now, on its own thread, so it overlaps the
        # weights' load (torch releases the GIL) and is done before the first step
        # (:meth:`built`); the first steps beside it ran 2-10x slower.
        self._compiler: Future[Compiler] = self._pool.submit(self._build)
        self._batch: xgr.BatchGrammarMatcher | None = None
        self._width = (vocab_size + 31) // 32
        self._eos_only = torch.zeros(self._width, dtype=torch.int32)
        for t in self.eos:
            self._eos_only[t // 32] |= _bit(t % 32)

    async def built(self) -> None:
        """Return once the compiler is built, or failed to (the first request says why)."""
        with contextlib.suppress(Exception):
            await asyncio.wrap_future(self._compiler)

    def start(self, spec: StructuredOutput, output_ids: Sequence[int]) -> GrammarState:
        """Begin compiling ``spec`` (cached per spec) for a sequence sent ``new``."""
        return GrammarState(self._pool.submit(self._compile, spec), output_ids)

    def fill(self, states: Sequence[GrammarState], rows: Sequence[int], batch: int) -> Tensor:
        """The step's bitmask [batch, ceil(V/32)] int32 on the host (bit set: token allowed):
        row rows[i] from states[i], every other row all ones. A finished sequence (its next token
        is discarded) allows everything; a broken one only EOS."""
        mask = torch.full((batch, self._width), -1, dtype=torch.int32)
        live, at = [], []
        for row, s in zip(rows, states, strict=True):
            m = s.matcher()
            if m is None:
                mask[row] = self._eos_only
            elif not m.is_terminated():
                live.append(m)
                at.append(row)
        if live:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)
            self._batch.batch_fill_next_token_bitmask(live, mask, at)
        return mask

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _build(self) -> Compiler:
        from transformers import AutoTokenizer

        from pagewire.grammar import Compiler

        return Compiler(AutoTokenizer.from_pretrained(self.model_dir), self.vocab_size, self.eos)

    def _compile(self, spec: StructuredOutput) -> xgr.CompiledGrammar:
        return self._compiler.result().compile(spec)


def _bit(i: int) -> int:
    """Bit i of an int32 word as a Python int in int32 range (bit 31 is the sign bit)."""
    return (1 << i) - (1 << 32) * (i == 31)


def apply_bitmask(logits: Tensor, bitmask: Tensor, rows: Sequence[int]) -> None:
    """In place: logits[r, t] = -inf for r in rows where bit t of bitmask[r] is clear: one batched
    masked fill over the constrained rows: xgrammar's fused kernel (C++ on the CPU, its CUDA /
    Triton kernel on a GPU; ``bitmask`` on the logits' device). The oracle it is tested against is
    kernels.reference.apply_token_bitmask."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1], indices=list(rows))
