"""Batched sampling: greedy, temperature, top-k, top-p, per-request seeds.

All rows are processed with tensor ops; the only per-row Python work is drawing the noise of
seeded rows, bounded by the number of sequences. Sampling uses the exponential-race form
(``argmax(p / E)`` with ``E ~ Exp(1)`` is a draw from ``p``), so a seeded row's draw depends only on
its seed and output index — the same tokens whatever else is in the batch, and after a preemption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as tensors (rows = sequences that sample this step)."""

    temperature: Tensor  # [S] float32, 0 = greedy
    top_p: Tensor  # [S] float32
    top_k: Tensor  # [S] int64, 0 = off
    seeds: list[int | None]  # per row
    output_index: list[int]  # per row: index of the token being sampled
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_p: list[float],
        top_k: list[int],
        seeds: list[int | None],
        output_index: list[int],
        device: torch.device,
    ) -> SamplingBatch:
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            seeds=seeds,
            output_index=output_index,
            all_greedy=all(t == 0.0 for t in temperature),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
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


def _exponential_noise(batch: SamplingBatch, shape: tuple[int, int], device: torch.device) -> Tensor:
    noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
    for row, seed in enumerate(batch.seeds):
        if seed is None:
            continue
        gen = torch.Generator(device=device)
        gen.manual_seed((seed * _MIX + batch.output_index[row]) & ((1 << 63) - 1))
        noise[row].exponential_(generator=gen)
    return noise


def sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Next token id per row. logits [S, V] float32 -> [S] int64."""
    greedy_ids = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_ids
    temp = torch.where(batch.temperature > 0, batch.temperature, 1.0).unsqueeze(-1)
    scaled = logits / temp
    if batch.any_top_k or batch.any_top_p:
        scaled = _mask_top_k_top_p(scaled, batch.top_k, batch.top_p, batch.any_top_k, batch.any_top_p)
    probs = scaled.softmax(dim=-1)
    noise = _exponential_noise(batch, tuple(probs.shape), logits.device)  # type: ignore[arg-type]
    sampled = (probs / noise).argmax(dim=-1)
    return torch.where(batch.temperature > 0, sampled, greedy_ids)
