"""The model runner: turns a Step into tensors, runs the model over the paged KV cache, samples.

It keeps one cache between steps, the per-sequence state (block table, sampling parameters, the
token it sampled last). The scheduler can always rebuild it by resending a sequence with ``new``
set, which is what keeps the worker's API stateless. Per-step Python work is a loop over the
sequences of the step; everything per token is a tensor op.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import AttentionBackend
from pagewire.sampling import SamplingParams
from pagewire.v1 import worker_pb2
from worker_svc.models.llama import AttentionMetadata, LlamaForCausalLM
from worker_svc.sampler import SamplingBatch, sample


@dataclass
class SeqState:
    block_table: list[int]
    params: SamplingParams
    last_token: int | None = None


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


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[Tensor, Tensor]],
        block_size: int,
        backend: AttentionBackend,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.backend = backend
        self.device = device
        self.seqs: dict[int, SeqState] = {}

    def reset(self) -> None:
        """Forget every sequence (a new scheduler stream starts from scratch)."""
        self.seqs.clear()

    def _apply_deltas(self, step: worker_pb2.Step) -> list[int]:
        """Update the sequence cache from the step; return ids the worker cannot run."""
        for seq_id in step.release_seq_ids:
            self.seqs.pop(seq_id, None)
        unknown = []
        for s in step.seqs:
            if s.new:
                self.seqs[s.seq_id] = SeqState(list(s.block_ids), SamplingParams.from_proto(s.sampling))
                continue
            state = self.seqs.get(s.seq_id)
            if state is None or (not s.token_ids and state.last_token is None):
                unknown.append(s.seq_id)
                continue
            state.block_table.extend(s.block_ids)
        return unknown

    def execute(self, step: worker_pb2.Step) -> worker_pb2.StepResult:
        t0 = time.perf_counter()
        unknown = self._apply_deltas(step)
        if unknown:
            return worker_pb2.StepResult(step_id=step.step_id, unknown_seq_ids=unknown)
        if not step.seqs:
            return worker_pb2.StepResult(step_id=step.step_id)
        # Decodes (one token) first, then prefill chunks: the attention backend takes them apart.
        order = sorted(step.seqs, key=lambda s: len(s.token_ids) > 1)
        ids: list[int] = []
        starts, lens, tables = [], [], []
        for s in order:
            state = self.seqs[s.seq_id]
            toks = list(s.token_ids) if s.token_ids else [state.last_token]
            ids.extend(toks)  # type: ignore[arg-type]
            starts.append(s.start_pos)
            lens.append(len(toks))
            tables.append(state.block_table)
        num_decode = next((i for i, n in enumerate(lens) if n > 1), len(lens))
        tokens = self._forward(ids, starts, lens, tables, num_decode)
        sampled = [(s, i) for i, s in enumerate(order) if s.sample]
        if not sampled:
            return worker_pb2.StepResult(
                step_id=step.step_id, compute_ms=(time.perf_counter() - t0) * 1e3
            )
        new_tokens = self._sample(tokens, sampled)
        seq_ids = []
        for (s, _), tok in zip(sampled, new_tokens, strict=True):
            self.seqs[s.seq_id].last_token = tok
            seq_ids.append(s.seq_id)
        return worker_pb2.StepResult(
            step_id=step.step_id,
            seq_ids=seq_ids,
            token_ids=new_tokens,
            compute_ms=(time.perf_counter() - t0) * 1e3,
        )

    def _forward(
        self, ids: list[int], starts: list[int], lens: list[int], tables: list[list[int]], num_decode: int
    ) -> Tensor:
        """Run the model; return the final hidden state of each sequence's last token [B, H]."""
        dev, bs = self.device, self.block_size
        lens_t = torch.tensor(lens, dtype=torch.int64)
        starts_t = torch.tensor(starts, dtype=torch.int64)
        cu = torch.zeros(len(lens) + 1, dtype=torch.int64)
        torch.cumsum(lens_t, 0, out=cu[1:])
        total = int(cu[-1])
        row = torch.repeat_interleave(torch.arange(len(lens)), lens_t)
        positions = starts_t[row] + torch.arange(total) - cu[:-1][row]
        width = max(len(t) for t in tables)
        block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
        slots = block_tables[row, positions // bs].to(torch.int64) * bs + positions % bs
        prefill_cu = (cu[num_decode:] - cu[num_decode]).to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots.to(dev, non_blocking=True),
            block_tables=block_tables.to(dev, non_blocking=True),
            context_lens=(starts_t + lens_t).to(torch.int32).to(dev, non_blocking=True),
            cu_seqlens_q=prefill_cu.to(dev, non_blocking=True),
            num_decode=num_decode,
            backend=self.backend,
        )
        input_ids = torch.tensor(ids, dtype=torch.int64).to(dev, non_blocking=True)
        hidden = self.model(input_ids, positions.to(dev, non_blocking=True), self.kv_caches, meta)
        return hidden[(cu[1:] - 1).to(dev)]

    def _sample(self, last_hidden: Tensor, sampled: list[tuple[worker_pb2.SequenceStep, int]]) -> list[int]:
        rows = torch.tensor([i for _, i in sampled], device=self.device)
        logits = self.model.logits(last_hidden[rows])
        params = [self.seqs[s.seq_id].params for s, _ in sampled]
        batch = SamplingBatch.build(
            temperature=[p.temperature for p in params],
            top_p=[p.top_p for p in params],
            top_k=[p.top_k for p in params],
            seeds=[p.seed for p in params],
            output_index=[s.output_index for s, _ in sampled],
            device=self.device,
        )
        return sample(logits, batch).tolist()
