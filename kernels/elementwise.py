"""The decoder's elementwise operations: one Triton kernel each on CUDA, one compiled C pass each
for bfloat16 and float32 on the CPU, torch elsewhere.

The torch versions are the definitions (Hugging Face's order of operations and roundings);
:mod:`kernels.triton_ops.elementwise` fuses each into one kernel on the GPU and
:mod:`kernels.cpu_elementwise` into one call on the CPU, where a handful of small ops per
operation cost more than the operation itself. :func:`argmax` (the sampler's) lives here for the
same reason: torch's CPU argmax is scalar.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from kernels import cpu_elementwise
from kernels.moe import act_and_mul_


@functools.cache
def _triton_ops():  # noqa: ANN202
    if importlib.util.find_spec("triton") is None:
        return None
    from kernels.triton_ops import elementwise

    return elementwise


def _fused(x: Tensor):  # noqa: ANN202
    """The Triton module when ``x`` lives on a CUDA device and Triton is installed."""
    return _triton_ops() if x.is_cuda else None


def argmax(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)`` of 2-D ``x`` [rows, cols] (int64 [rows]): a sampler's greedy pick and
    its race. One vectorised pass on the CPU, where torch's compares one element at a time."""
    if cpu_elementwise.takes_argmax(x):
        return cpu_elementwise.argmax(x)
    return x.argmax(dim=-1)


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """x / sqrt(mean(x^2) + eps) in float32, then Llama's ``weight * y`` in x's dtype, or
    Gemma's (``gemma``) ``y * (1 + weight)`` in float32 before the cast, as transformers does
    each."""
    ops = _fused(x)
    if ops is not None and x.dim() == 2:
        return ops.rms_norm(x, weight, eps, gemma)
    if x.dim() == 2 and cpu_elementwise.takes(x):
        return cpu_elementwise.rms_norm(x, weight, eps, gemma)
    return rms_norm_torch(x, weight, eps, gemma)


def rms_norm_torch(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """The definition of :func:`rms_norm` (transformers' modules, op for op)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if gemma:
        return (xf * (1.0 + weight.float())).to(x.dtype)
    return weight * xf.to(x.dtype)


def rms_norm_heads_(x: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> None:
    """:func:`rms_norm` of every head of x [T, H, D] (weight [D]), in place: the per-head q/k
    norms of Qwen3 and Gemma 3 on the fused projection's output. One pass on the CPU."""
    if cpu_elementwise.takes_heads(x):
        cpu_elementwise.rms_norm_heads_(x, weight, eps, gemma)
        return
    x.copy_(rms_norm(x, weight, eps, gemma))


def add_rms_norm_(x: Tensor, h: Tensor, weight: Tensor, eps: float, gemma: bool = False) -> Tensor:
    """The residual stream between sublayers: ``x += h`` in place (rounded to x's dtype, as
    torch adds), then :func:`rms_norm` of the sum. One pass in bfloat16 on the CPU, where the
    add and the norm each read the whole stream."""
    if (x.dim() == 2 and cpu_elementwise.takes(x) and x.is_contiguous() and h.is_contiguous()
            and h.dtype == x.dtype):
        return cpu_elementwise.add_rms_norm_(x, h, weight, eps, gemma)
    return rms_norm(x.add_(h), weight, eps, gemma)


def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate-half RoPE (the Hugging Face convention) in place on the first ``2 * cos.shape[-1]``
    dims of each head (all of them unless the rope is partial). x [T, H, D]; cos/sin [T, 1, R/2]
    in x's dtype."""
    ops = _fused(x)
    if ops is not None:
        ops.rope_(x, cos, sin)
        return
    if cpu_elementwise.takes_rope(x, cos, sin):
        cpu_elementwise.rope_(x, cos, sin)
        return
    rope_torch_(x, cos, sin)


def rope_torch_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """The definition of :func:`rope_`: transformers' ``x * cos + rotate_half(x) * sin``, every
    product and sum rounded to x's dtype, written back into the projection's output. The
    products are formed out of place: an in-place ``addcmul_`` is a fused multiply-add on the
    CPU, rounding once where transformers rounds twice (in float32 too: 19 % of a test's
    elements differed in their last bit)."""
    x1, x2 = x[..., : 2 * cos.shape[-1]].chunk(2, dim=-1)
    rotated_first = x1 * cos - x2 * sin
    x2.copy_(x2 * cos + x1 * sin)
    x1.copy_(rotated_first)


def act_and_mul(gate_up: Tensor, activation: str) -> Tensor:
    """act(gate) * up of a fused gate/up projection [T, 2 * I] -> [T, I]; one kernel for SiLU on
    CUDA, for SiLU and GeGLU's tanh GELU on the CPU (the latter torch's own arithmetic, bit for
    bit), else in place on the projection's output (kernels.moe.act_and_mul_)."""
    ops = _fused(gate_up)
    if activation == "silu" and gate_up.dim() == 2:
        if ops is not None:
            return ops.silu_mul(gate_up)
        if cpu_elementwise.takes(gate_up):
            return cpu_elementwise.silu_mul(gate_up)
    if activation == "gelu_tanh" and cpu_elementwise.takes_gelu_tanh(gate_up):
        return cpu_elementwise.gelu_tanh_mul(gate_up)
    return act_and_mul_(gate_up, activation)


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused gate/up projection [T, 2 * I] -> [T, I]."""
    return act_and_mul(gate_up, "silu")
