"""Paged attention for CPU serving: the contracts of :mod:`kernels.reference`, built for speed.

The reference is the oracle and stays plain. This module computes the same thing with far less
memory traffic, which is what bounds attention on a CPU:

- K/V are gathered token by token (``index_select`` on the flattened cache), only up to the
  longest context of the sequences gathered together, never whole padded blocks.
- A position past a sequence's context re-reads that sequence's last token instead of whatever
  the cache holds there. The attention mask then drops it, and because the value it reads is
  finite (real K/V), ``0 * value`` stays 0. Unused cache memory, which may hold NaN, is never read.
- Decode sequences are sorted by length and gathered in small groups, so each group's K/V copy
  is still in cache when attention reads it, and short sequences are not padded to long ones.
- A prefill chunk with no cached prefix attends to the K/V the layer just computed (``new_kv``)
  instead of reading back what it wrote to the cache.
- Attention itself is ``torch.nn.functional.scaled_dot_product_attention`` (a fused CPU kernel
  with an fp32 softmax). GQA is free: the query heads that share a KV head become extra query
  rows of that head in decode, and in extend K/V are broadcast to the query heads by a stride-0
  view. Neither copies K/V. In bfloat16 (on AMX tiles or AVX-512 BF16 dot products, else
  widened to float32) and in float32 (an AVX2 CPU) an extend chunk goes to the compiled kernel
  of :mod:`kernels.cpu_extend` instead, with the same K/V rows.

Per layer, ``window`` (sliding-window attention) masks keys before the window and, in extend,
skips gathering them; ``softcap`` (Gemma 2) has no fused SDPA equivalent, so a soft-capped call
is computed by :mod:`kernels.reference` instead, exact and slower.

Everything that depends only on the step's block tables and lengths (sort order, slots, masks,
groups) is worked out once per step by :func:`plan_decode` / :func:`plan_extend` and shared by
every layer; without a plan each call makes its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import cpu_extend, reference
from kernels.row_buckets import empty_rows

__all__ = [
    "write_kv", "store_kv", "paged_decode_attention", "paged_extend_attention", "decode_groups",
    "plan_decode", "plan_extend", "DecodePlan", "ExtendPlan",
]

# Gathered K+V bytes per decode group: small enough to stay in a core's L2/L3 between the
# gather that writes it and the attention that reads it, large enough to amortise per-call cost.
_GROUP_BYTES = 4 * 1024 * 1024


def _token_slots(block_table: Tensor, context_lens: Tensor, length: int, block_size: int) -> Tensor:
    """Cache slot of positions ``0..length-1`` of each sequence, ``[B, length]`` int64.

    Positions at or past a sequence's context map to its last context token (see module doc).
    block_table: [B, blocks]; context_lens: [B], each >= 1.
    """
    pos = torch.arange(length, device=block_table.device)
    pos = torch.minimum(pos[None, :], (context_lens[:, None] - 1).to(pos.dtype))
    blocks = block_table.gather(1, pos // block_size).to(torch.int64)
    return blocks * block_size + pos % block_size


def write_kv(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """Same contract as :func:`kernels.reference.write_kv`. The worker never pads a step, so the
    common case has no slot to skip: one ``index_copy_`` per cache, no masked copies of K/V."""
    if slot_mapping.numel() and bool((slot_mapping < 0).any()):
        reference.write_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    store_kv(key, value, k_cache, v_cache, slot_mapping)


def store_kv(
    key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
) -> None:
    """:func:`write_kv` for a slot mapping the caller knows has no -1: the worker checks its
    step's slots once, on the host, instead of every layer asking the tensor (three small ops
    and a wait, per layer)."""
    slots = slot_mapping.long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, key.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, value.to(v_cache.dtype))


class _Workspace:
    """Gather buffers that grow but are never freed, reused by every call.

    A fresh buffer per gather costs a page fault per 4 KiB on first touch and writes into memory
    that is not in cache; reusing one keeps the gathered K/V in the core's cache between the
    gather and the attention that reads it. This halves decode attention time on a 2-core
    machine. Calls run one at a time (the worker executes one step at a time), so one set of
    buffers per (name, dtype, device) suffices.
    """

    def __init__(self) -> None:
        self.buffers: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}

    def take(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        numel = math.prod(shape)
        buf = self.buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)),
                              dtype=like.dtype, device=like.device)
            self.buffers[key] = buf
        return buf[:numel].view(shape)


_WORKSPACE = _Workspace()


def _gather(cache: Tensor, slots: Tensor, name: str) -> Tensor:
    """``[*slots.shape, kv_heads, head_dim]``: the cache rows of ``slots``, copied into the
    workspace buffer ``name`` (valid until the next gather into the same buffer)."""
    flat = cache.view(-1, *cache.shape[2:])  # the worker allocates caches contiguous
    out = _WORKSPACE.take(name, (slots.numel(), *cache.shape[2:]), cache)
    torch.index_select(flat, 0, slots.reshape(-1), out=out)
    return out.view(*slots.shape, *cache.shape[2:])


def decode_groups(sorted_lens: list[int], bytes_per_token: int) -> list[tuple[int, int]]:
    """Split sequences sorted by context length into ``[start, end)`` runs to gather together.

    A run grows while (its size x its longest context) x ``bytes_per_token`` stays within
    ``_GROUP_BYTES``; a sequence too long for the budget gets a run of its own.
    """
    budget = max(1, _GROUP_BYTES // max(1, bytes_per_token))
    bounds: list[tuple[int, int]] = []
    start = 0
    for i, n in enumerate(sorted_lens):
        if i > start and (i + 1 - start) * n > budget:
            bounds.append((start, i))
            start = i
    if sorted_lens:
        bounds.append((start, len(sorted_lens)))
    return bounds


@dataclass(frozen=True)
class DecodePlan:
    """A decode batch laid out in length order: what every layer's attention call reuses."""

    perm: Tensor  # [B] batch index of each sorted row
    slots: Tensor  # [B, longest] cache slot of each position, sorted rows
    bias: Tensor  # [B, longest] additive mask (0 / -inf), cache dtype
    runs: list[tuple[int, int, int]]  # (start, end, longest context) of each gather group


