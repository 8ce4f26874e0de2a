"""The model runner: turns a Step into tensors, runs the model over the paged KV cache, samples.

It keeps one cache between steps, the per-sequence state (:class:`SequenceTable`: block table,
sampling parameters, the token it sampled last). The scheduler can always rebuild it by resending a
sequence with ``new`` set, which is what keeps the worker's API stateless. Packed decodes
(``Step.decodes``) are handled as columns: gathering their state, appending their blocks and
building positions, slots and block tables are array ops. The Python loop is over the step's
SequenceSteps (prefill chunks and resends) only; everything per token is an array or tensor op.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels import AttentionBackend
from pagewire.v1 import common_pb2, worker_pb2
from worker_svc import prompt_outputs
from worker_svc.logits import Penalties, apply_penalties, logprob_protos, mask_tokens
from worker_svc.models.llama import AttentionMetadata, LlamaForCausalLM
from worker_svc.prompt_outputs import Chunk
from worker_svc.sampler import SamplingBatch, sample
from worker_svc.seq_table import NONE, SequenceTable


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
class StepLayout:
    """Where each sequence of a step sits in the forward pass (one slot per sequence)."""

    ids: np.ndarray  # [T] input token ids, slot by slot
    rows: np.ndarray  # [N] table row of each slot
    starts: np.ndarray  # [N] position of each slot's first token
    lens: np.ndarray  # [N] tokens of each slot
    slot: np.ndarray  # [len(step.seqs)] slot of each SequenceStep (packed decode i is slot i)
    num_decode: int  # single-token slots, all at the front


@dataclass
class SampleRows:
    """The rows that sample this step, in result order (decodes, then SequenceSteps)."""

    rows: np.ndarray  # table rows
    hidden_index: np.ndarray  # index into the step's hidden states
    output_index: np.ndarray  # index of the token being sampled in its sequence's output
    position: np.ndarray  # position the sampled token will take


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[Tensor, Tensor]],
        block_size: int,
        backend: AttentionBackend,
        device: torch.device,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.vocab_size = model.cfg.vocab_size
        self.table = SequenceTable(eos_token_ids)

    def reset(self) -> None:
        """Forget every sequence (a new scheduler stream starts from scratch)."""
        self.table.clear()

    @torch.inference_mode()
    def execute(self, step: worker_pb2.Step) -> worker_pb2.StepResult:
        t0 = time.perf_counter()
        table, seqs, d = self.table, step.seqs, step.decodes
        table.release(step.release_seq_ids)
        drows = table.lookup(d.seq_ids)
        unknown = self._unknown(step, drows)
        if unknown:
            return worker_pb2.StepResult(step_id=step.step_id, unknown_seq_ids=unknown)
        if not seqs and not len(drows):
            return worker_pb2.StepResult(step_id=step.step_id)
        srows = self._apply_seqs(seqs)
        if len(d.new_block_ids):
            table.append_blocks(drows, np.asarray(d.new_block_ids, dtype=np.int64))
        lay = self._layout(step, drows, srows)
        hidden, cu = self._forward(lay)
        result = worker_pb2.StepResult(step_id=step.step_id)
        self._prompt_outputs(seqs, srows, cu[lay.slot], hidden, result)
        sampled = [i for i, s in enumerate(seqs) if s.sample and not table.is_embedding(srows[i])]
        if len(drows) or sampled:
            tokens, logprobs = self._sample(hidden, self._picks(step, lay, cu, sampled))
            result.seq_ids.extend(d.seq_ids)
            result.seq_ids.extend(seqs[i].seq_id for i in sampled)
            result.token_ids.extend(tokens)
            result.logprobs.extend(logprobs)
        result.compute_ms = (time.perf_counter() - t0) * 1e3
        return result

    def _layout(self, step: worker_pb2.Step, drows: np.ndarray, srows: np.ndarray) -> StepLayout:
        """Forward order: decodes (packed, then one-token SequenceSteps), then multi-token chunks;
        the attention backend takes the single-token queries at the front apart."""
        seqs, d, nd = step.seqs, step.decodes, len(drows)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].token_ids) > 1)
        slot = np.empty(len(seqs), dtype=np.int64)
        slot[order] = np.arange(nd, nd + len(seqs))
        lens = np.ones(nd + len(seqs), dtype=np.int64)
        lens[nd:] = [max(len(seqs[i].token_ids), 1) for i in order]
        seq_ids: list[int] = []
        for i in order:
            seq_ids.extend(seqs[i].token_ids or [int(self.table.last_token[srows[i]])])
        return StepLayout(
            ids=np.concatenate([self.table.last_token[drows], np.asarray(seq_ids, np.int64)]),
            rows=np.concatenate([drows, srows[order]]),
            starts=np.concatenate([np.asarray(d.positions, dtype=np.int64),
                                   np.fromiter((seqs[i].start_pos for i in order), np.int64)]),
            lens=lens,
            slot=slot,
            num_decode=int((lens == 1).sum()),
        )

    @staticmethod
    def _picks(
        step: worker_pb2.Step, lay: StepLayout, cu: np.ndarray, sampled: list[int]
    ) -> SampleRows:
        nd = len(step.decodes.seq_ids)
        at = np.concatenate([np.arange(nd), lay.slot[sampled]])  # forward slots, result order
        seq_index = np.fromiter((step.seqs[i].output_index for i in sampled), np.int64, len(sampled))
        return SampleRows(
            rows=lay.rows[at],
            hidden_index=cu[at + 1] - 1,
            output_index=np.concatenate(
                [np.asarray(step.decodes.output_indices, dtype=np.int64), seq_index]
            ),
            position=lay.starts[at] + lay.lens[at],
        )

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
            if not s.new:
                table.extend_blocks(row, s.block_ids)
            e = table.extra(row)
            if e.history is not None and s.token_ids:
                e.history.put(s.start_pos, s.token_ids)
            if s.sample and e.prompt_len is None:
                e.prompt_len = s.start_pos + max(len(s.token_ids), 1)
            rows[i] = row
        return rows

    def _forward(self, lay: StepLayout) -> tuple[Tensor, np.ndarray]:
        """Run the model; return every token's final hidden state [T, H] and the token offsets of
        the forward slots (slot i is tokens cu[i] .. cu[i+1])."""
        dev, bs = self.device, self.block_size
        starts, lens, rows, num_decode = lay.starts, lay.lens, lay.rows, lay.num_decode
        cu = np.zeros(len(lens) + 1, dtype=np.int64)
        np.cumsum(lens, out=cu[1:])
        owner = np.repeat(np.arange(len(lens)), lens)
        positions = starts[owner] + np.arange(int(cu[-1])) - cu[:-1][owner]
        width = int(self.table.num_blocks[rows].max())
        block_tables = self.table.block_tables[rows, :width]
        slots = block_tables[owner, positions // bs].astype(np.int64) * bs + positions % bs

        def put(a: np.ndarray) -> Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev, non_blocking=True)

        meta = AttentionMetadata(
            slot_mapping=put(slots),
            block_tables=put(block_tables),
            context_lens=put((starts + lens).astype(np.int32)),
            cu_seqlens_q=put((cu[num_decode:] - cu[num_decode]).astype(np.int32)),
            num_decode=num_decode,
            backend=self.backend,
        )
        hidden = self.model(put(lay.ids), put(positions), self.kv_caches, meta)
        return hidden, cu

    def _prompt_outputs(
        self,
        seqs: Sequence[worker_pb2.SequenceStep],
        srows: np.ndarray,
        offsets: np.ndarray,
        hidden: Tensor,
        result: worker_pb2.StepResult,
    ) -> None:
        """Prompt logprobs and pooling of the chunks that ask."""
        logprob_chunks, pool_chunks = [], []
        for i, s in enumerate(seqs):
            e = self.table.extra(srows[i])
            wants_lp = e.params.prompt_logprobs is not None
            if s.token_ids and (wants_lp or e.pooling != common_pb2.POOLING_NONE):
                c = Chunk(s.seq_id, e, s.start_pos, int(offsets[i]), s.token_ids, s.sample)
                if wants_lp and (e.prompt_len is None or s.start_pos < e.prompt_len):
                    logprob_chunks.append(c)
                if e.pooling != common_pb2.POOLING_NONE:
                    pool_chunks.append(c)
        if logprob_chunks:
            result.prompt_logprobs.extend(
                prompt_outputs.prompt_logprobs(logprob_chunks, hidden, self.model.logits,
                                               self.vocab_size)
            )
        if pool_chunks:
            result.embeddings.extend(prompt_outputs.pool(pool_chunks, hidden))

    def _sample(
        self, hidden: Tensor, picks: SampleRows
    ) -> tuple[list[int], list[common_pb2.Logprobs]]:
        """Logits of the sampling rows, processed and drawn; raw logprobs for the rows that ask."""
        t, rows = self.table, picks.rows
        index = torch.from_numpy(picks.hidden_index).to(self.device, non_blocking=True)
        logits = self.model.logits(hidden[index])
        want = np.flatnonzero(t.logprobs[rows] != NONE)
        raw = None
        if len(want):
            raw = logits[torch.from_numpy(want).to(self.device)].log_softmax(dim=-1)
        penalized = np.flatnonzero(t.penalized[rows])
        if len(penalized):
            apply_penalties(logits, self._penalties(rows, penalized))
        early = np.flatnonzero(picks.output_index < t.min_tokens[rows])
        if len(early):
            mask_tokens(logits, early, [t.extra(r).stop_ids for r in rows[early]])
        batch = SamplingBatch.build(
            t.temperature[rows], t.top_p[rows], t.top_k[rows], t.seed[rows], picks.output_index,
            self.device, min_p=t.min_p[rows],
        )
        tokens = sample(logits, batch).cpu().numpy()
        t.last_token[rows] = tokens
        for j in penalized:
            history = t.extra(rows[j]).history
            assert history is not None
            history.put(int(picks.position[j]), tokens[j : j + 1])
        if raw is None:
            return tokens.tolist(), []
        chosen = torch.from_numpy(tokens[want]).to(self.device)
        asked = logprob_protos(raw, chosen, t.logprobs[rows[want]].tolist())
        out = [common_pb2.Logprobs() for _ in range(len(rows))]
        for j, lp in zip(want.tolist(), asked, strict=True):
            out[j] = lp
        return tokens.tolist(), out

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
