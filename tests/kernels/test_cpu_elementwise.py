"""The compiled RMSNorm, RoPE and SiLU-and-multiply of the CPU against their definitions.

Each rounds where transformers' modules round, so it equals the op-by-op torch result except
where a float32 sum of squares (its order) or expf differs in its last bit: in bfloat16 that
shows where the bit decides a bfloat16 rounding, at most one element in 10,000 and then by one
bfloat16 step; in float32 results are within 4 units in the last place (measured: 3). RoPE has
neither and equals transformers' out-of-place products bit for bit.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from kernels import cpu_elementwise, elementwise
from kernels.moe import act_and_mul_

pytestmark = pytest.mark.skipif(cpu_elementwise.load() is None, reason="no C compiler")
BF16 = torch.bfloat16


def nearly_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """bfloat16: equal in all but 1 in 10,000 elements, those within one bfloat16 step of the
    value; float32: within 4 units in the last place (denormals: of the smallest normal)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=4 * 2**-23, atol=1e-37)
        return
    assert got.dtype == BF16
    differ = got != want
    assert differ.float().mean().item() <= 1e-4
    step = want.float().abs() * 2**-7
    assert ((got.float() - want.float()).abs() <= step)[differ].all()


DTYPES = pytest.mark.parametrize("dtype", [BF16, torch.float32], ids=["bf16", "f32"])


@DTYPES
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 896), (300, 512), (64, 4096)])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_rms_norm_rounds_as_transformers_does(rows: int, dim: int, gemma: bool,
                                              dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows + dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    w = (1 + torch.randn(dim, generator=g) * 0.3).to(dtype)
    nearly_equal(cpu_elementwise.rms_norm(x, w, 1e-6, gemma),
                 elementwise.rms_norm_torch(x, w, 1e-6, gemma))


@DTYPES
@pytest.mark.parametrize("rows,dim", [(1, 64), (7, 896), (300, 512)])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_add_rms_norm_adds_in_place_as_torch_does_then_norms(rows: int, dim: int, gemma: bool,
                                                             dtype: torch.dtype) -> None:
    """The sum is torch's add exactly (it is the residual stream); the norm of it as
    rms_norm's; the dispatcher takes the compiled op."""
    g = torch.Generator().manual_seed(rows * dim)
    x = (torch.randn(rows, dim, generator=g) * 3).to(dtype)
    h = (torch.randn(rows, dim, generator=g) * 0.5).to(dtype)
    w = (1 + torch.randn(dim, generator=g) * 0.3).to(dtype)
    x[:, ::7] = 3e-39  # float32 denormals in the sum: rounded exactly too (not flushed to 0)
    h[:, ::7] = -1e-39
    want_sum = x + h
    want = elementwise.rms_norm_torch(want_sum, w, 1e-6, gemma)
    for op in (cpu_elementwise.add_rms_norm_, elementwise.add_rms_norm_):
        got_sum = x.clone()
        normed = op(got_sum, h, w, 1e-6, gemma)
        assert torch.equal(got_sum, want_sum)
        nearly_equal(normed, want)


@DTYPES
@pytest.mark.parametrize("tokens", [1, 5, 64])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma"])
def test_per_head_norms_in_place_on_the_fused_projection(tokens: int, gemma: bool,
                                                         dtype: torch.dtype) -> None:
    """Qwen3's q and k norms: every head of a strided view of the q/k/v output normed in place,
    the other heads (v) untouched; the dispatcher takes the compiled op."""
    g = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, 16 + 2 * 4, 128, generator=g) * 3).to(dtype)
    w = (1 + torch.randn(128, generator=g) * 0.3).to(dtype)
    want = qkv.clone()
    want[:, :16] = elementwise.rms_norm_torch(qkv[:, :16], w, 1e-6, gemma)
    for op in (cpu_elementwise.rms_norm_heads_, elementwise.rms_norm_heads_):
        got = qkv.clone()
        assert cpu_elementwise.takes_heads(got[:, :16])
        op(got[:, :16], w, 1e-6, gemma)
        nearly_equal(got, want)
        assert torch.equal(got[:, 16:], qkv[:, 16:])


def test_rms_norm_reads_rows_of_a_wider_tensor() -> None:
    """A view whose rows are further apart than their length (a slice of a fused output)."""
    wide = torch.randn(5, 96).to(BF16)
    x, w = wide[:, 16:80], torch.randn(64).to(BF16)
    assert torch.equal(cpu_elementwise.rms_norm(x, w, 1e-5, False),
                       elementwise.rms_norm_torch(x.contiguous(), w, 1e-5, False))


