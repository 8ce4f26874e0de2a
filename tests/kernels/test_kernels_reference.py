"""The torch reference (CPU serving path and the Triton kernels' oracle) against dense attention."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from paged_case import dense_attention, make_paged_case, rel_err

import kernels
from kernels import cpu_attention, reference

CPU = torch.device("cpu")


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_reference_decode_matches_dense_attention(group: int, block_size: int) -> None:
    lens = [1, block_size, 2 * block_size, 3 * block_size + 5, 131]
    case = make_paged_case(lens, block_size, num_kv_heads=2, head_dim=32, dtype=torch.float32,
                           device=CPU)
    q = torch.randn(len(lens), 2 * group, 32)
    out = reference.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables,
                                           case.context_lens, 0.2)
    for b, n in enumerate(lens):
        ref = dense_attention(q[b : b + 1], case.keys[b], case.values[b], 0.2, prefix=n - 1)
        assert rel_err(out[b : b + 1], ref) < 1e-5


@pytest.mark.parametrize("group", [1, 4])
def test_reference_extend_matches_dense_causal_attention(group: int) -> None:
    q_lens = [1, 7, 16, 40]
    prefixes = [0, 33, 0, 100]  # empty prefix, uneven prefix, exact-block chunk, long prefix
    lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    case = make_paged_case(lens, 16, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=CPU)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 2 * group, 32)
    out = reference.paged_extend_attention(q, case.k_cache, case.v_cache, case.block_tables, cu,
                                           case.context_lens, 0.15)
    for b in range(len(lens)):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        ref = dense_attention(q[rows], case.keys[b], case.values[b], 0.15, prefix=prefixes[b])
        assert rel_err(out[rows], ref) < 1e-5


def test_reference_extend_bounds_score_memory_without_changing_result(monkeypatch) -> None:
    case = make_paged_case([70], 16, num_kv_heads=1, head_dim=16, dtype=torch.float32, device=CPU)
    q = torch.randn(50, 2, 16)
    cu = torch.tensor([0, 50], dtype=torch.int32)
    args = (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.3)
    whole = reference.paged_extend_attention(*args)
    monkeypatch.setattr(reference, "_SCORE_BUDGET", 2 * 70 * 7)  # 7 rows per slice
    assert torch.allclose(reference.paged_extend_attention(*args), whole, atol=1e-6)


def test_decode_is_extend_with_one_query_token() -> None:
    lens = [5, 48, 17]
    case = make_paged_case(lens, 16, num_kv_heads=2, head_dim=16, dtype=torch.float32, device=CPU)
    q = torch.randn(3, 4, 16)
    cu = torch.arange(4, dtype=torch.int32)
    dec = reference.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables,
                                           case.context_lens, 0.25)
    ext = reference.paged_extend_attention(q, case.k_cache, case.v_cache, case.block_tables, cu,
                                           case.context_lens, 0.25)
    assert torch.allclose(dec, ext, atol=1e-6)


def test_reference_runs_in_bf16_with_fp32_softmax() -> None:
    case = make_paged_case([40, 3], 16, num_kv_heads=1, head_dim=32, dtype=torch.bfloat16,
                           device=CPU)
    q = torch.randn(2, 2, 32).to(torch.bfloat16)
    out = reference.paged_decode_attention(q, case.k_cache, case.v_cache, case.block_tables,
                                           case.context_lens, 0.2)
    assert out.dtype == torch.bfloat16
    for b, n in enumerate([40, 3]):
        ref = dense_attention(q[b : b + 1], case.keys[b], case.values[b], 0.2, prefix=n - 1)
        assert rel_err(out[b : b + 1], ref) < 1e-2


def test_write_kv_stores_tokens_in_their_slots_and_skips_minus_one() -> None:
    k_cache = torch.zeros(4, 8, 2, 16)
    v_cache = torch.zeros(4, 8, 2, 16)
    key, value = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
    slots = torch.tensor([3, -1, 8 * 2 + 7, 8 * 3, -1])
    reference.write_kv(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache[0, 3], key[0]) and torch.equal(v_cache[2, 7], value[2])
    assert torch.equal(k_cache[3, 0], key[3]) and torch.equal(v_cache[3, 0], value[3])
    assert int((k_cache != 0).any(dim=(2, 3)).sum()) == 3  # the skipped tokens wrote nothing


def test_get_backend_names_the_choices_for_an_unknown_name() -> None:
    with pytest.raises(ValueError, match="cpu, torch, triton, reference"):
        kernels.get_backend("cuda")
    assert kernels.get_backend("reference").decode is reference.paged_decode_attention
    assert kernels.get_backend("torch").decode is cpu_attention.paged_decode_attention


def test_default_backend_is_cpu_on_cpu() -> None:
    assert kernels.default_backend_name(torch.device("cpu")) == "cpu"


def test_import_kernels_works_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import kernels, torch\n"
        "assert kernels.default_backend_name(torch.device('cpu')) == 'cpu'\n"
        "kernels.get_backend('cpu'), kernels.get_backend('torch')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
