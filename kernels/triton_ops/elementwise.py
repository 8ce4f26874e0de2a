"""Triton kernels for the decoder's elementwise work: RMSNorm, rotate-half RoPE, SiLU-and-multiply.

In torch each of these is several kernels (RMSNorm alone: upcast, square, mean, add, rsqrt,
multiply, downcast, scale), and on a GPU every small kernel costs a few microseconds however
little it does: for a decode step of an 8B model, ~800 such launches are ~1.7 ms on top of the
~3.8 ms it takes to read the weights. One kernel each, one pass over the data.

Each computes what its torch version in :mod:`kernels.elementwise` computes, rounding where that
rounds (to the model dtype after the normalisation, after the activation); only the order of the
RMSNorm sum differs, so results agree within float32 rounding, and within one rounding of the
model dtype in half precision.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.triton_ops.common import next_pow2


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, dim, eps, BLOCK: tl.constexpr,
                     GEMMA: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < dim
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, 0) / dim + eps)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:  # weight stored as an offset from 1, the product in fp32 before the cast
        y = x * r * (1.0 + w)
    else:  # Llama: cast, then scale
        y = w * (x * r).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """weight * (x / rms(x)) over the last axis of a 2-D ``x`` (rows of one hidden state)."""
    rows, dim = x.shape
    out = torch.empty_like(x)
    if rows:
        block = next_pow2(dim)
        _rms_norm_kernel[(rows,)](x, weight, out, x.stride(0), out.stride(0), dim, eps,
                                  BLOCK=block, GEMMA=gemma, num_warps=min(16, max(1, block // 256)))
    return out


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_ct, heads, half,
                 HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HALF_PAD)
    d_mask = offs_d < half
    mask = (offs_h < heads)[:, None] & d_mask[None, :]
    cos = tl.load(cos_ptr + t * stride_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + t * stride_ct + offs_d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    p1 = x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + half, mask=mask, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    tl.store(p1, (x1 * cos - x2 * sin).to(dtype), mask=mask)
    tl.store(p1 + half, (x2 * cos + x1 * sin).to(dtype), mask=mask)


def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate-half RoPE in place on the first ``2 * cos.shape[-1]`` dims of each head (all of
    them unless the rope is partial). x [T, H, D] (head_dim contiguous); cos/sin [T, 1, R/2]."""
    tokens, heads, _ = x.shape
    if not tokens:
        return
    half = cos.shape[-1]
    assert x.stride(2) == 1 and cos.stride(-1) == 1 and cos.stride(0) == sin.stride(0)
    _rope_kernel[(tokens,)](x, cos, sin, x.stride(0), x.stride(1), cos.stride(0), heads, half,
                            HEADS_PAD=next_pow2(heads), HALF_PAD=next_pow2(half), num_warps=4)


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    g = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (act * u).to(dtype), mask=mask)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused [T, 2 * I] projection: [T, I]."""
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        block = 1024
        _silu_mul_kernel[(rows, triton.cdiv(inter, block))](
            gate_up, out, gate_up.stride(0), out.stride(0), inter, BLOCK=block, num_warps=4)
    return out
