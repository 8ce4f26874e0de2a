"""The compiled CPU decode kernel (kernels.cpu_decode) against the torch reference, its oracle.

Unused cache memory is NaN (paged_case), so any read outside a sequence's context shows up.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from paged_case import make_paged_case, rel_err

import kernels
from kernels import cpu_attention, cpu_decode, reference

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu_decode.load() is None, reason="no C compiler with OpenMP")


def both(lens: list[int], heads: int, kv_heads: int, dim: int, block_size: int,
         dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    case = make_paged_case(lens, block_size, kv_heads, dim, dtype=dtype, device=CPU)
    q = torch.randn(len(lens), heads, dim)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, dim**-0.5)
    return cpu_decode.paged_decode_attention(*args), reference.paged_decode_attention(*args)


# Batches under 8 give each task one KV head, larger ones all of a sequence's heads: both paths.
@pytest.mark.parametrize("lens", [[1, 300, 17], [5, 16, 129, 300, 1, 33, 64, 65, 250, 7]])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_the_reference_without_reading_unused_memory(
    lens: list[int], heads: int, kv_heads: int, block_size: int
) -> None:
    out, ref = both(lens, heads, kv_heads, 64, block_size, torch.float32)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


def test_contexts_spanning_many_softmax_tiles_and_wide_heads() -> None:
    out, ref = both([1000, 129, 128, 257], 16, 4, 128, 16, torch.float32)
    assert rel_err(out, ref) < 1e-5


def test_bf16_cache_widens_to_fp32_and_returns_the_query_dtype() -> None:
    case = make_paged_case([40, 3, 170], 16, 2, 64, dtype=torch.bfloat16, device=CPU)
    q = torch.randn(3, 4, 64).to(torch.bfloat16)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.125)
    out = cpu_decode.paged_decode_attention(*args)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference.paged_decode_attention(*args)) < 1e-2


@pytest.mark.parametrize("dim", [64, 128, 80], ids=["dp-64", "dp-128", "no-dp-80"])
@pytest.mark.parametrize("batch", [3, 12], ids=["head-tasks", "sequence-tasks"])
def test_bf16_queries_meet_bf16_keys_in_bf16_products(dim: int, batch: int) -> None:
    """A bf16 model's queries and keys (AVX-512 BF16 dot products where the CPU has them and the
    head dim is a multiple of 32, else widened to fp32): the fp32 reference on the same values,
    within fp32 summation error, over contexts that span several softmax tiles and 16-position
    groups with remainders."""
    lens = [1, 17, 300, 129, 40, 5, 250, 16, 31, 64, 200, 3][:batch]
    case = make_paged_case(lens, 16, 2, dim, dtype=torch.bfloat16, device=CPU)
    q = torch.randn(batch, 4, dim).to(torch.bfloat16)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, dim**-0.5)
    out = cpu_decode.paged_decode_attention(*args)
    ref = reference.paged_decode_attention(q.float(), case.k_cache.float(), case.v_cache.float(),
                                           *args[3:])
    assert rel_err(out.float(), ref) < 1e-2  # the output's own bf16 rounding


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize(("heads", "kv_heads"), [(6, 2), (8, 2), (4, 4)], ids=["group3", "group4", "mha"])
@pytest.mark.parametrize("batch", [3, 12], ids=["head-tasks", "sequence-tasks"])
def test_grouped_walk_over_every_head_dim_and_group_size(
    dtype: torch.dtype, dim: int, heads: int, kv_heads: int, batch: int
) -> None:
    """The grouped walks (16 positions, decode_grouped.h, with AVX-512; 8 positions,
    decode_grouped_avx2.h, with AVX2 only) for each head dim they take, tasks of one KV head and of
    all of a sequence's, with query heads per KV head that fill their register blocks exactly and
    ones that leave a remainder; contexts with partial groups, many groups and single positions;
    a bf16 query and output with a bf16 cache."""
    lens = [1, 17, 300, 129, 40, 5, 250, 16, 31, 64, 200, 3][:batch]
    case = make_paged_case(lens, 16, kv_heads, dim, dtype=dtype, device=CPU)
    q = torch.randn(len(lens), heads, dim).to(dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, dim**-0.5)
    out = cpu_decode.paged_decode_attention(*args)
    assert out.dtype == dtype
    ref = reference.paged_decode_attention(q.float(), case.k_cache.float(), case.v_cache.float(),
                                           *args[3:])
    assert rel_err(out.float(), ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize(("dtype", "dim"), [(torch.float32, 16), (torch.bfloat16, 64)])
def test_the_cpu_backend_takes_the_strided_query_view_the_model_passes(
    dtype: torch.dtype, dim: int
) -> None:
    """Read where it lies: the query heads of the fused q/k/v projection's output, rows apart by
    the whole projection."""
    case = make_paged_case([40, 3, 70], 16, 2, dim, dtype=dtype, device=CPU)
    qkv = torch.randn(3, 4 + 2 + 2, dim).to(dtype)  # q heads, then k and v heads
    args = (qkv[:, :4], case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.25)
    backend = kernels.get_backend("cpu")
    assert backend.name == "cpu"
    expected = reference.paged_decode_attention(qkv[:, :4].float(), case.k_cache.float(),
                                                case.v_cache.float(), *args[3:])
    out = backend.decode(*args)
    assert out.dtype == dtype
    assert rel_err(out.float(), expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_without_the_kernel_the_cpu_backend_is_the_torch_path() -> None:
    code = (
        "import kernels\n"
        "b = kernels.get_backend('cpu')\n"
        "assert b.name == 'torch', b.name\n"
    )
    env = {**os.environ, "PAGEWIRE_CPU_DECODE": "0"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_a_missing_compiler_means_no_kernel_not_an_error(tmp_path) -> None:
    code = "from kernels import cpu_decode\nassert cpu_decode.load() is None\n"
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"),
           "PAGEWIRE_KERNEL_CACHE": str(tmp_path / "cache")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_loading_the_kernel_leaves_the_process_float_environment_alone() -> None:
    """A library linked with -ffast-math flushes subnormals to zero in every thread of the process
    that loads it (torch's kernels, Python's floats): the kernel must not be built that way."""
    code = (
        "from kernels import cpu_decode\n"
        "assert cpu_decode.load() is not None\n"
        "import torch\n"
        "tiny = torch.tensor([1e-40], dtype=torch.float32)\n"
        "assert float(tiny * 1.0) != 0.0, 'subnormal float32 flushed to zero'\n"
        "assert 5e-324 * 1.0 != 0.0, 'subnormal float64 flushed to zero'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("scale", [1e-3, 0.125, 4.0, 40.0])
def test_flat_and_sharply_peaked_softmax_match_the_reference(scale: float) -> None:
    """Scores from near-equal to hundreds apart: the kernel's own exp must hold over the range."""
    case = make_paged_case([300, 77, 129], 16, 2, 64, dtype=torch.float32, device=CPU)
    q = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1))
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, scale)
    out = cpu_decode.paged_decode_attention(*args)
    # At scale 40 scores reach ~10^3: the kernel's float32 score rounding alone moves each
    # probability by up to ~2e-5 relative (measured against a float64 reference), whatever exp
    # is used; the exp itself is held to 1e-5 at the smaller scales.
    assert rel_err(out, reference.paged_decode_attention(*args)) < (1e-5 if scale <= 4 else 1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_writes_the_projections_rows_into_their_slots(dtype: torch.dtype,
                                                               monkeypatch) -> None:
    """The K and V views of a fused q/k/v projection (rows further apart than their length) go
    to their slots in one call, as the torch store puts them; nothing else is touched."""
    shape = (6, 4, 2, 8)  # blocks, block size, KV heads, head dim
    qkv = torch.randn(5, 4 + 2 + 2, 8).to(dtype)
    key, value = qkv[:, 4:6], qkv[:, 6:8]
    slots = torch.tensor([3, 9, 17, 22, 0])
    got = [torch.full(shape, float("nan")).to(dtype) for _ in range(2)]
    want = [t.clone() for t in got]
    cpu_attention.store_kv(key, value, *want, slots)
    monkeypatch.setattr(cpu_attention, "store_kv", None)  # the compiled copy, not the fallback
    cpu_decode.store_kv(key, value, *got, slots)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g.nan_to_num(7.0), w.nan_to_num(7.0))
    assert kernels.get_backend("cpu").store_kv is cpu_decode.store_kv
