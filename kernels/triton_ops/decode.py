"""Triton paged decode attention: flash-decoding over a paged KV cache with grouped-query heads.

Decode reads the whole KV cache once per step and does ~1 FLOP per byte, so it is bound by memory
bandwidth; what matters is keeping enough loads in flight. Two choices follow from that:

* One program handles one KV head and *all* the query heads that share it (the GQA group), so each
  K/V tile is read from memory once and used by a [group, BLOCK_N] ``tl.dot``.
* A batch of few sequences gives few programs (batch * kv_heads), too few to fill the GPU, so each
  sequence's context is also split into ``num_splits`` ranges processed in parallel; a second small
  kernel merges the partial results by their log-sum-exp (flash-decoding). With one split the first
  kernel writes the output directly; that is used once the batch alone fills the GPU.

A sliding window (``window``, per call: a layer's) moves the start of every sequence's range to
its window's first position, and the splits divide what is left; ``softcap`` (Gemma 2) caps the
scaled scores with ``softcap * tanh(s / softcap)``.

The number of splits is chosen from the block-table width (an upper bound of the context known
without reading device memory), so a call never synchronises with the GPU and can be graph-captured;
each sequence divides its own context evenly among the splits.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_ops.common import (
    check_head_dim,
    interpreting,
    last_dim_contiguous,
    next_pow2,
    num_sms,
    softcap_log2,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr,
    out_ptr, part_out_ptr, part_lse_ptr,
    scale_log2,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ob, stride_oh,
    num_splits, window, softcap,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, IEEE: tl.constexpr, SOFTCAP: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)  # window 0: the whole context
    per_split = tl.cdiv(tl.cdiv(ctx - lo, num_splits), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    end = tl.minimum(start + per_split, ctx)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None], other=0.0)
    table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh

    m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        valid = pos < end
        blk = tl.load(table_row + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        row = blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt
        k = tl.load(k_head + row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if SOFTCAP:
            s = softcap_log2(s, scale_log2, softcap)
        else:
            s = s * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_row = blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt
        v = tl.load(v_head + v_row[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = acc / l_safe[:, None]
    if SINGLE_SPLIT:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, o.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])
    else:
        # Partial buffers are contiguous [B, num_q_heads, num_splits, (HEAD_DIM)] fp32.
        num_q_heads = tl.num_programs(1) * GROUP
        row_id = (b.to(tl.int64) * num_q_heads + heads) * num_splits + split
        lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
        tl.store(part_lse_ptr + row_id, lse, mask=g_mask)
        tl.store(part_out_ptr + row_id[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=g_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr, part_lse_ptr, out_ptr,
    stride_ob, stride_oh,
    num_splits,
    SPLITS_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    # One program per (sequence, query head): weight each split by exp2(lse - max lse).
    b = tl.program_id(0)
    h = tl.program_id(1)
    row0 = (b.to(tl.int64) * tl.num_programs(1) + h) * num_splits
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < num_splits
    lse = tl.load(part_lse_ptr + row0 + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    parts = tl.load(part_out_ptr + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None], other=0.0)
    total = tl.sum(w, 0)
    o = tl.sum(parts * w[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty))


# A split program's time is mostly its serial tile loop (each tile waits on a block-table load, then
# on K and V), while the merge kernel costs little inside a CUDA graph. Measured on H100 at 512
# tokens (docs/BENCHMARKS.md): batch 1 took 15.6 / 15.1 / 12.0 us unsplit / 2 / 4 splits, batch 8
# 18.0 / 18.5 / 17.2 us. So short contexts split too, down to one split-kernel tile per split.
MIN_TOKENS_PER_SPLIT = 64


def choose_num_splits(batch: int, num_kv_heads: int, max_context: int, device: torch.device) -> int:
    """Splits per sequence, from shapes only (no device reads, so decode stays graph-capturable).

    One split (the output written directly, no merge) once batch * kv_heads programs cover every SM
    (measured on H100: batch 32 x 8 kv heads ran fastest unsplit). Below that, aim for about two
    programs per SM, as a power of two so that power-of-two contexts divide evenly, keeping at
    least MIN_TOKENS_PER_SPLIT tokens per split."""
    programs = batch * num_kv_heads
    sms = num_sms(device)
    if programs >= sms:
        return 1
    wanted = next_pow2(math.ceil(2 * sms / programs))
    return max(1, min(wanted, max_context // MIN_TOKENS_PER_SPLIT, 128))


def _launch_config(head_dim: int, block_size: int, num_splits: int) -> dict[str, int]:
    """Tile length along the context and warps, from sweeps on H100 (docs/BENCHMARKS.md): 4 warps,
    3 stages; 128-token tiles for long unsplit ranges, 64 when splits make each range short."""
    if interpreting():
        return {"BLOCK_N": 16 if block_size < 32 else 32, "num_warps": 4, "num_stages": 1}
    block_n = 128 if num_splits == 1 else 64
    if head_dim > 128:
        block_n //= 2
    return {"BLOCK_N": block_n, "num_warps": 4, "num_stages": 3}


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    num_splits: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Same contract as kernels.reference.paged_decode_attention.

    ``num_splits`` overrides the heuristic (tests use it to exercise the merge on tiny inputs).
    """
    batch, num_q_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    check_head_dim(head_dim)
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    out = torch.empty_like(q)
    if batch == 0:
        return out
    q = last_dim_contiguous(q)
    group = num_q_heads // num_kv_heads
    if num_splits is None:
        max_context = block_tables.shape[1] * block_size
        num_splits = choose_num_splits(batch, num_kv_heads, max_context, q.device)
    cfg = _launch_config(head_dim, block_size, num_splits)
    single = num_splits == 1
    if single:
        part_out = part_lse = out  # unused placeholders
    else:
        part_out = torch.empty(batch, num_q_heads, num_splits, head_dim, device=q.device,
                               dtype=torch.float32)
        part_lse = torch.empty(batch, num_q_heads, num_splits, device=q.device, dtype=torch.float32)
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens,
        out, part_out, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        num_splits, window or 0, softcap or 0.0,
        GROUP=group, GROUP_PAD=max(16, next_pow2(group)), HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size, BLOCK_N=cfg["BLOCK_N"],
        SINGLE_SPLIT=single, IEEE=q.dtype == torch.float32, SOFTCAP=softcap is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if not single:
        _decode_reduce_kernel[(batch, num_q_heads)](
            part_out, part_lse, out, out.stride(0), out.stride(1), num_splits,
            SPLITS_PAD=next_pow2(num_splits), HEAD_DIM=head_dim, num_warps=4,
        )
    return out
