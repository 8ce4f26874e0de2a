"""The model runner: turns a Step into tensors, runs the model over the paged KV cache, samples.

The runner is sequence intake, layout and the forward pass; the sampling half of a step (logits
processors, the draw, the tokens' way back) is its :class:`~worker_svc.step_sampling.StepSampler`,
and a launched step is a :class:`~worker_svc.pending_step.PendingStep`.

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
the sampler's ``last_tokens``, never through the host.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from kernels import AttentionBackend
from pagewire.v1 import worker_pb2
from worker_svc import prompt_outputs
from worker_svc.constraints import Constraints
from worker_svc.cuda_graphs import DecodeGraphs, pad_columns
from worker_svc.encoder_cache import EncoderCache
from worker_svc.models.llama import AttentionMetadata, LlamaForCausalLM
from worker_svc.mrope_positions import MropePositions
from worker_svc.pending_step import PendingStep
from worker_svc.seq_table import NONE, SequenceTable
from worker_svc.step_inputs import Uploader, pack, unpack
from worker_svc.step_layout import SampleRows, StepLayout, layout, sample_rows, token_columns
from worker_svc.step_sampling import StepSampler

# Names other modules import from here (the step loop, the server, tests, benchmarks), whose
# homes are now pending_step.py and step_sampling.py.
__all__ = ["ModelRunner", "PendingStep", "allocate_kv_cache", "kv_block_bytes"]


def allocate_kv_cache(
    model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[Tensor, Tensor]]:
    """One (key, value) pair of zeroed cache tensors per layer, [blocks, block size, KV heads,
    head dim]: the layout the attention backends and the block tables address."""
    cfg = model.cfg
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.num_hidden_layers)
    ]


def kv_block_bytes(model: LlamaForCausalLM, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one KV block takes over all layers: what the worker sizes its cache by."""
    cfg = model.cfg
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim
    return per_token * block_size * torch.empty((), dtype=dtype).element_size()


class ModelRunner:
    """One worker's model, KV cache and held sequences; steps in, results out (in two halves)."""

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
        self.uploader = Uploader(device)
        self.encoder = EncoderCache(model.vision, device)
        self.mrope = (MropePositions(model.vision.cfg.merge)  # type: ignore[union-attr]
                      if model.cfg.mrope_section else None)
        self.sampler = StepSampler(model, self.table, device, constraints)

    def reset(self) -> None:
        """Forget every sequence (a new scheduler stream starts from scratch)."""
        self.table.clear()
        self.encoder.clear()
        self.sampler.reset()

    def execute(self, step: worker_pb2.Step) -> worker_pb2.StepResult:
        return self.finish(self.launch(step))

    def depends_on_pending(self, step: worker_pb2.Step) -> bool:
        """Whether ``step`` reads host state that a launched, unfinished step writes: the token
        histories of penalized sequences and of those with bad words (their penalties and bans
        need the last token on the host). Constrained sequences need their last token on the host
        too, but only to sample: their step is launched, and waits inside
        (:meth:`StepSampler._catch_up`) once its forward pass is queued."""
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
        self.sampler.grow()
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
            self.sampler.sample(hidden, picks, picks_dev, pending)
        return pending

    @torch.inference_mode()
    def finish(self, pending: PendingStep) -> worker_pb2.StepResult:
        """Wait for ``pending``'s sampled tokens; its result."""
        result = pending.result
        if pending.tokens is not None:
            self.sampler.finish(pending)
        if pending.ran:
            result.compute_ms = (time.perf_counter() - pending.started) * 1e3
        return result

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
            hidden = graphs.run(buf, n, width, self.sampler.last_tokens)
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
            every_slot_stored=bool((slots >= 0).all()),
        )
        rope_pos = t.positions if rope_3d is None else torch.from_numpy(rope_3d).to(self.device)
        hidden = self.model(t.token_ids(self.sampler.last_tokens), rope_pos, self.kv_caches, meta, embeds)
        return hidden, t.sampling.view(2, -1)
