"""The model runner: turns a Step into tensors, runs the model over the paged KV cache, samples.

It keeps one cache between steps, the per-sequence state (:class:`SequenceTable`: block table,
sampling parameters, the token it sampled last). The scheduler can always rebuild it by resending a
sequence with ``new`` set, which is what keeps the worker's API stateless. Packed decodes
(``Step.decodes``) are handled as columns: gathering their state, appending their blocks and
building positions, slots and block tables are array ops. The Python loop is over the step's
SequenceSteps (prefill chunks and resends) only; everything per token is an array or tensor op.

A step runs in two halves so that the GPU never waits for Python: :meth:`ModelRunner.launch`
lays the step out, sends its inputs in one packed copy and queues the forward pass and the
sampling; :meth:`ModelRunner.finish` waits for the sampled tokens (copied back asynchronously)
and builds the result. The worker launches step N+1 before finishing step N when the scheduler
has sent it: a decode's input token is then the one step N sampled, read on the device from
``last_tokens``, never through the host.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels import AttentionBackend
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc import prompt_outputs
from worker_svc.constraints import Constraints, GrammarState, apply_bitmask
from worker_svc.cuda_graphs import DecodeGraphs, pad_columns
from worker_svc.encoder_cache import EncoderCache
from worker_svc.logits import (
    Penalties,
    allow_only,
    apply_penalties,
    banned_ids,
    bias_tokens,
    logprob_protos,
    mask_tokens,
)
from worker_svc.models.llama import AttentionMetadata, LlamaForCausalLM
from worker_svc.mrope_positions import MropePositions
from worker_svc.sampler import SamplingBatch, sample
from worker_svc.seq_table import NONE, SequenceTable, TokenHistory
from worker_svc.step_inputs import Download, Uploader, pack, unpack
from worker_svc.step_layout import SampleRows, StepLayout, layout, sample_rows, token_columns

SAMPLED = -2  # host last_token of a row whose last sample lives on the device (in last_tokens)


def allocate_kv_cache(
    model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    cfg = model.cfg
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_hidden_layers)
    ]


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    cfg = model.cfg
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


@dataclass
class PendingStep:
    """A launched step: what :meth:`ModelRunner.finish` needs to build its result."""

    step: worker_pb2.Step
    result: worker_pb2.StepResult  # prompt outputs already in
    started: float
    seq_ids: list[int]  # sequences that sampled, in result order
    ran: bool = False  # the step had work (its result reports compute time)
    tokens: Download | None = None
    logprobs: tuple[Tensor, Tensor, list[int], np.ndarray] | None = None  # raw, chosen, k, rows
    # Penalized rows: their token histories (captured at launch) and the sampled positions.
    histories: list[tuple[int, TokenHistory | None, int]] | None = None
    # Constrained rows: (row in the result, matcher) to advance by the sampled token, once.
    grammars: list[tuple[int, GrammarState]] | None = None
    advanced: bool = False

    def ready(self) -> bool:
        """The sampled tokens are on the host (finish() will not block)."""
        return self.tokens is None or self.tokens.ready()

    def wait(self) -> None:
        if self.tokens is not None:
            self.tokens.wait()


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[Tensor, Tensor]],
        block_size: int,
        backend: AttentionBackend,
        device: torch.device,
        eos_token_ids: Sequence[int] = (),
        graphs: DecodeGraphs | None = None,
        constraints: Constraints | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.vocab_size = model.cfg.vocab_size
        self.table = SequenceTable(eos_token_ids)
        self.graphs = graphs
        self.constraints = constraints  # None: structured output is not served (no tokenizer)
        # Launched steps whose matchers have not taken their sampled tokens yet (at most the
        # pipeline's depth): the next constrained step advances them before it fills its mask.
        self.lagging: deque[PendingStep] = deque()
        self.uploader = Uploader(device)
        self.encoder = EncoderCache(model.vision, device)
        self.mrope = (MropePositions(model.vision.cfg.merge)  # type: ignore[union-attr]
                      if model.cfg.mrope_section else None)
        # Each row's last sampled token, on the device: what a decode feeds when the host has not
        # seen that token yet (the step that sampled it may still be running).
        self.last_tokens = torch.zeros(len(self.table.last_token), dtype=torch.int32,
                                       device=device)

    def reset(self) -> None:
        """Forget every sequence (a new scheduler stream starts from scratch)."""
        self.table.clear()
        self.encoder.clear()
        self.lagging.clear()

    def execute(self, step: worker_pb2.Step) -> worker_pb2.StepResult:
        return self.finish(self.launch(step))

    def depends_on_pending(self, step: worker_pb2.Step) -> bool:
        """Whether ``step`` reads host state that a launched, unfinished step writes: the token
        histories of penalized sequences and of those with bad words (their penalties and bans
        need the last token on the host). Constrained sequences need their last token on the host
        too, but only to sample: their step is launched, and waits inside (:meth:`_catch_up`) once
        its forward pass is queued."""
        t = self.table
        if not (t.penalized.any() or t.banning.any()):  # none held: the common case
            return False
        waits = t.penalized | t.banning
        rows = t.lookup(step.decodes.seq_ids)
        if len(rows) and waits[rows[rows != NONE]].any():
            return True
        return any(
            (row := t.rows.get(s.seq_id)) is not None and bool(waits[row]) for s in step.seqs
        )

    @torch.inference_mode()
    def launch(self, step: worker_pb2.Step) -> PendingStep:
        """Lay out, upload, run and sample ``step`` without waiting for the device."""
        t0 = time.perf_counter()
        table, seqs, d = self.table, step.seqs, step.decodes
        table.release(step.release_seq_ids)
        self.encoder.release(step.release_seq_ids)
        drows = table.lookup(d.seq_ids)
        result = worker_pb2.StepResult(step_id=step.step_id)
        pending = PendingStep(step, result, t0, [])
        unknown = self._unknown(step, drows)
        if unknown:
            result.unknown_seq_ids.extend(unknown)
            return pending
        if not seqs and not len(drows):
            return pending
        pending.ran = True
        srows = self._apply_seqs(seqs)
        self._grow_last_tokens()
        if len(d.new_block_ids):
            table.append_blocks(drows, np.asarray(d.new_block_ids, dtype=np.int64))
        lay = layout(step, drows, srows)
        cu = np.zeros(len(lay.lens) + 1, dtype=np.int64)
        np.cumsum(lay.lens, out=cu[1:])
        sampled = [i for i, s in enumerate(seqs) if s.sample and not table.is_embedding(srows[i])]
        picks = sample_rows(step, lay, cu, sampled)
        embeds = self.encoder.step_embeds(seqs, cu[lay.slot]) if seqs else None
        hidden, picks_dev = self._forward(lay, cu, picks, bool(seqs), embeds)
        prompt_outputs.add_to_result(self.table, seqs, srows, cu[lay.slot], hidden,
                                     self.model.logits, self.vocab_size, result)
        if len(picks.rows):
            pending.seq_ids = [*d.seq_ids, *(seqs[i].seq_id for i in sampled)]
            self._sample(hidden, picks, picks_dev, pending)
        return pending

    @torch.inference_mode()
    def finish(self, pending: PendingStep) -> worker_pb2.StepResult:
        """Wait for ``pending``'s sampled tokens; its result."""
        result = pending.result
        if pending.tokens is not None:
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
                raw, chosen, num_top, want = pending.logprobs
                asked = logprob_protos(raw, chosen, num_top)
                out = [common_pb2.Logprobs() for _ in range(len(tokens))]
                for j, lp in zip(want.tolist(), asked, strict=True):
                    out[j] = lp
                result.logprobs.extend(out)
        if pending.ran:
            result.compute_ms = (time.perf_counter() - pending.started) * 1e3
        return result

    def _grow_last_tokens(self) -> None:
        need, have = len(self.table.last_token), len(self.last_tokens)
        if need > have:
            grown = torch.zeros(need, dtype=torch.int32, device=self.device)
            grown[:have] = self.last_tokens
            self.last_tokens = grown

    def _unknown(self, step: worker_pb2.Step, drows: np.ndarray) -> list[int]:
        """Sequences this step names that the worker cannot run (never seen, or nothing to feed)."""
        table, unknown = self.table, []
        for s in step.seqs:
            if s.new:
                continue
            row = table.rows.get(s.seq_id)
            if row is None or (not s.token_ids and table.last_token[row] == NONE):
                unknown.append(s.seq_id)
        if len(drows):
            bad = drows == NONE
            bad[~bad] = table.last_token[drows[~bad]] == NONE
            if bad.any():
                unknown.extend(np.asarray(step.decodes.seq_ids, dtype=np.uint64)[bad].tolist())
        return unknown

    def _apply_seqs(self, seqs: Sequence[worker_pb2.SequenceStep]) -> np.ndarray:
        """Take in the SequenceSteps (new ones, appended blocks, tokens for penalties); their rows.
        A sequence sent without a prompt length gets one at its first sample: all fed so far."""
        table = self.table
        rows = np.empty(len(seqs), dtype=np.int64)
        for i, s in enumerate(seqs):
            row = table.add(s) if s.new else table.rows[s.seq_id]
            if s.new:
                self.encoder.put(s.seq_id, s.images)
                if self.mrope is not None:
                    self.mrope.put(table, row, s.images)
            else:
                table.extend_blocks(row, s.block_ids)
            e = table.extra(row)
            if s.new and e.params.structured is not None:
                if self.constraints is None:
                    raise ValueError("structured output needs the worker's Constraints")
                e.grammar = self.constraints.start(e.params.structured, s.output_ids)
            if e.history is not None and s.token_ids:
                e.history.put(s.start_pos, s.token_ids)
            if s.sample and e.prompt_len is None:
                e.prompt_len = s.start_pos + max(len(s.token_ids), 1)
            rows[i] = row
        return rows

    def _forward(
        self, lay: StepLayout, cu: np.ndarray, picks: SampleRows, has_seqs: bool,
        embeds: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Run the model; every token's final hidden state [T, H] (slot i is tokens cu[i] ..
        cu[i+1]) and, on the device, the sampling rows' table rows and hidden-state indices
        ([2, S], sent in the same copy). A decode-only batch that fits a captured graph replays
        it. ``embeds``: image features that replace placeholder tokens' embeddings."""
        n, rows, num_decode = len(lay.lens), lay.rows, lay.num_decode
        owner, positions, slots, block_tables = token_columns(lay, cu, self.table, self.block_size)
        rope_3d = None  # M-RoPE: [3, T] positions of a step with image placeholders
        if self.mrope is not None:
            positions, rope_3d = self.mrope.positions(positions, owner, lay, self.table)
        width, ctx = block_tables.shape[1], lay.starts + lay.lens
        graphs = self.graphs
        if graphs is not None and embeds is None and num_decode == n and graphs.fits(n, width):
            cols = pad_columns(n, graphs.bucket(n), lay.ids, rows, positions, slots, ctx)
            packed, _ = pack(*cols, np.empty(0), block_tables, picks.rows, picks.hidden_index)
            buf = self.uploader.put(packed)
            hidden = graphs.run(buf, n, width, self.last_tokens)
            # The graph's output buffer is overwritten by the next replay: prompt outputs, which
            # may keep a hidden state across steps, get their own copy.
            sampling = buf[len(packed) - 2 * len(picks.rows) :].view(2, -1)
            return (hidden.clone() if has_seqs else hidden), sampling
        packed, sizes = pack(lay.ids, rows[owner], positions, slots, ctx,
                             cu[num_decode:] - cu[num_decode], block_tables,
                             np.stack([picks.rows, picks.hidden_index]))
        t = unpack(self.uploader.put(packed), sizes, width)
        meta = AttentionMetadata(
            slot_mapping=t.slots.long(),
            block_tables=t.block_tables,
            context_lens=t.context_lens,
            cu_seqlens_q=t.cu_seqlens_q,
            num_decode=num_decode,
            backend=self.backend,
        )
        rope_pos = t.positions if rope_3d is None else torch.from_numpy(rope_3d).to(self.device)
        hidden = self.model(t.token_ids(self.last_tokens), rope_pos, self.kv_caches, meta, embeds)
        return hidden, t.sampling.view(2, -1)

    def _sample(
        self, hidden: Tensor, picks: SampleRows, picks_dev: Tensor, pending: PendingStep
    ) -> None:
        """Logits of the sampling rows, processed and drawn on the device; the tokens start their
        way to the host and into ``last_tokens``. Raw logprobs are kept for the rows that ask."""
        t, rows, dev = self.table, picks.rows, self.device
        n = len(rows)
        if np.array_equal(picks.hidden_index, np.arange(n)):
            logits = self.model.logits(hidden[:n])
        else:
            logits = self.model.logits(hidden[picks_dev[1]])
        want = np.flatnonzero(t.logprobs[rows] != NONE)
        raw = None
        if len(want):
            raw = logits[torch.from_numpy(want).to(dev, non_blocking=True)].log_softmax(dim=-1)
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
