"""Mixture-of-experts feed-forward: routing, the plain-torch reference, and the CPU serving path.

Experts are stored stacked: ``w_gate_up [E, 2 * I, H]`` (gate rows, then up rows) and
``w_down [E, H, I]``. A token's output is the sum over its top-k experts of
``weight * down(act(gate(x)) * up(x))``.

- :func:`moe_reference` runs every expert on every token and weights the results with a dense
  [T, E] routing matrix: obviously right, E times the work; the oracle of the other two.
- :func:`grouped_moe` (CPU) sorts the (token, expert) assignments by expert, so each expert runs
  one matrix product over all of its tokens; the Python loop is over experts that got tokens,
  never over tokens.
- ``kernels.triton_ops.fused_moe`` is the CUDA path, the same grouping in a Triton GEMM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["route", "moe_reference", "grouped_moe", "act_and_mul_"]


def route(router_logits: Tensor, top_k: int, renormalize: bool) -> tuple[Tensor, Tensor]:
    """Softmax over experts in fp32, then the top-k (renormalised to sum to 1 when asked), as
    Mixtral and Qwen3-MoE route. Returns (weights [T, k] fp32, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def act_and_mul_(gate_up: Tensor, activation: str) -> Tensor:
    """``act(gate) * up`` of a fused [.., 2 * I] projection, in place on its first half (the
    projection's output is a temporary: no second [T, I] buffer). ``activation``: silu,
    gelu_tanh (GeGLU) or gelu."""
    gate, up = gate_up.chunk(2, dim=-1)
    if activation == "silu":
        return F.silu(gate, inplace=True).mul_(up)
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh").mul_(up)
    if activation == "gelu":
        return F.gelu(gate).mul_(up)
    raise ValueError(f"unknown activation {activation!r}")


def moe_reference(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, weights: Tensor, ids: Tensor,
    activation: str = "silu",
) -> Tensor:
    """Every expert on every token, combined by a dense routing matrix. x [T, H] -> [T, H]."""
    num_experts = w_gate_up.shape[0]
    dense = torch.zeros(x.shape[0], num_experts, dtype=torch.float32, device=x.device)
    dense.scatter_(1, ids, weights.float())  # [T, E]: a token's weight for each expert, 0 if unused
    h = act_and_mul_(torch.einsum("th,eih->eti", x.float(), w_gate_up.float()), activation)
    y = torch.einsum("eti,ehi->eth", h, w_down.float())  # [E, T, H]
    return torch.einsum("te,eth->th", dense, y).to(x.dtype)


def grouped_moe(
    x: Tensor, w_gate_up: Tensor, w_down: Tensor, weights: Tensor, ids: Tensor,
    activation: str = "silu",
) -> Tensor:
    """Same contract as :func:`moe_reference`, one product per expert that has tokens.

    The (token, k) assignments are sorted by expert (a stable sort, so an expert's rows keep
    token order); expert e's rows are a contiguous run, computed as one [n_e, H] x [H, 2I]
    product, scaled by their routing weights and scattered back with one ``index_add_``.
    """
    num_tokens, top_k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    token = order // top_k
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0])
    used = torch.nonzero(counts).flatten()
    ends = torch.cumsum(counts, 0)
    xs = x[token]  # [T * k, H], expert-major
    ys = torch.empty_like(xs)
    for e, end, n in zip(used.tolist(), ends[used].tolist(), counts[used].tolist(), strict=True):
        rows = slice(end - n, end)
        h = act_and_mul_(xs[rows] @ w_gate_up[e].T, activation)
        ys[rows] = h @ w_down[e].T
    ys.mul_(weights.reshape(-1)[order].to(ys.dtype)[:, None])
    out = torch.zeros_like(x)
    out.index_add_(0, token, ys)
    return out
