"""The compiled prefill attention (kernels.cpu_extend: bfloat16 on AMX tiles or in AVX-512 BF16
dot products, or widened to the float32 kernel; float32 on AVX2) against the reference.

Chunks with and without a cached prefix, lengths that fill no tile or key block evenly, GQA
groups, sliding windows, the head dims each takes; the cache's unused memory is NaN
(paged_case), so a read past a chunk's keys shows up. Against the float32-accurate reference,
held to the torch path's bound for the dtype (bfloat16: rel. error 1e-2, the output's own rounding
is 4e-3; float32: 1e-4), and against a float64 oracle as close as the torch path it replaces.
"""

from __future__ import annotations

import pytest
import torch
from paged_case import REL_TOL, make_paged_case, rel_err

from kernels import cpu_attention, cpu_extend, reference

BF16, F32 = torch.bfloat16, torch.float32
NATIVE_BF16 = cpu_extend.load() is not None or cpu_extend.load_avx512bf16() is not None
KERNELS = [  # bfloat16: on AMX tiles or in AVX-512 BF16 dot products; else widened to float32
    pytest.param("bfloat16", marks=pytest.mark.skipif(
        not cpu_extend.takes(torch.empty(0, dtype=BF16), 64),
        reason="no C compiler, or none of AMX, AVX-512 BF16, AVX2 on this CPU")),
    pytest.param("bfloat16-widened", marks=pytest.mark.skipif(
        not NATIVE_BF16 or cpu_extend.load_f32() is None,
        reason="bfloat16 runs widened here anyway (the case above), or no float32 kernel")),
    pytest.param("float32", marks=pytest.mark.skipif(cpu_extend.load_f32() is None,
                                                     reason="no C compiler, or no AVX2 + FMA")),
]
HEAD_DIMS = {BF16: (64, 80, 128), F32: (64, 80, 128)}


@pytest.fixture
def dtype(request, monkeypatch) -> torch.dtype:
    """The kernel under test, by name; its dtype. "bfloat16-widened" hides the bfloat16 kernels."""
    if request.param == "bfloat16-widened":
        monkeypatch.setattr(cpu_extend, "load", lambda: None)
        monkeypatch.setattr(cpu_extend, "load_avx512bf16", lambda: None)
    return BF16 if request.param.startswith("bfloat16") else F32


# (new tokens, cached prefix) per chunk: none, a few, exactly a tile, across key blocks
CHUNKS = [(1, 0), (7, 0), (16, 0), (70, 0), (200, 0), (9, 40), (33, 64), (1, 130), (65, 64)]


def extend_case(dtype: torch.dtype, head_dim: int, group: int, chunks=CHUNKS):
    q_lens = [n for n, _ in chunks]
    case = make_paged_case([n + p for n, p in chunks], 16, num_kv_heads=2, head_dim=head_dim,
                           dtype=dtype)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 2 * group, head_dim).to(dtype)
    new_kv = tuple(torch.cat([t[len(t) - n :] for t, n in zip(ts, q_lens, strict=True)])
                   for ts in (case.keys, case.values))
    return case, (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.125), new_kv


@pytest.mark.parametrize("dtype", KERNELS, indirect=True)
@pytest.mark.parametrize("group", [1, 2, 4, 7])
@pytest.mark.parametrize("window", [None, 5, 16, 50])
def test_compiled_extend_matches_the_reference(dtype: torch.dtype, group: int, window,
                                               monkeypatch) -> None:
    calls = []
    attend = cpu_extend.attend
    monkeypatch.setattr(cpu_extend, "attend", lambda *a: calls.append(attend(*a)) or calls[-1])
    for head_dim in HEAD_DIMS[dtype]:
        case, args, new_kv = extend_case(dtype, head_dim, group)
        out = cpu_attention.paged_extend_attention(*args, new_kv=new_kv, window=window)
        assert calls == [True] * len(CHUNKS)  # every chunk went through the kernel
        assert out.dtype == dtype and not out.isnan().any()
        assert rel_err(out, reference.paged_extend_attention(*args, window=window)) < REL_TOL[
            dtype] / 2
        calls.clear()


@pytest.mark.parametrize("dtype", KERNELS, indirect=True)
def test_its_error_is_the_torch_paths_error(dtype: torch.dtype, monkeypatch) -> None:
    """Against a float64 oracle the kernel is as close as the fused torch attention it replaces."""
    case, args, new_kv = extend_case(dtype, 64, 2, [(300, 0), (45, 100)])
    oracle = reference.paged_extend_attention(args[0].double(), case.k_cache.double(),
                                              case.v_cache.double(), *args[3:])
    compiled = cpu_attention.paged_extend_attention(*args, new_kv=new_kv)
    monkeypatch.setattr(cpu_extend, "takes", lambda q, head_dim: False)  # the torch path
    torch_path = cpu_attention.paged_extend_attention(*args, new_kv=new_kv)
    assert rel_err(compiled, oracle) < 1.1 * rel_err(torch_path, oracle)


@pytest.mark.parametrize("dtype", KERNELS, indirect=True)
def test_calls_it_does_not_take_are_refused_untouched(dtype: torch.dtype) -> None:
    q = torch.randn(5, 2, 72).to(dtype)  # head dim 72: neither kernel's
    kv = torch.randn(5, 1, 72).to(dtype)
    out = torch.zeros_like(q)
    assert not cpu_extend.takes(q, 72)
    assert not cpu_extend.attend(q, kv, kv, 0, None, 0.1, out)
    other = torch.float32 if dtype == BF16 else BF16
    q64, kv64 = torch.randn(5, 2, 64).to(dtype), torch.randn(5, 1, 64).to(other)
    out64 = torch.zeros_like(q64)
    assert not cpu_extend.attend(q64, kv64, kv64, 0, None, 0.1, out64)  # dtype mismatch
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(out64, torch.zeros_like(q64))
