"""The sampling half of a step: final hidden states in, tokens out, on the device.

:mod:`worker_svc.sampler` draws from processed logits and :mod:`worker_svc.logits` holds the
processors; this is where a step's rows meet them. It owns what sampling leaves behind between
steps: each row's last sampled token on the device (``last_tokens``, which a decode launched
before the previous step finished feeds from) and the launched steps whose grammar matchers have
not taken their tokens yet (``lagging``). Both halves of a step come through here: at launch
:meth:`StepSampler.sample` queues the draw without waiting for it; at finish
:meth:`StepSampler.finish` hands the tokens, once on the host, to the token histories, the
matchers and the result.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

from pagewire.v1 import common_pb2
from worker_svc.constraints import Constraints, GrammarState, apply_bitmask
from worker_svc.logits import (
    Penalties,
    allow_only,
    apply_penalties,
    banned_ids,
    bias_tokens,
    logprob_protos,
    mask_tokens,
)
from worker_svc.models.llama import LlamaForCausalLM
from worker_svc.pending_step import PendingStep
from worker_svc.sampler import SamplingBatch, sample
from worker_svc.seq_table import NONE, SequenceTable
from worker_svc.step_inputs import Download
from worker_svc.step_layout import SampleRows

SAMPLED = -2  # host last_token of a row whose last sample lives on the device (in last_tokens)


class StepSampler:
    """Logits of a step's sampling rows, processed in vLLM's order and drawn; owned by the
    :class:`~worker_svc.runner.ModelRunner`, which shares its sequence table with it."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        table: SequenceTable,
        device: torch.device,
        constraints: Constraints | None,
    ) -> None:
        self.model, self.table, self.device = model, table, device
        self.vocab_size = model.cfg.vocab_size
        self.constraints = constraints
        # Launched steps whose matchers have not taken their sampled tokens yet (at most the
        # pipeline's depth): the next constrained step advances them before it fills its mask.
        self.lagging: deque[PendingStep] = deque()
        # Each row's last sampled token, on the device: what a decode feeds when the host has not
        # seen that token yet (the step that sampled it may still be running).
        self.last_tokens = torch.zeros(len(table.last_token), dtype=torch.int32, device=device)

    def reset(self) -> None:
        """Forget the lagging steps (their sequences are gone with the table)."""
        self.lagging.clear()

    def grow(self) -> None:
        """Give ``last_tokens`` a slot for every table row (the table grows as sequences come)."""
        need, have = len(self.table.last_token), len(self.last_tokens)
        if need > have:
            grown = torch.zeros(need, dtype=torch.int32, device=self.device)
            grown[:have] = self.last_tokens
            self.last_tokens = grown

    def sample(
        self, hidden: Tensor, picks: SampleRows, picks_dev: Tensor, pending: PendingStep
    ) -> None:
        """Logits of the sampling rows, processed and drawn on the device; the tokens start their
        way to the host and into ``last_tokens``. Raw logprobs are kept for the rows that ask."""
        t, rows, dev = self.table, picks.rows, self.device
        logits = self._logits(hidden, picks, picks_dev)
        want = np.flatnonzero(t.logprobs[rows] != NONE)
        raw = None
        if len(want):
            raw = logits[torch.from_numpy(want).to(dev, non_blocking=True)].log_softmax(dim=-1)
        self._process(logits, picks, pending)
        batch = SamplingBatch.build(
            t.temperature[rows], t.top_p[rows], t.top_k[rows], t.seed[rows], picks.output_index,
            dev, min_p=t.min_p[rows],
        )
        tokens = sample(logits, batch)
        self.last_tokens[picks_dev[0]] = tokens.to(torch.int32)
        t.last_token[rows] = SAMPLED
        pending.tokens = Download(tokens)
        pending.histories = [
            (int(j), t.extra(rows[j]).history, int(picks.position[j]))
            for j in np.flatnonzero(t.penalized[rows] | t.banning[rows])
        ]
        if pending.grammars:
            self.lagging.append(pending)
        if raw is not None:
            chosen = tokens[torch.from_numpy(want).to(dev, non_blocking=True)]
            pending.logprobs = (raw, chosen, t.logprobs[rows[want]].tolist(), want)

    def finish(self, pending: PendingStep) -> None:
        """Hand a step's sampled tokens, now on the host, to the token histories of its penalized
        rows, to its matchers (unless a later launch already did) and to its result."""
        assert pending.tokens is not None
        result = pending.result
        tokens = pending.tokens.numpy()
        for at, history, position in pending.histories or ():
            assert history is not None
            history.put(position, tokens[at : at + 1])
        self._advance(pending)
        if self.lagging and self.lagging[0] is pending:  # finished in launch order
            self.lagging.popleft()
        result.seq_ids.extend(pending.seq_ids)
        result.token_ids.extend(tokens.tolist())
        if pending.logprobs is not None:
            result.logprobs.extend(_logprob_results(pending.logprobs, len(tokens)))

    def _logits(self, hidden: Tensor, picks: SampleRows, picks_dev: Tensor) -> Tensor:
        """The sampling rows' logits; when they are the first hidden rows (as in a decode-only
        step) a slice, a view, takes the place of the gather."""
        n = len(picks.rows)
        if np.array_equal(picks.hidden_index, np.arange(n)):
            return self.model.logits(hidden[:n])
        return self.model.logits(hidden[picks_dev[1]])

    def _process(self, logits: Tensor, picks: SampleRows, pending: PendingStep) -> None:
        """The logits processors in vLLM's order (see :mod:`worker_svc.logits`), each on the rows
        that need it and only when some row does; the grammar mask after the bans, the min_tokens
        stop mask last so that nothing lifts it back."""
        t, rows = self.table, picks.rows
        penalized = np.flatnonzero(t.penalized[rows])
        if len(penalized):
            apply_penalties(logits, self._penalties(rows, penalized))
        biased = np.flatnonzero(t.biased[rows])
        if len(biased):
            extras = [t.extra(r) for r in rows[biased]]
            bias_tokens(logits, biased, [e.bias_ids for e in extras],
                        [e.bias_values for e in extras])
        restricted = np.flatnonzero(t.restricted[rows])
        if len(restricted):
            allow_only(logits, restricted, [t.extra(r).allowed_ids for r in rows[restricted]])
        banning = np.flatnonzero(t.banning[rows])
        if len(banning):
            mask_tokens(logits, banning, [self._banned(r) for r in rows[banning]])
        constrained = np.flatnonzero(t.constrained[rows])
        if len(constrained):
            self._catch_up()
            pending.grammars = self._constrain(logits, rows, constrained)
        early = np.flatnonzero(picks.output_index < t.min_tokens[rows])
        if len(early):
            mask_tokens(logits, early, [t.extra(r).stop_ids for r in rows[early]])

    def _catch_up(self) -> None:
        """Advance the matchers of launched, unfinished steps by their sampled tokens, oldest
        first. Called once this step's forward pass is queued: on a GPU the host waits for the
        previous step's tokens while the device runs this step's forward, instead of before it."""
        while self.lagging:
            self._advance(self.lagging.popleft())

    @staticmethod
    def _advance(pending: PendingStep) -> None:
        """Each constrained row's matcher takes its sampled token (once per step)."""
        if pending.advanced or not pending.grammars or pending.tokens is None:
            return
        tokens = pending.tokens.numpy()
        for at, grammar in pending.grammars:
            grammar.accept(int(tokens[at]))
        pending.advanced = True

    def _constrain(
        self, logits: Tensor, rows: np.ndarray, constrained: np.ndarray
    ) -> list[tuple[int, GrammarState]]:
        """Mask the constrained rows' logits with their matchers' next-token bitmask (one fill,
        one upload, one batched masked fill); the matchers to advance once the tokens are in."""
        assert self.constraints is not None  # a constrained row exists only with constraints
        states = [t.grammar for t in (self.table.extra(r) for r in rows[constrained])]
        assert all(s is not None for s in states)
        mask = self.constraints.fill(states, constrained.tolist(), len(rows))  # type: ignore[arg-type]
        if self.device.type != "cpu":
            mask = mask.pin_memory().to(self.device, non_blocking=True)
        apply_bitmask(logits, mask, constrained.tolist())
        return list(zip(constrained.tolist(), states, strict=True))  # type: ignore[arg-type]

    def _banned(self, row: int) -> np.ndarray:
        """The ids a row's bad words ban at this draw (from its output so far)."""
        e = self.table.extra(row)
        assert e.history is not None and e.prompt_len is not None  # set by the first sample
        return banned_ids(e.params.bad_words, e.history.split(e.prompt_len)[1])

    def _penalties(self, rows: np.ndarray, penalized: np.ndarray) -> Penalties:
        """The penalized rows' prompt and output token counts and their three penalties."""
        t = self.table
        prompts, outputs = [], []
        sel = rows[penalized]
        for r in sel:
            e = t.extra(r)
            assert e.history is not None and e.prompt_len is not None  # set by the first sample
            prompt, output = e.history.split(e.prompt_len)
            prompts.append(prompt)
            outputs.append(output)
        return Penalties.build(
            penalized, prompts, outputs, t.presence[sel], t.frequency[sel], t.repetition[sel],
            self.vocab_size, self.device,
        )


def _logprob_results(
    logprobs: tuple[Tensor, Tensor, list[int], np.ndarray], num_tokens: int
) -> list[common_pb2.Logprobs]:
    """One Logprobs per sampled token, in result order: filled for the rows that asked, empty for
    the rest (the result's lists are parallel)."""
    raw, chosen, num_top, want = logprobs
    asked = logprob_protos(raw, chosen, num_top)
    out = [common_pb2.Logprobs() for _ in range(num_tokens)]
    for j, lp in zip(want.tolist(), asked, strict=True):
        out[j] = lp
    return out
