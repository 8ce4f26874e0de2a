"""The fused Triton RMSNorm, RoPE and SiLU-and-multiply against their torch definitions (the CPU
path, Hugging Face's order of operations): on CUDA if present, else in Triton's interpreter.

float32 agrees within float32 rounding (only the RMSNorm sum's order differs); half precision
within two roundings of the stored dtype (an intermediate rounded one way or the other, then
scaled).
"""

from __future__ import annotations

import pytest
import torch
from paged_case import DEVICE, ON_GPU

from kernels import elementwise
from kernels.moe import act_and_mul_

pytest.importorskip("triton")
from kernels.triton_ops import elementwise as fused  # noqa: E402

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# Largest |fused - torch| in units of the dtype's epsilon times the value's magnitude.
ULPS = {torch.float32: 8, torch.float16: 2, torch.bfloat16: 2}


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.isfinite(got).all()
    scale = want.float().abs().clamp_min(1e-3)
    err = ((got.float() - want.float()).abs() / scale).max().item()
    assert err <= ULPS[dtype] * torch.finfo(dtype).eps * 1.01, err


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 96), (33, 256)])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm(dtype: torch.dtype, rows: int, dim: int, gemma: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype).to(DEVICE)
    w = (1 + torch.randn(dim, generator=g) * 0.1).to(dtype).to(DEVICE)
    want = elementwise.rms_norm_torch(x.cpu(), w.cpu(), 1e-6, gemma).to(DEVICE)
    close(fused.rms_norm(x, w, 1e-6, gemma), want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim,rotary", [(32, 32), (96, 96), (64, 32)], ids=["full", "half48", "partial"])
def test_rope_in_place_on_a_strided_view_of_the_fused_projection(
    dtype: torch.dtype, dim: int, rotary: int
) -> None:
    tokens, q_heads, kv_heads = 5, 6, 2
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, dim, generator=g).to(dtype)
    angles = torch.randn(tokens, 1, rotary // 2, generator=g).double()
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = qkv.clone()
    elementwise.rope_torch_(want[:, : q_heads + kv_heads], cos, sin)
    got = qkv.clone().to(DEVICE)
    fused.rope_(got[:, : q_heads + kv_heads], cos.to(DEVICE), sin.to(DEVICE))
    # Both against float64: the torch path rounds x1*cos before subtracting, the kernel rounds once.
    if dtype == torch.float32:
        assert (got.cpu() - want).abs().max().item() <= 4e-6 * want.abs().max().item()
    assert torch.equal(got[:, q_heads + kv_heads :].cpu(), want[:, q_heads + kv_heads :]), "v untouched"
    exact = qkv.double().clone()
    x1, x2 = exact[:, : q_heads + kv_heads, :rotary].chunk(2, dim=-1)
    c, s = cos.double(), sin.double()
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    rotated = torch.cat([r1, r2, exact[:, : q_heads + kv_heads, rotary:]], dim=-1)
    tol = 4 * torch.finfo(dtype).eps * rotated.abs().max().item()
    assert (got[:, : q_heads + kv_heads].cpu().double() - rotated).abs().max().item() <= tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 64), (9, 1500), (4, 2048)])
def test_silu_mul(dtype: torch.dtype, rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    want = act_and_mul_(gate_up.clone(), "silu")
    got = fused.silu_mul(gate_up.to(DEVICE))
    close(got.cpu(), want, dtype)
