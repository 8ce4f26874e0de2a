"""Mixture-of-experts on CUDA: the (token, expert) assignments grouped per expert, one Triton GEMM.

The contract is :func:`kernels.moe.moe_reference`'s. Assignments are sorted by expert and each
expert's run is padded to a multiple of ``BLOCK_M`` rows, so every row tile of the grouped GEMM
belongs to one expert and multiplies by that expert's weights alone (vLLM's "align block size").
The buffers are sized by an upper bound known from shapes (``T * k`` rows plus one partial tile
per expert), so nothing waits on the GPU for the real counts (no host read anywhere: the layer can
be captured in a CUDA graph); tiles past the end skip themselves.

Two launches: x @ W_gate_up^T per assignment, the activation in torch, then @ W_down^T scaled by
the routing weight; the k rows of each token are summed at the end.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.moe import act_and_mul_
from kernels.triton_ops.common import interpreting


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, rows_ptr, tile_expert_ptr, weight_ptr,
    N, K, stride_am, stride_be, stride_bn, stride_cm,
    A_DIV: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    """C[row] = A[row // A_DIV] @ B[e]^T (times weight[row]) for the rows of one expert's tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(tile_expert_ptr + pid_m)
    if e < 0:
        return
    rows = tl.load(rows_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = rows >= 0
    a_rows = tl.where(valid, rows // A_DIV, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    b_base = b_ptr + e.to(tl.int64) * stride_be
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(a_ptr + a_rows[:, None] * stride_am + k[None, :],
                    mask=valid[:, None] & (k[None, :] < K), other=0.0)
        b = tl.load(b_base + offs_n[None, :] * stride_bn + k[:, None],
                    mask=(offs_n[None, :] < N) & (k[:, None] < K), other=0.0)
        if IEEE:
            acc += tl.dot(a, b, input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_WEIGHT:
        acc = acc * tl.load(weight_ptr + rows, mask=valid, other=0.0)[:, None]
    c = c_ptr + tl.where(valid, rows, 0).to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align_by_expert(ids: Tensor, num_experts: int, block_m: int) -> tuple[Tensor, Tensor]:
    """(rows, tile_expert): the flat assignment indices sorted by expert, each expert's run padded
    with -1 to a multiple of ``block_m``; the expert of each tile (-1: unused tile)."""
    flat = ids.reshape(-1)
    n, dev = flat.numel(), ids.device
    max_tiles = triton.cdiv(n, block_m) + num_experts
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount reads its input's max back to the host
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(
        0, flat, torch.ones_like(flat))
    tiles = (counts + block_m - 1) // block_m
    tile_end = torch.cumsum(tiles, 0)
    run_start = torch.cumsum(counts, 0) - counts  # first sorted index of each expert
    expert_sorted = flat[order]
    slot = (tile_end - tiles)[expert_sorted] * block_m + torch.arange(n, device=dev) \
        - run_start[expert_sorted]
    rows = torch.full((max_tiles * block_m,), -1, dtype=torch.int64, device=dev)
    rows[slot] = order
    # The expert owning each tile, found by search (repeat_interleave would read its size back).
    owner = torch.searchsorted(tile_end, torch.arange(max_tiles, device=dev), right=True)
    tile_expert = torch.where(owner < num_experts, owner, -1)
    return rows, tile_expert


def _launch(a: Tensor, b: Tensor, out: Tensor, rows: Tensor, tile_expert: Tensor,
            a_div: int, weight: Tensor | None, cfg: dict[str, int]) -> None:
    n, k = b.shape[1], b.shape[2]
    grid = (tile_expert.numel(), triton.cdiv(n, cfg["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a, b, out, rows, tile_expert, weight if weight is not None else out,
        n, k, a.stride(0), b.stride(0), b.stride(1), out.stride(0),
        A_DIV=a_div, HAS_WEIGHT=weight is not None, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], IEEE=a.dtype == torch.float32,
        num_warps=cfg["num_warps"],
    )


def fused_moe(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, weights: Tensor, ids: Tensor,
    activation: str = "silu",
) -> Tensor:
    """Same contract as :func:`kernels.moe.moe_reference`."""
    num_tokens, top_k = ids.shape
    cfg = ({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4} if interpreting()
           else {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4})
    rows, tile_expert = align_by_expert(ids, w_gate_up.shape[0], cfg["BLOCK_M"])
    x = x.contiguous()
    h = torch.empty(num_tokens * top_k, w_gate_up.shape[1], dtype=x.dtype, device=x.device)
    _launch(x, w_gate_up, h, rows, tile_expert, top_k, None, cfg)
    a = act_and_mul_(h, activation).contiguous()
    y = torch.empty(num_tokens * top_k, w_down.shape[1], dtype=x.dtype, device=x.device)
    _launch(a, w_down, y, rows, tile_expert, 1, weights.reshape(-1).float().contiguous(), cfg)
    return y.view(num_tokens, top_k, -1).sum(dim=1)