def plan_decode(block_tables: Tensor, context_lens: Tensor, k_cache: Tensor) -> DecodePlan:
    """Sort by context length, compute every slot and the mask, and split into gather groups."""
    block_size, num_kv_heads, head_dim = k_cache.shape[1:]
    lens = context_lens.tolist()
    order = sorted(range(len(lens)), key=lens.__getitem__)
    sorted_lens = [lens[i] for i in order]
    perm = torch.tensor(order, device=block_tables.device, dtype=torch.int64)
    longest = sorted_lens[-1] if sorted_lens else 0
    seq_lens = context_lens[perm]
    slots = _token_slots(block_tables[perm], seq_lens, longest, block_size)
    # Additive float mask, made once: a boolean one would be converted on every call.
    invalid = torch.arange(longest, device=block_tables.device)[None, :] >= seq_lens[:, None]
    bias = torch.zeros(invalid.shape, dtype=k_cache.dtype, device=block_tables.device)
    bias.masked_fill_(invalid, float("-inf"))
    token_bytes = 2 * num_kv_heads * head_dim * k_cache.element_size()
    runs = [(s, e, sorted_lens[e - 1]) for s, e in decode_groups(sorted_lens, token_bytes)]
    return DecodePlan(perm, slots, bias, runs)


def paged_decode_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    context_lens: Tensor,
    scale: float,
    plan: DecodePlan | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Same contract as :func:`kernels.reference.paged_decode_attention`; ``plan`` (from
    :func:`plan_decode` on the same tables and lengths) skips the per-call layout work.

    Each run of the plan costs two gathers and one attention call.
    """
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if batch == 0:
        return torch.empty_like(q)
    if softcap is not None:
        return reference.paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                scale, window, softcap)
    p = plan if plan is not None else plan_decode(block_tables, context_lens, k_cache)
    bias = p.bias if window is None else _window_bias(p, context_lens, window)
    # The query heads sharing a KV head are query rows of that head: [B, Hkv, group, D].
    qs = q[p.perm].view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    qs = qs.to(k_cache.dtype)
    out = torch.empty_like(qs)
    for start, end, length in p.runs:
        run_slots = p.slots[start:end, :length]
        k = _gather(k_cache, run_slots, "k").transpose(1, 2)  # [n, Hkv, L, D], a view
        v = _gather(v_cache, run_slots, "v").transpose(1, 2)
        mask = bias[start:end, None, None, :length]
        out[start:end] = F.scaled_dot_product_attention(qs[start:end], k, v, attn_mask=mask,
                                                        scale=scale)
    result = torch.empty_like(q)
    result[p.perm] = out.view(batch, num_q_heads, head_dim).to(q.dtype)
    return result


def _window_bias(p: DecodePlan, context_lens: Tensor, window: int) -> Tensor:
    """The plan's mask with the positions before each sequence's window masked too."""
    lens = context_lens[p.perm].to(torch.int64)
    pos = torch.arange(p.bias.shape[1], device=p.bias.device)
    return p.bias.masked_fill(pos[None, :] < lens[:, None] - window, float("-inf"))


# Reduced-precision extend attention runs on AMX tiles of 16 rows (bfloat16). A chunk whose query
# or key count is not a multiple of 16 takes the fused kernel's slow tail path, and every new
# length sets up new kernels. Rounding both counts up to 16 made a 64-prompt burst of new lengths
# 32-512 take 274 ms of attention instead of 349 (bench/cpu_extend.py, docs/BENCHMARKS.md).
# float32 gains nothing from it (5 % slower), so it is left exact.
_EXTEND_ROWS = 16


def _extend_rows(dtype: torch.dtype) -> int:
    return 1 if dtype == torch.float32 else _EXTEND_ROWS


def _round_up(n: int, quantum: int) -> int:
    return -(-n // quantum) * quantum


@dataclass(frozen=True)
class ExtendChunk:
    """One sequence's chunk of an extend batch, with its rows rounded up to ``ExtendPlan.rows``."""

    q_start: int  # first query row
    q_end: int
    context: int  # tokens in cache including the chunk
    slots: Tensor  # [context + rows] cache slot of each position; past the context, its last one
    mask: Tensor | None  # [padded q_len, padded context] bool; None: plain causal, no prefix


