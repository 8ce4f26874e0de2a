"""Triton extend (chunked prefill) attention over a paged KV cache.

Each sequence brings a chunk of new query tokens whose K/V are already in the cache behind a cached
prefix. One program takes BLOCK_M query rows of one query head of one sequence and streams that
sequence's K/V in BLOCK_N-token tiles gathered through the block table (FlashAttention-2 style,
online softmax in fp32).

The key range splits in two loops: positions every row of the tile may see (the whole prefix and
the chunk up to the tile's first row) need no mask, which keeps the common long-prefix case at full
speed; only the last few tiles near the diagonal apply the causal mask. With a sliding window
(``window``, per call: a layer's) every tile is masked and the loop starts at the tile holding the
first row's first visible key; ``softcap`` (Gemma 2) caps the scaled scores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_ops.common import (
    check_head_dim,
    interpreting,
    last_dim_contiguous,
    softcap_log2,
)

_LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    acc, l_i, m_i, q, k_head, v_head, table_row, n0, q_pos, ctx, scale_log2,
    stride_kb, stride_kt, stride_vb, stride_vt, window, softcap,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr, IEEE: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    """Fold one BLOCK_N tile of keys at positions n0.. into the online softmax state."""
    offs_d = tl.arange(0, HEAD_DIM)
    pos = n0 + tl.arange(0, BLOCK_N)
    if MASKED:
        in_ctx = pos < ctx
        blk = tl.load(table_row + pos // BLOCK_SIZE, mask=in_ctx, other=0).to(tl.int64)
        k = tl.load(k_head + (blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None]
                    + offs_d[None, :], mask=in_ctx[:, None], other=0.0)
        v = tl.load(v_head + (blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt)[:, None]
                    + offs_d[None, :], mask=in_ctx[:, None], other=0.0)
    else:
        blk = tl.load(table_row + pos // BLOCK_SIZE).to(tl.int64)
        k = tl.load(k_head + (blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt)[:, None]
                    + offs_d[None, :])
        v = tl.load(v_head + (blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt)[:, None]
                    + offs_d[None, :])
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if SOFTCAP:
        s = softcap_log2(s, scale_log2, softcap)
    else:
        s = s * scale_log2
    if MASKED:
        s = tl.where((pos[None, :] <= q_pos[:, None]) & (pos[None, :] < ctx), s, float("-inf"))
    if WINDOW:
        s = tl.where(pos[None, :] > q_pos[:, None] - window, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if WINDOW:  # a row may see nothing in this tile yet: keep exp2 away from -inf - -inf
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _extend_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, cu_seqlens_ptr, context_lens_ptr, out_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt, stride_ot, stride_oh, window, softcap,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
):
    # Causal tiles near the end of a chunk attend to the most keys: launch those first, so the
    # short ones fill in the tail of the grid.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(context_lens_ptr + b)
    prefix = ctx - q_len
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_mask[:, None], other=0.0)
    q_pos = prefix + offs_m
    kvh = h // GROUP
    table_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kvh * stride_kh
    v_head = v_cache_ptr + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    # Every row sees positions <= prefix + tile*BLOCK_M (the first row's own position).
    full_end = (prefix + tile * BLOCK_M + 1) // BLOCK_N * BLOCK_N
    last_row = tl.minimum(tile * BLOCK_M + BLOCK_M, q_len) - 1
    kv_end = prefix + last_row + 1
    if WINDOW:  # from the tile of the first row's first visible key, every tile masked
        lo = tl.maximum(prefix + tile * BLOCK_M - window + 1, 0) // BLOCK_N * BLOCK_N
        full_end = lo
    else:
        lo = 0
    for n0 in range(lo, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_head, v_head, table_row, n0, q_pos, ctx, scale_log2,
            stride_kb, stride_kt, stride_vb, stride_vt, window, softcap,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, False, IEEE, False, SOFTCAP)
    for n0 in range(full_end, kv_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(
            acc, l_i, m_i, q, k_head, v_head, table_row, n0, q_pos, ctx, scale_log2,
            stride_kb, stride_kt, stride_vb, stride_vt, window, softcap,
            HEAD_DIM, BLOCK_SIZE, BLOCK_N, True, IEEE, WINDOW, SOFTCAP)

    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]  # 0: a padding row past a window's keys
    tl.store(out_ptr + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_mask[:, None])


def _launch_config(head_dim: int) -> dict[str, int]:
    """Tile shape and warps, from a sweep on H100 at head_dim 128 (docs/BENCHMARKS.md): 64x64
    tiles, 4 warps, 2 stages beat 128-row tiles with 8 warps by ~10 %."""
    if interpreting():
        return {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1}
    if head_dim <= 128:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2}
    return {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 2}


def paged_extend_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    scale: float,
    max_q_len: int | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Same contract as kernels.reference.paged_extend_attention.

    ``max_q_len`` (the longest chunk) sizes the grid; pass it when the caller knows it, otherwise it
    is read from ``cu_seqlens_q`` at the cost of one device-to-host copy.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    check_head_dim(head_dim)
    assert num_q_heads % num_kv_heads == 0, "num_q_heads must be a multiple of num_kv_heads"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "cache head_dim must be contiguous"
    out = torch.empty_like(q)
    batch = context_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    q = last_dim_contiguous(q)
    if max_q_len is None:
        max_q_len = int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    cfg = _launch_config(head_dim)
    grid = (triton.cdiv(max_q_len, cfg["BLOCK_M"]), batch, num_q_heads)
    _extend_kernel[grid](
        q, k_cache, v_cache, block_tables, cu_seqlens_q, context_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1), window or 0, softcap or 0.0,
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], IEEE=q.dtype == torch.float32,
        WINDOW=window is not None, SOFTCAP=softcap is not None,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
