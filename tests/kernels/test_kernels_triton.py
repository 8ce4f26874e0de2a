"""Each Triton kernel against the torch reference: on CUDA if present, else the CPU interpreter.

Shapes stay tiny on CPU (the interpreter runs each program in numpy); on a GPU the same tests run
with bf16 and the head dims / block sizes the server uses.
"""

from __future__ import annotations

import pytest
import torch
from paged_case import DEVICE, ON_GPU, REL_TOL, TRITON_DTYPES, make_paged_case, rel_err

from kernels import reference

pytest.importorskip("triton")
from kernels import get_backend, triton_ops  # noqa: E402

HEAD_DIMS = [64, 128, 256] if ON_GPU else [32]
BLOCK_SIZES = [16, 64, 256] if ON_GPU else [16, 32]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_write_kv_matches_reference_and_skips_minus_one(dtype: torch.dtype) -> None:
    num_blocks, block_size, heads, head_dim = 6, 16, 3, 32
    k_cache = torch.randn(num_blocks, block_size, heads, head_dim, device=DEVICE).to(dtype)
    v_cache = torch.randn_like(k_cache)
    fused = torch.randn(7, 2 * heads, head_dim, device=DEVICE).to(dtype)  # a strided view, like qkv
    key, value = fused[:, :heads], fused[:, heads:]
    slots = torch.tensor([5, -1, 17, 95, 40, -1, 0], device=DEVICE)
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    reference.write_kv(key, value, expect_k, expect_v, slots)
    triton_ops.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


DECODE_CASES = [
    # (context lengths, block_size, group, num_splits)
    ([1, 16, 32, 45, 130], 16, 1, None),
    ([1, 16, 32, 45, 130], 16, 2, 3),
    ([33, 64, 7], 32, 4, 2),
    ([200, 2, 64], 16, 8, 5),  # more splits than some sequences have tiles: empty splits
    ([97], 32, 4, 1),
]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("lens,block_size,group,num_splits", DECODE_CASES)
def test_decode_matches_reference(lens, block_size, group, num_splits, dtype) -> None:
    num_kv_heads, head_dim = 2, HEAD_DIMS[0]
    case = make_paged_case(lens, block_size, num_kv_heads, head_dim, dtype)
    q = torch.randn(len(lens), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, head_dim**-0.5)
    out = triton_ops.paged_decode_attention(*args, num_splits=num_splits)
    ref = reference.paged_decode_attention(*args)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_num_splits_keep_a_tile_per_split_and_stop_once_programs_fill_the_sms() -> None:
    from kernels.triton_ops.decode import MIN_TOKENS_PER_SPLIT as TILE
    from kernels.triton_ops.decode import choose_num_splits

    cpu = torch.device("cpu")  # stands in for a 4-SM device: 1 x 2 programs want 4 splits
    assert choose_num_splits(1, 2, TILE - 1, cpu) == 1
    assert choose_num_splits(1, 2, 2 * TILE, cpu) == 2
    assert choose_num_splits(1, 2, 32768, cpu) == 4
    assert choose_num_splits(2, 2, 32768, cpu) == 1  # batch * kv heads already cover the SMs


def test_unsplit_and_split_decode_agree_on_one_context() -> None:
    dtype = torch.float32
    case = make_paged_case([300, 41], 16, 2, HEAD_DIMS[0], dtype)
    q = torch.randn(2, 4, HEAD_DIMS[0], device=DEVICE).to(dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.2)
    one = triton_ops.paged_decode_attention(*args, num_splits=1)
    for splits in (2, 8):
        assert rel_err(triton_ops.paged_decode_attention(*args, num_splits=splits), one) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="server shapes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_decode_server_shapes_match_reference(head_dim, block_size, dtype) -> None:
    lens = [1, block_size, 3000, 517, 4 * block_size + 1]
    case = make_paged_case(lens, block_size, 8, head_dim, dtype)
    q = torch.randn(len(lens), 32, head_dim, device=DEVICE).to(dtype)
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, head_dim**-0.5)
    ref = reference.paged_decode_attention(*args)
    for splits in (None, 1, 7):
        out = triton_ops.paged_decode_attention(*args, num_splits=splits)
        assert rel_err(out, ref) < REL_TOL[dtype]


