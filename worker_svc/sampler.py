"""Batched sampling: greedy, temperature, top-k, top-p, min-p, per-request seeds.

All rows are processed with tensor ops; the only per-row Python work is drawing the noise of
seeded rows, bounded by the number of sequences. Sampling uses the exponential-race form
(``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``), so a seeded row's draw depends only on
its seed and output index — the same tokens whatever else is in the batch, and after a preemption.
The filters run in vLLM's order: temperature, top-k, top-p, then min-p on what is left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from kernels import elementwise

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space
NO_SEED = -1


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors (rows = sequences that sample this step)."""

    temperature: Tensor  # [S] float32, 0 = greedy
    top_p: Tensor  # [S] float32
    top_k: Tensor  # [S] int64, 0 = off
    min_p: Tensor  # [S] float32, 0 = off
    seeded: list[tuple[int, int, int]]  # (row, seed, output index) of the rows with a seed
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool

    @classmethod
    def build(
        cls,
        temperature: Sequence[float] | np.ndarray,
        top_p: Sequence[float] | np.ndarray,
        top_k: Sequence[int] | np.ndarray,
        seeds: Sequence[int] | np.ndarray,
        output_index: Sequence[int] | np.ndarray,
        device: torch.device,
        min_p: Sequence[float] | np.ndarray | None = None,
    ) -> SamplingBatch:
        """Columns for the rows; ``seeds`` holds NO_SEED for a row without one."""
        temp = np.asarray(temperature, dtype=np.float32)
        tp = np.asarray(top_p, dtype=np.float32)
        tk = np.asarray(top_k, dtype=np.int64)
        mp = np.zeros_like(temp) if min_p is None else np.asarray(min_p, dtype=np.float32)
        seed_col = np.asarray(seeds, dtype=np.int64)
        index_col = np.asarray(output_index, dtype=np.int64)
        seeded_rows = np.flatnonzero(seed_col != NO_SEED)

        greedy = not bool((temp > 0).any())

        def put(a: np.ndarray) -> Tensor:
            # An all-greedy batch only takes the argmax: its columns need not reach the device.
            if greedy:
                return torch.empty(0, dtype=torch.from_numpy(a).dtype, device=device)
            return torch.from_numpy(a).to(device, non_blocking=True)

        return cls(
            temperature=put(temp),
            top_p=put(tp),
            top_k=put(tk),
            min_p=put(mp),
            seeded=list(
                zip(
                    seeded_rows.tolist(),
                    seed_col[seeded_rows].tolist(),
                    index_col[seeded_rows].tolist(),
                    strict=True,
                )
            ),
            all_greedy=greedy,
            any_top_k=bool((tk > 0).any()),
            any_top_p=bool((tp < 1.0).any()),
            any_min_p=bool((mp > 0).any()),
        )


def _mask_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor, any_k: bool, any_p: bool) -> Tensor:
    """Set logits outside each row's top-k / nucleus to -inf. One sort for both filters."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    if any_k:
        k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
        kth = sorted_logits.gather(-1, (k - 1).unsqueeze(-1))
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if any_p:
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p.unsqueeze(-1), float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def _mask_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens less likely than min_p times the most likely one. In logit space
    (p_i < m * p_max  <=>  l_i < l_max + log m), so no softmax is needed; m = 0 keeps all."""
    floor = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(-1)
    return logits.masked_fill(logits < floor, float("-inf"))


def _exponential_noise(batch: SamplingBatch, shape: tuple[int, int], device: torch.device) -> Tensor:
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for row, seed, index in batch.seeded:
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * _MIX + index) & ((1 << 63) - 1))
        noise[row].exponential_(generator=gen)
    return noise


def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Next token id per row. logits [S, V] float32 (penalties already applied) -> [S] int64."""
    greedy_ids = elementwise.argmax(logits)
    if batch.all_greedy:
        return greedy_ids
    temp = torch.where(batch.temperature > 0, batch.temperature, 1.0).unsqueeze(-1)
    scaled = logits / temp
    if batch.any_top_k or batch.any_top_p:
        scaled = _mask_top_k_top_p(scaled, batch.top_k, batch.top_p, batch.any_top_k, batch.any_top_p)
    if batch.any_min_p:
        scaled = _mask_min_p(scaled, batch.min_p)
    probs = scaled.softmax(dim=-1)
    noise = _exponential_noise(batch, tuple(probs.shape), logits.device)  # type: ignore[arg-type]
    sampled = elementwise.argmax(probs / noise)
    return torch.where(batch.temperature > 0, sampled, greedy_ids)
