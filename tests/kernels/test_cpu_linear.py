"""Decode batches' and short chunks' products read oneDNN's packed weight in place (csrc/rows.c on
AVX-512: float32 1 to 128 rows, bfloat16 1 to 256; csrc/small_rows.c on AVX2: float32, 1 to 3
rows); within float32's
error bound of a float64 product, for any shape (bfloat16: then rounded once); a buffer in any
other layout is never read."""

from __future__ import annotations

import pytest
import torch

from kernels import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.kernels(torch.float32), reason="no C compiler")
max_rows = cpu_linear.max_rows


def packed_pair(
    n: int, k: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, cpu_linear.BlockedWeight, torch.Tensor]:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, None)
    found = cpu_linear.blocked(w, packed)
    if found is None:
        pytest.skip(f"no kernel for {dtype}, or oneDNN packs it in another layout on this CPU")
    return w, found, packed


@pytest.mark.parametrize(("n", "k"), [(1024, 512), (1000, 300), (512, 1408), (70, 64)])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 13, 64, 128])
@pytest.mark.parametrize("bias", [False, True])
def test_float32_decode_batches_are_float32_dot_products(
    n: int, k: int, rows: int, bias: bool
) -> None:
    if rows > max_rows(torch.float32):
        pytest.skip("oneDNN computes this many rows on this CPU")
    w, found, _packed = packed_pair(n, k)
    gen = torch.Generator().manual_seed(n * rows + k)
    x = torch.randn(rows, k + 5, generator=gen)[:, 2 : 2 + k]  # rows further apart than k
    b = torch.randn(n, generator=gen) if bias else None
    out = cpu_linear.product(x, found, b)
    assert out is not None and out.shape == (rows, n)
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # Any order of k products and sums (and the bias's add) in float32 stays within
    # (k + 1) u sum |x w| (+ u |b|), u = 2^-24; a misread weight is off by O(|x w|).
    scale = x.abs().double() @ w.abs().double().T + (0 if b is None else b.abs().double())
    assert ((out.double() - ref).abs() <= (k + 2) * 2.0**-24 * scale).all()


def test_more_rows_or_another_dtype_are_left_to_onednn() -> None:
    w, found, _packed = packed_pair(256, 128)
    assert cpu_linear.product(torch.randn(max_rows(torch.float32) + 1, 128), found, None) is None
    assert cpu_linear.product(torch.randn(1, 128).double(), found, None) is None
    assert cpu_linear.product(torch.randn(2, 256)[:, ::2], found, None) is None  # strided columns


def test_a_buffer_that_does_not_hold_the_weight_in_that_layout_is_not_read() -> None:
    w, _, _packed = packed_pair(256, 128)
    other = torch.ops.mkldnn._reorder_linear_weight(torch.randn(256, 128), None)
    assert cpu_linear.blocked(w, other) is None
    assert cpu_linear.blocked(w.bfloat16(), other) is None


@pytest.mark.parametrize(("n", "k"), [(1024, 512), (1000, 300), (512, 1408), (70, 64)])
@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 8, 13, 37, 64, 101, 256])
@pytest.mark.parametrize("bias", [False, True])
def test_bfloat16_decode_batches_are_float32_sums_rounded_once(
    n: int, k: int, rows: int, bias: bool
) -> None:
    w, found, _packed = packed_pair(n, k, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(n * rows + k)
    x = torch.randn(rows, k + 6, generator=gen).bfloat16()[:, 2 : 2 + k]  # rows further apart
    b = torch.randn(n, generator=gen).bfloat16() if bias else None
    out = cpu_linear.product(x, found, b)
    assert out is not None and out.shape == (rows, n) and out.dtype == torch.bfloat16
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    # float32 sums in any order stay within (k + 2) u32 sum |x w| (+ |b|) of the exact value; one
    # rounding to bfloat16 adds up to u16 of the result. A misread weight is off by O(|x w|).
    scale = x.abs().double() @ w.abs().double().T + (0 if b is None else b.abs().double())
    bound = (k + 2) * 2.0**-24 * scale * (1 + 2.0**-8) + 2.0**-8 * ref.abs()
    assert ((out.double() - ref).abs() <= bound).all()


def test_bfloat16_long_chunks_and_other_inputs_are_left_to_onednn() -> None:
    w, found, _packed = packed_pair(256, 128, dtype=torch.bfloat16)
    x = torch.randn(max_rows(torch.bfloat16) + 1, 128).bfloat16()
    assert cpu_linear.product(x, found, None) is None  # a long prefill chunk's rows
    assert cpu_linear.product(x[:4].float(), found, None) is None
    assert cpu_linear.product(torch.randn(2, 256).bfloat16()[:, ::2], found, None) is None
    assert cpu_linear.product(x[:4], found, torch.randn(256)) is None  # a float32 bias
    odd = torch.randn(64, 127).bfloat16()  # k-pairs would read past a row
    assert cpu_linear.blocked(odd, torch.ops.mkldnn._reorder_linear_weight(odd, None)) is None