def _extend_inputs(q_lens, prefixes, block_size, group, head_dim, dtype, num_kv_heads=2):
    lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    case = make_paged_case(lens, block_size, num_kv_heads, head_dim, dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEVICE)
    q = torch.randn(sum(q_lens), num_kv_heads * group, head_dim, device=DEVICE).to(dtype)
    return (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens,
            head_dim**-0.5)


EXTEND_CASES = [
    # (chunk lengths, cached prefix lengths, block_size, group)
    ([5, 1, 32, 20], [0, 40, 16, 3], 16, 1),  # empty prefix, decode-like, block-exact chunk
    ([40, 3], [0, 0], 16, 2),  # plain prefill: no prefix at all
    ([17, 9], [70, 32], 32, 4),  # long prefix, chunk crossing blocks
    ([24], [45], 16, 8),
]


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("q_lens,prefixes,block_size,group", EXTEND_CASES)
def test_extend_matches_reference(q_lens, prefixes, block_size, group, dtype) -> None:
    args = _extend_inputs(q_lens, prefixes, block_size, group, HEAD_DIMS[0], dtype)
    out = triton_ops.paged_extend_attention(*args)
    ref = reference.paged_extend_attention(*args)
    assert out.dtype == dtype and out.shape == args[0].shape
    assert rel_err(out, ref) < REL_TOL[dtype]


@pytest.mark.skipif(not ON_GPU, reason="server shapes are too slow for the interpreter")
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_extend_server_shapes_match_reference(head_dim, block_size, dtype) -> None:
    args = _extend_inputs([300, 1, 512, 129], [0, 1000, 256, 4097], block_size, 4, head_dim,
                          dtype, num_kv_heads=8)
    out = triton_ops.paged_extend_attention(*args)
    assert rel_err(out, reference.paged_extend_attention(*args)) < REL_TOL[dtype]


def test_extend_with_one_token_chunks_equals_decode() -> None:
    dtype = TRITON_DTYPES[0]
    args = _extend_inputs([1, 1, 1], [0, 31, 64], 16, 2, HEAD_DIMS[0], dtype)
    q, kc, vc, bt, _, ctx, scale = args
    ext = triton_ops.paged_extend_attention(*args)
    dec = triton_ops.paged_decode_attention(q, kc, vc, bt, ctx, scale)
    assert rel_err(ext, dec) < REL_TOL[dtype]


def test_triton_backend_bundles_the_triton_kernels() -> None:
    backend = get_backend("triton")
    assert backend.name == "triton" and backend.extend is triton_ops.paged_extend_attention


def test_head_dim_that_is_not_a_power_of_two_is_rejected() -> None:
    case = make_paged_case([4], 16, 1, 16, torch.float32)
    q = torch.randn(1, 1, 24, device=DEVICE)
    kc = torch.zeros(case.k_cache.shape[:3] + (24,), device=DEVICE)
    with pytest.raises(ValueError, match="power of two"):
        triton_ops.paged_decode_attention(q, kc, kc, case.block_tables, case.context_lens, 1.0)


@pytest.mark.parametrize("head_dim,block_size", [(16, 64), (64, 16)] if not ON_GPU else [(32, 32)])
def test_other_head_dims_and_block_sizes_match_reference(head_dim: int, block_size: int) -> None:
    dtype = torch.float16
    args = _extend_inputs([9, 1], [block_size + 3, 2 * block_size - 1], block_size, 2, head_dim,
                          dtype)
    assert rel_err(triton_ops.paged_extend_attention(*args),
                   reference.paged_extend_attention(*args)) < REL_TOL[dtype]
    q, kc, vc, bt, _, ctx, scale = args
    q1 = q[:2].contiguous()
    for splits in (1, 2):
        out = triton_ops.paged_decode_attention(q1, kc, vc, bt, ctx, scale, num_splits=splits)
        ref = reference.paged_decode_attention(q1, kc, vc, bt, ctx, scale)
        assert rel_err(out, ref) < REL_TOL[dtype]