@DTYPES
@pytest.mark.parametrize("dim,rotary", [(64, 64), (128, 128), (64, 32)], ids=["64", "128", "partial"])
def test_rope_is_transformers_rotate_half(dim: int, rotary: int, dtype: torch.dtype) -> None:
    """x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, every product and sum rounded to the dtype
    (no fused multiply-add), in place on q and k of the fused projection (v untouched); the
    torch definition (the fallback) the same."""
    tokens, q_heads, kv_heads = 9, 6, 2
    g = torch.Generator().manual_seed(dim + rotary)
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, dim, generator=g).to(dtype)
    table = torch.randn(tokens, 1, rotary, generator=g).to(dtype)
    cos, sin = table.chunk(2, dim=-1)
    qk = qkv[:, : q_heads + kv_heads]
    x1, x2 = qk[..., : rotary // 2], qk[..., rotary // 2 : rotary]
    want = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, qk[..., rotary:]], dim=-1)
    for op in (cpu_elementwise.rope_, elementwise.rope_torch_):
        got = qkv.clone()
        op(got[:, : q_heads + kv_heads], cos, sin)
        assert torch.equal(got[:, : q_heads + kv_heads], want)
        assert torch.equal(got[:, q_heads + kv_heads :], qkv[:, q_heads + kv_heads :])


