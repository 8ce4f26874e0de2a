"""Plain-torch paged attention: the CPU serving path and the oracle the Triton kernels are tested against.

KV cache layout, per layer: ``k_cache``/``v_cache`` are ``[num_blocks, block_size, num_kv_heads, head_dim]``.
A token's *slot* is ``block_id * block_size + offset``; a sequence's block table lists its block ids in
order, so its token at position ``p`` lives in block ``block_tables[b, p // block_size]`` at offset
``p % block_size``.

Two per-layer options change what a query sees: ``window`` (sliding-window attention: the query
at position ``p`` sees keys ``p - window < k <= p``, itself and the ``window - 1`` before it;
None: all of them) and ``softcap`` (Gemma 2: scores become ``softcap * tanh(scores / softcap)``
after scaling, before the mask). Every backend takes both with these meanings.

Softmax is always computed in float32, whatever the storage dtype. Positions past a sequence's context
are masked both in the scores and in V, because unused cache memory may hold anything (NaN included) and
``0 * NaN`` would otherwise leak into the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "write_kv", "paged_decode_attention", "paged_extend_attention", "gather_kv",
    "apply_token_bitmask",
]

_SCORE_BUDGET = 16 * 1024 * 1024  # fp32 elements of one score slice in paged_extend_attention


def write_kv(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """Store each token's K/V into its cache slot, in place; slot -1 means skip (padding tokens).

    key/value: [T, num_kv_heads, head_dim]; slot_mapping: [T] int64.
    """
    num_blocks, block_size = k_cache.shape[:2]
    valid = slot_mapping >= 0
    slots = slot_mapping[valid].long()
    # view(): the caches are allocated contiguous by the worker; a view keeps the write in place.
    k_flat = k_cache.view(num_blocks * block_size, *k_cache.shape[2:])
    v_flat = v_cache.view(num_blocks * block_size, *v_cache.shape[2:])
    k_flat.index_copy_(0, slots, key[valid].to(k_cache.dtype))
    v_flat.index_copy_(0, slots, value[valid].to(v_cache.dtype))


def gather_kv(
    cache: Tensor, block_table: Tensor, num_tokens: int
) -> Tensor:
    """Contiguous ``[num_tokens, num_kv_heads, head_dim]`` copy of one sequence's first tokens."""
    block_size = cache.shape[1]
    num_blocks_used = -(-num_tokens // block_size)
    blocks = block_table[:num_blocks_used].long()
    return cache[blocks].flatten(0, 1)[:num_tokens]


def _masked_softmax_av(
    scores: Tensor, mask: Tensor, v: Tensor, equation: str, softcap: float | None = None
) -> Tensor:
    """fp32 softmax over the last axis of ``scores`` (soft-capped first when asked) restricted
    to ``mask``, then ``P @ V``. A row with no allowed position yields zeros instead of NaN.
    """
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).min)
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.einsum(equation, p / denom, v)


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """One query token per sequence attends to its cached context (the last ``window`` tokens
    of it, with a window).

    q: [B, num_q_heads, head_dim]; block_tables: [B, max_blocks] int32; context_lens: [B] int32 counts
    the current token too. Returns [B, num_q_heads, head_dim] in q.dtype.

    All sequences are gathered at once, padded to the longest context: one vectorised pass instead of a
    Python loop, at the price of padding memory (B * longest context), small for CPU-sized batches.
    """
    batch, num_q_heads, head_dim = q.shape
    num_blocks, block_size, num_kv_heads = k_cache.shape[:3]
    group = num_q_heads // num_kv_heads
    if batch == 0:
        return q.new_empty(q.shape)
    max_len = int(context_lens.max())
    blocks_used = max(1, -(-max_len // block_size))
    # Padding entries are arbitrary: clamp so they index something; the mask discards it.
    table = block_tables[:, :blocks_used].long().clamp(0, num_blocks - 1)
    length = blocks_used * block_size
    k = k_cache[table].reshape(batch, length, num_kv_heads, head_dim).float()
    v = v_cache[table].reshape(batch, length, num_kv_heads, head_dim).float()
    positions = torch.arange(length, device=q.device)
    ctx = context_lens[:, None].to(positions.dtype)
    valid = positions[None, :] < ctx  # [B, L]
    if window is not None:
        valid &= positions[None, :] >= ctx - window
    v = v.masked_fill(~valid[:, :, None, None], 0.0)

    qf = q.float().view(batch, num_kv_heads, group, head_dim) * scale
    scores = torch.einsum("bhgd,blhd->bhgl", qf, k)
    out = _masked_softmax_av(scores, valid[:, None, None, :], v, "bhgl,blhd->bhgd", softcap)
    return out.reshape(batch, num_q_heads, head_dim).to(q.dtype)


def paged_extend_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """A chunk of new query tokens per sequence: causal over the chunk, full over the cached prefix
    (or, with a window, the last ``window`` positions up to each query's own).

    q: [T, num_q_heads, head_dim], sequence b owning rows cu_seqlens_q[b]:cu_seqlens_q[b+1];
    context_lens[b] counts the prefix and the new tokens (their K/V already written). Query i of the
    chunk sits at position prefix_len + i and sees cache positions 0..prefix_len + i.
    Returns [T, num_q_heads, head_dim] in q.dtype.

    Loops over sequences (lengths differ, and padding a prefill batch would waste far more than a
    decode batch); within a sequence everything is one batched product.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    for b in range(len(lens)):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        ctx = lens[b]
        prefix = ctx - q_len
        k = gather_kv(k_cache, block_tables[b], ctx).float()  # [L, Hkv, D]
        v = gather_kv(v_cache, block_tables[b], ctx).float()
        k_pos = torch.arange(ctx, device=q.device)
        # Rows per slice bound the fp32 score matrix (rows * heads * ctx) to ~64 MiB.
        rows = max(1, _SCORE_BUDGET // max(1, num_q_heads * ctx))
        for i0 in range(0, q_len, rows):
            i1 = min(q_len, i0 + rows)
            qf = q[q_start + i0 : q_start + i1].float().view(i1 - i0, num_kv_heads, group, head_dim)
            scores = torch.einsum("ihgd,lhd->hgil", qf * scale, k)  # [Hkv, G, rows, L]
            q_pos = prefix + torch.arange(i0, i1, device=q.device)
            mask = k_pos[None, :] <= q_pos[:, None]  # [rows, L]
            if window is not None:
                mask &= k_pos[None, :] > q_pos[:, None] - window
            o = _masked_softmax_av(scores, mask, v, "hgil,lhd->ihgd", softcap)
            out[q_start + i0 : q_start + i1] = o.reshape(i1 - i0, num_q_heads, head_dim).to(q.dtype)
    return out


def apply_token_bitmask(logits: Tensor, bitmask: Tensor, rows: Tensor) -> None:
    """Grammar masks, in place: logits[r, t] = -inf for r in rows where bit t % 32 of word
    t // 32 of bitmask[r] (int32, [S, ceil(V/32)], aligned with the logits' rows) is clear. Ids
    past the logits' width are ignored."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    words = bitmask.index_select(0, rows)
    allowed = ((words.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)[:, :vocab]
    sub = logits.index_select(0, rows)
    logits.index_copy_(0, rows, sub.masked_fill(~allowed, float("-inf")))
