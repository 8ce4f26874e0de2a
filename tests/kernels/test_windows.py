"""Sliding windows and score soft-capping in every attention backend.

The reference is held to a dense float64 oracle; every other backend to the reference, on
paged caches whose unused memory is NaN. Windows are smaller than the contexts, cross block
boundaries and chunk edges (a chunk whose first query's window begins in the cached prefix).
"""

from __future__ import annotations

import pytest
import torch
from paged_case import DEVICE, REL_TOL, TRITON_DTYPES, dense_attention, make_paged_case, rel_err

from kernels import cpu_attention, cpu_decode, get_backend, reference

CPU = torch.device("cpu")
LENS = [1, 9, 16, 17, 40, 70]
# (window, softcap): a window under, at and over block size; a cap that bends the scores.
VARIANTS = [(1, None), (5, None), (16, None), (23, 2.0), (None, 2.0), (1000, None)]


def decode_case(device: torch.device, dtype: torch.dtype = torch.float32, group: int = 2):
    case = make_paged_case(LENS, 16, num_kv_heads=2, head_dim=32, dtype=dtype, device=device)
    q = torch.randn(len(LENS), 2 * group, 32, device=device).to(dtype)
    return case, (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.3)


def extend_case(device: torch.device, dtype: torch.dtype = torch.float32):
    """Chunks of 1, 7, 0, 13 and 30 new tokens behind prefixes of 0, 9, 16, 4 and 40."""
    q_lens, prefixes = [1, 7, 0, 13, 30], [0, 9, 16, 4, 40]
    ctx = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    case = make_paged_case(ctx, 16, num_kv_heads=2, head_dim=32, dtype=dtype, device=device)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32,
                      device=device)
    q = torch.randn(sum(q_lens), 4, 32, device=device).to(dtype)
    return case, cu, (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.3)


@pytest.mark.parametrize("window,softcap", VARIANTS)
def test_reference_decode_and_extend_match_dense_windowed_attention(window, softcap) -> None:
    case, args = decode_case(CPU)
    out = reference.paged_decode_attention(*args, window=window, softcap=softcap)
    for b, n in enumerate(LENS):
        want = dense_attention(args[0][b : b + 1], case.keys[b], case.values[b], 0.3, n - 1,
                               window, softcap)
        assert rel_err(out[b : b + 1], want) < 1e-5
    case, cu, args = extend_case(CPU)
    out = reference.paged_extend_attention(*args, window=window, softcap=softcap)
    for b in range(len(case.keys)):
        s, e = int(cu[b]), int(cu[b + 1])
        if e > s:
            want = dense_attention(args[0][s:e], case.keys[b], case.values[b], 0.3,
                                   len(case.keys[b]) - (e - s), window, softcap)
            assert rel_err(out[s:e], want) < 1e-5


@pytest.mark.parametrize("window,softcap", VARIANTS)
@pytest.mark.parametrize("planned", [False, True])
@pytest.mark.parametrize("rows", [1, 16])
def test_torch_path_matches_the_reference(window, softcap, planned: bool, rows: int,
                                          monkeypatch) -> None:
    """rows: extend's query/key counts exact, or rounded up as in bfloat16 (checked in float32)."""
    monkeypatch.setattr(cpu_attention, "_extend_rows", lambda dtype: rows)
    kw = {"window": window, "softcap": softcap}
    case, args = decode_case(CPU)
    plan = cpu_attention.plan_decode(args[3], args[4], args[1]) if planned else None
    out = cpu_attention.paged_decode_attention(*args, plan=plan, **kw)
    assert rel_err(out, reference.paged_decode_attention(*args, **kw)) < 1e-5
    case, cu, args = extend_case(CPU)
    plan = cpu_attention.plan_extend(args[3], cu, args[5], args[1]) if planned else None
    q_lens = (cu[1:] - cu[:-1]).tolist()
    new_kv = tuple(torch.cat([t[len(t) - n :] for t, n in zip(ts, q_lens, strict=True)])
                   for ts in (case.keys, case.values))  # the chunks' own K/V, as the model passes
    out = cpu_attention.paged_extend_attention(*args, plan=plan, new_kv=new_kv, **kw)
    assert rel_err(out, reference.paged_extend_attention(*args, **kw)) < 1e-5


@pytest.mark.skipif(cpu_decode.load() is None, reason="no C compiler")
@pytest.mark.parametrize("window,softcap", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_c_decode_kernel_matches_the_reference(window, softcap, dtype) -> None:
    case, args = decode_case(CPU, dtype, group=4)
    args = (args[0].float(), *args[1:])
    kw = {"window": window, "softcap": softcap}
    out = cpu_decode.paged_decode_attention(*args, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-3
    assert rel_err(out, reference.paged_decode_attention(*args, **kw)) < tol


@pytest.mark.parametrize("window,softcap", [(5, None), (23, 2.0), (None, 2.0)])
@pytest.mark.parametrize("dtype", TRITON_DTYPES)
def test_triton_decode_and_extend_match_the_reference(window, softcap, dtype) -> None:
    pytest.importorskip("triton")
    backend = get_backend("triton")
    kw = {"window": window, "softcap": softcap}
    case, args = decode_case(DEVICE, dtype)
    for splits in (1, 3):
        from kernels.triton_ops import decode

        out = decode.paged_decode_attention(*args, num_splits=splits, **kw)
        assert rel_err(out, reference.paged_decode_attention(*args, **kw)) < REL_TOL[dtype]
    case, cu, args = extend_case(DEVICE, dtype)
    out = backend.extend(*args, **kw)
    assert rel_err(out, reference.paged_extend_attention(*args, **kw)) < REL_TOL[dtype]