@DTYPES
@pytest.mark.parametrize("rows,inter", [(1, 64), (9, 1408), (64, 4864)])
def test_silu_mul(rows: int, inter: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    got = cpu_elementwise.silu_mul(gate_up)
    assert got.is_contiguous()
    nearly_equal(got, act_and_mul_(gate_up.clone(), "silu"))


@DTYPES
@pytest.mark.parametrize("rows,inter", [(1, 64), (9, 1408), (64, 4096)])
def test_geglu_is_torchs_tanh_gelu_bit_for_bit(rows: int, inter: int, dtype: torch.dtype) -> None:
    """Gemma's act(gate) * up, computed with torch's own vector tanh in torch's order: equal to
    ``F.gelu(gate, approximate="tanh") * up``, also where the tanh's argument is far below zero
    (where the formula cancels, and a tanh of its own would differ in many places)."""
    if not cpu_elementwise.torch_tanh16():
        pytest.skip("this torch exports no 16-lane tanh, or the CPU has no AVX-512: torch's ops run")
    g = torch.Generator().manual_seed(rows + inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    want = torch.nn.functional.gelu(gate, approximate="tanh") * up
    assert cpu_elementwise.takes_gelu_tanh(gate_up)
    assert torch.equal(cpu_elementwise.gelu_tanh_mul(gate_up), want)
    assert torch.equal(elementwise.act_and_mul(gate_up, "gelu_tanh"), want)


def test_geglu_of_widths_off_sixteen_runs_torchs_ops() -> None:
    gate_up = torch.randn(3, 2 * 40)
    assert not cpu_elementwise.takes_gelu_tanh(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(elementwise.act_and_mul(gate_up, "gelu_tanh"),
                       torch.nn.functional.gelu(gate, approximate="tanh") * up)


def test_the_decoder_uses_them_for_bfloat16_and_float32_on_the_cpu() -> None:
    x = torch.randn(3, 64)
    assert cpu_elementwise.takes(x.to(BF16)) and cpu_elementwise.takes(x)
    assert not cpu_elementwise.takes(x.half())  # float16: the definitions
    assert not cpu_elementwise.takes(x.to(BF16).t())  # last dim not contiguous


def test_a_rope_table_laid_out_otherwise_goes_to_the_torch_definition() -> None:
    """cos and sin with different row strides (not the halves of one gathered table) are not
    the compiled kernel's layout: the dispatcher falls back instead of failing."""
    x = torch.randn(3, 4, 64).to(BF16)
    table = torch.randn(3, 1, 64).to(BF16)
    cos, sin = table.chunk(2, dim=-1)
    assert cpu_elementwise.takes_rope(x, cos, sin)
    assert not cpu_elementwise.takes_rope(x, cos, sin.contiguous())
    got, want = x.clone(), x.clone()
    elementwise.rope_(got, cos, sin.contiguous())
    elementwise.rope_torch_(want, cos, sin)
    assert torch.equal(got, want)


def test_the_plain_c_rows_agree_too(monkeypatch) -> None:
    """A CPU without AVX-512 runs the plain C loops: built here with AVX-512 off, each op still
    rounds as its definition does."""
    plain = cpu_elementwise.build([*cpu_elementwise.FLAGS, "-mno-avx512f"])
    assert plain is not None and plain is not cpu_elementwise.load()
    monkeypatch.setattr(cpu_elementwise, "load", lambda: plain)
    g = torch.Generator().manual_seed(5)
    x, h = ((torch.randn(40, 512, generator=g) * 3).to(BF16) for _ in range(2))
    w = (1 + torch.randn(512, generator=g) * 0.3).to(BF16)
    for gemma in (False, True):
        nearly_equal(cpu_elementwise.rms_norm(x, w, 1e-6, gemma),
                     elementwise.rms_norm_torch(x, w, 1e-6, gemma))
        summed = x.clone()
        normed = cpu_elementwise.add_rms_norm_(summed, h, w, 1e-6, gemma)
        assert torch.equal(summed, x + h)
        nearly_equal(normed, elementwise.rms_norm_torch(x + h, w, 1e-6, gemma))
        heads = x.view(40, 8, 64).clone()
        cpu_elementwise.rms_norm_heads_(heads, w[:64], 1e-6, gemma)
        nearly_equal(heads, elementwise.rms_norm_torch(x.view(40, 8, 64), w[:64], 1e-6, gemma))
    gate_up = (torch.randn(9, 2 * 300, generator=g) * 4).to(BF16)
    nearly_equal(cpu_elementwise.silu_mul(gate_up), act_and_mul_(gate_up.clone(), "silu"))
    qkv = torch.randn(9, 8, 64, generator=g).to(BF16)
    cos, sin = torch.randn(9, 1, 64, generator=g).to(BF16).chunk(2, dim=-1)
    got, want = qkv.clone(), qkv.clone()
    cpu_elementwise.rope_(got[:, :6], cos, sin)
    elementwise.rope_torch_(want[:, :6], cos, sin)
    nearly_equal(got, want)


def test_turned_off_by_environment() -> None:
    code = "from kernels import cpu_elementwise\nassert cpu_elementwise.load() is None\n"
    env = {**os.environ, "PAGEWIRE_CPU_ELEMENTWISE": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


ARGMAX_ROWS = [
    torch.randn(64, 4096),
    torch.randn(3, 151_936),
    torch.randn(5, 1),  # one column
    torch.randn(4, 63),  # shorter than a vector pass: the tail only
    torch.randn(4, 64 * 3 + 17),  # vector passes, then a tail
    torch.full((2, 300), float("-inf")),  # every value -inf: the first
    torch.tensor([[0.0, -0.0, 0.0], [-0.0, 0.0, -0.0]]),  # signed zeros are equal
]


def _ties_and_nans() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    ties = torch.randint(0, 4, (16, 1000), generator=g).float()  # many equal maxima per row
    nans = torch.randn(6, 777, generator=g)
    nans[0, 500], nans[1, 3], nans[1, 700], nans[2, 776] = (float("nan"),) * 4
    nans[3, 100], nans[3, 200] = float("inf"), float("nan")
    nans[4, :] = float("nan")
    return [ties, nans]


@pytest.mark.parametrize("x", ARGMAX_ROWS + _ties_and_nans(), ids=lambda x: "x".join(map(str, x.shape)))
@pytest.mark.parametrize("plain", [False, True], ids=["native", "no-avx512"])
def test_argmax_picks_as_torch_does_first_maximum_and_first_nan(x, plain, monkeypatch) -> None:
    if plain:
        lib = cpu_elementwise.build([*cpu_elementwise.FLAGS, "-mno-avx512f"])
        monkeypatch.setattr(cpu_elementwise, "load", lambda: lib)
    assert cpu_elementwise.takes_argmax(x)
    assert torch.equal(cpu_elementwise.argmax(x), x.argmax(dim=-1))
    wide = torch.cat([x, torch.zeros(x.shape[0], 5)], dim=1)[:, : x.shape[1]]  # strided rows
    assert torch.equal(elementwise.argmax(wide), x.argmax(dim=-1))


def test_argmax_of_other_tensors_is_torchs() -> None:
    for x in (torch.randn(4, 9, dtype=BF16), torch.randn(4, 9).t(), torch.zeros(3, 0)[:, :0]):
        assert not cpu_elementwise.takes_argmax(x)
    x = torch.randn(3, 9).to(BF16)
    assert torch.equal(elementwise.argmax(x), x.argmax(dim=-1))
