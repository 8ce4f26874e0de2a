"""Builds paged KV caches from known dense per-sequence K/V, plus a float64 dense oracle.

Unused cache memory is filled with NaN so that any read outside a sequence's context shows up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# bf16 tl.dot is wrong under the triton 3.9 interpreter: bf16 only where it runs compiled.
TRITON_DTYPES = [torch.float16, torch.float32] + ([torch.bfloat16] if ON_GPU else [])
# Relative error bound ||out - ref|| / ||ref|| per storage dtype (both sides see the same stored K/V).
REL_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@dataclass
class PagedCase:
    """Dense per-sequence K/V and the same data scattered over a paged cache."""

    keys: list[Tensor]  # [ctx_b, Hkv, D] each
    values: list[Tensor]
    k_cache: Tensor
    v_cache: Tensor
    block_tables: Tensor  # [B, max_blocks] int32, padding entries 0
    context_lens: Tensor  # [B] int32


def make_paged_case(
    context_lens: list[int], block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device = DEVICE, spare_blocks: int = 3, seed: int = 0,
) -> PagedCase:
    """Random K/V for sequences of the given lengths, stored in scattered (shuffled) blocks."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype)
    v_cache = torch.full(shape, float("nan"), dtype=dtype)
    max_blocks = max(blocks_per_seq) + 2  # extra padding columns, as a worker would have
    tables = torch.zeros(len(context_lens), max_blocks, dtype=torch.int32)
    keys, values, used = [], [], 0
    for b, n in enumerate(context_lens):
        ids = perm[used : used + blocks_per_seq[b]]
        used += blocks_per_seq[b]
        tables[b, : len(ids)] = ids.to(torch.int32)
        k = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(n, num_kv_heads, head_dim, generator=gen).to(dtype)
        pos = torch.arange(n)
        k_cache[ids[pos // block_size], pos % block_size] = k
        v_cache[ids[pos // block_size], pos % block_size] = v
        keys.append(k.to(device))
        values.append(v.to(device))
    return PagedCase(keys, values, k_cache.to(device), v_cache.to(device), tables.to(device),
                     torch.tensor(context_lens, dtype=torch.int32, device=device))


def dense_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, prefix: int,
                    window: int | None = None, softcap: float | None = None) -> Tensor:
    """float64 attention of q [n, Hq, D] at positions prefix.. over dense k/v [L, Hkv, D]
    (keys within ``window`` of each query only; scores soft-capped when asked)."""
    n, num_q_heads, _ = q.shape
    group = num_q_heads // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)  # [L, Hq, D]
    vv = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("ihd,lhd->hil", q.double(), kk) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    distance = (prefix + torch.arange(n, device=q.device))[:, None] - torch.arange(
        k.shape[0], device=q.device)[None, :]
    allowed = (distance >= 0) & (distance < (window or k.shape[0] + n))
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hil,lhd->ihd", torch.softmax(scores, dim=-1), vv)


def rel_err(out: Tensor, ref: Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf."""
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm())