@dataclass(frozen=True)
class ExtendPlan:
    chunks: list[ExtendChunk]
    rows: int  # query and key counts are rounded up to a multiple of this


def plan_extend(
    block_tables: Tensor, cu_seqlens_q: Tensor, context_lens: Tensor, k_cache: Tensor
) -> ExtendPlan:
    """Per chunk: its query rows, its cache slots, and after a cached prefix its mask."""
    block_size = k_cache.shape[1]
    rows = _extend_rows(k_cache.dtype)
    starts, lens = cu_seqlens_q.tolist(), context_lens.tolist()
    dev = block_tables.device
    chunks = []
    for b, ctx in enumerate(lens):
        q_start, q_end = starts[b], starts[b + 1]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        slots = _token_slots(block_tables[b : b + 1], context_lens[b : b + 1], ctx + rows,
                             block_size)[0]
        mask = None
        if q_len != ctx:
            mask = _padded_mask(ctx - q_len, q_len, 0, ctx, None, rows, dev)
        chunks.append(ExtendChunk(q_start, q_end, ctx, slots, mask))
    return ExtendPlan(chunks, rows)


def _padded_mask(prefix: int, q_len: int, lo: int, context: int, window: int | None, rows: int,
                 device: torch.device) -> Tensor:
    """Which keys ``lo..context-1`` each query ``prefix..prefix+q_len-1`` sees, both counts
    rounded up to ``rows``. Padding keys come after every real query, so causality hides them;
    a padding query sees key ``lo`` only (its output is dropped; a row with no key is 0/0)."""
    lq, lk = _round_up(q_len, rows), _round_up(context - lo, rows)
    q_pos = prefix + torch.arange(lq, device=device)
    diff = q_pos[:, None] - torch.arange(lo, lo + lk, device=device)[None, :]
    mask = diff >= 0
    if window is not None:
        mask &= diff < window
    mask[q_len:, 0] = True
    return mask


def _padded_rows(src: Tensor, rows: int, name: str) -> Tensor:
    """``src`` ``[n, ...]`` copied into workspace ``name`` with zero rows up to ``rows`` (finite:
    a masked key still multiplies its value by 0)."""
    if rows == src.shape[0]:
        return src
    out = _WORKSPACE.take(name, (rows, *src.shape[1:]), src)
    out[: src.shape[0]].copy_(src)
    out[src.shape[0] :].zero_()
    return out


def paged_extend_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    block_tables: Tensor,
    cu_seqlens_q: Tensor,
    context_lens: Tensor,
    scale: float,
    plan: ExtendPlan | None = None,
    new_kv: tuple[Tensor, Tensor] | None = None,
    window: int | None = None,
    softcap: float | None = None,
) -> Tensor:
    """Same contract as :func:`kernels.reference.paged_extend_attention`.

    ``new_kv``: the chunks' own K/V, ``[T, kv_heads, head_dim]`` rows aligned with ``q`` (what
    the layer has just written to the cache); a chunk with no cached prefix attends to them
    directly. One fused attention call per chunk: a prefill step holds few sequences, and the
    fused kernel works through the score matrix tile by tile, so no size bound is needed here.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    if softcap is not None:
        return reference.paged_extend_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q,
                                                context_lens, scale, window, softcap)
    out = empty_rows(num_tokens, num_q_heads, head_dim, dtype=q.dtype, device=q.device)  # o_proj's
    p = plan if plan is not None else plan_extend(block_tables, cu_seqlens_q, context_lens, k_cache)
    compiled = cpu_extend.takes(q, head_dim) and k_cache.dtype == q.dtype
    for c in p.chunks:
        if compiled and _attend_compiled(c, q, k_cache, v_cache, new_kv, window, scale, out):
            continue
        q_len = c.q_end - c.q_start
        lo, mask = _chunk_keys(c, q_len, window, p.rows)
        lq, lk = _round_up(q_len, p.rows), _round_up(c.context - lo, p.rows)
        if lo == 0 and c.mask is None and new_kv is not None:  # no prefix: the chunk's own K/V
            k, v = (_padded_rows(t[c.q_start : c.q_end].to(k_cache.dtype), lk, name)
                    for t, name in zip(new_kv, ("k", "v"), strict=True))
        else:  # past the context the slots repeat its last token: finite, and masked
            keys = c.slots[lo : lo + lk]
            k, v = _gather(k_cache, keys, "k"), _gather(v_cache, keys, "v")
        # [Hkv, 1, L, D] broadcast over the group: the query heads of one KV head share it.
        k, v = k.transpose(0, 1)[:, None], v.transpose(0, 1)[:, None]
        shape = (num_kv_heads, group, lk, head_dim)
        qs = _padded_rows(q[c.q_start : c.q_end].to(k.dtype), lq, "q")
        qs = qs.view(lq, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        o = F.scaled_dot_product_attention(
            qs, k.expand(shape), v.expand(shape), attn_mask=mask, is_causal=mask is None,
            scale=scale,
        )  # [Hkv, group, lq, D]
        out[c.q_start : c.q_end] = o[:, :, :q_len].permute(2, 0, 1, 3).reshape(
            q_len, num_q_heads, head_dim)
    return out


def _attend_compiled(c: ExtendChunk, q: Tensor, k_cache: Tensor, v_cache: Tensor,
                     new_kv: tuple[Tensor, Tensor] | None, window: int | None, scale: float,
                     out: Tensor) -> bool:
    """One chunk through the compiled kernel (kernels.cpu_extend): its own new K/V rows when it
    has no cached prefix, else its cache rows from the first one its window sees."""
    prefix = c.context - (c.q_end - c.q_start)
    lo = 0 if window is None else max(0, prefix - window + 1)
    if prefix == 0 and new_kv is not None:
        k, v = new_kv[0][c.q_start : c.q_end], new_kv[1][c.q_start : c.q_end]
    else:
        keys = c.slots[lo : c.context]
        k, v = _gather(k_cache, keys, "k"), _gather(v_cache, keys, "v")
    return cpu_extend.attend(q[c.q_start : c.q_end], k, v, prefix - lo, window, scale,
                             out[c.q_start : c.q_end])


def _chunk_keys(c: ExtendChunk, q_len: int, window: int | None,
                rows: int) -> tuple[int, Tensor | None]:
    """The first key position any query of the chunk sees, and the (padded) mask over keys from
    there (None: plain causal over the chunk's own keys)."""
    prefix = c.context - q_len
    if window is None or prefix + q_len <= window:  # every query sees back to position 0
        return 0, c.mask
    lo = max(0, prefix - window + 1)
    return lo, _padded_mask(prefix, q_len, lo, c.context, window, rows, c.slots.device)
