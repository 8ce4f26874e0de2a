"""The CPU serving attention (kernels.cpu_attention) against the torch reference, its oracle.

Unused cache memory is NaN (paged_case), so any read of it into a result shows up as a failure.
"""

from __future__ import annotations

import pytest
import torch
from paged_case import make_paged_case, rel_err

from kernels import cpu_attention, reference

CPU = torch.device("cpu")
LENS = [1, 15, 16, 17, 53, 131, 7, 300]  # partial, exact and multi-block contexts, unsorted


def decode_both(case, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, scale)
    return cpu_attention.paged_decode_attention(*args), reference.paged_decode_attention(*args)


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_decode_matches_reference_without_reading_unused_memory(group: int, block_size: int) -> None:
    case = make_paged_case(LENS, block_size, num_kv_heads=2, head_dim=32, dtype=torch.float32,
                           device=CPU)
    out, ref = decode_both(case, torch.randn(len(LENS), 2 * group, 32), 0.2)
    assert out.shape == ref.shape and rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("group_bytes", [1, 64 * 1024, 1 << 40])
def test_decode_result_does_not_depend_on_how_sequences_are_grouped(monkeypatch,
                                                                     group_bytes: int) -> None:
    case = make_paged_case(LENS, 16, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=CPU)
    q = torch.randn(len(LENS), 4, 32)
    monkeypatch.setattr(cpu_attention, "_GROUP_BYTES", group_bytes)  # one run each .. all in one
    out, ref = decode_both(case, q, 0.3)
    assert rel_err(out, ref) < 1e-5


def test_decode_takes_the_strided_query_view_the_model_passes() -> None:
    case = make_paged_case([40, 3, 70], 16, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                           device=CPU)
    qkv = torch.randn(3, 4 + 2 + 2, 16)  # q heads, then k and v heads, as the fused projection
    out, ref = decode_both(case, qkv[:, :4], 0.25)
    assert rel_err(out, ref) < 1e-5


def test_decode_of_an_empty_batch_is_empty() -> None:
    case = make_paged_case([5], 16, num_kv_heads=1, head_dim=16, dtype=torch.float32, device=CPU)
    q = torch.randn(0, 2, 16)
    out = cpu_attention.paged_decode_attention(q, case.k_cache, case.v_cache,
                                               case.block_tables[:0], case.context_lens[:0], 0.2)
    assert out.shape == (0, 2, 16)


@pytest.fixture(params=[1, 16], ids=["exact", "rows-of-16"])
def extend_rows(request, monkeypatch) -> int:
    """Extend attention with its query/key counts exact, and rounded up to 16 as it runs in
    bfloat16 (here in float32, so the padding is checked to a tight tolerance)."""
    monkeypatch.setattr(cpu_attention, "_extend_rows", lambda dtype: request.param)
    return request.param


@pytest.mark.parametrize("group", [1, 4])
def test_extend_matches_reference_with_and_without_a_cached_prefix(group: int,
                                                                   extend_rows: int) -> None:
    q_lens = [1, 7, 16, 0, 40, 33]
    prefixes = [0, 33, 0, 5, 100, 0]  # the empty chunk is skipped; no prefix takes the causal path
    lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    case = make_paged_case(lens, 16, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=CPU)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 2 * group, 32)
    args = (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.15)
    out = cpu_attention.paged_extend_attention(*args)
    assert rel_err(out, reference.paged_extend_attention(*args)) < 1e-5


def test_bf16_cache_gives_bf16_output_close_to_reference() -> None:
    case = make_paged_case([40, 3, 17], 16, num_kv_heads=1, head_dim=32, dtype=torch.bfloat16,
                           device=CPU)
    q = torch.randn(3, 2, 32).to(torch.bfloat16)
    out, ref = decode_both(case, q, 0.2)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 1e-2
    cu = torch.tensor([0, 40, 43, 60], dtype=torch.int32)
    qe = torch.randn(60, 2, 32).to(torch.bfloat16)
    args = (qe, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.2)
    ext = cpu_attention.paged_extend_attention(*args)
    assert ext.dtype == torch.bfloat16
    assert cpu_attention.plan_extend(case.block_tables, cu, case.context_lens, case.k_cache).rows == 16
    assert rel_err(ext, reference.paged_extend_attention(*args)) < 1e-2


def test_decode_groups_are_sorted_runs_within_the_byte_budget(monkeypatch) -> None:
    monkeypatch.setattr(cpu_attention, "_GROUP_BYTES", 1000)  # 100 tokens of 10 bytes
    sorted_lens = [5, 10, 20, 30, 40, 60, 150, 160]
    runs = cpu_attention.decode_groups(sorted_lens, bytes_per_token=10)
    # 3 x 20 <= 100 < 4 x 30; 2 x 40 <= 100 < 3 x 60; 150 and 160 are over budget alone
    assert runs == [(0, 3), (3, 5), (5, 6), (6, 7), (7, 8)]
    assert cpu_attention.decode_groups([], 10) == []


def test_a_plan_made_once_gives_every_layer_the_same_result_as_planning_per_call() -> None:
    case = make_paged_case(LENS, 16, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=CPU)
    plan = cpu_attention.plan_decode(case.block_tables, case.context_lens, case.k_cache)
    for layer in range(3):  # same tables, a different query per layer
        q = torch.randn(len(LENS), 4, 32)
        args = (q, case.k_cache, case.v_cache, case.block_tables, case.context_lens, 0.2)
        planned = cpu_attention.paged_decode_attention(*args, plan=plan)
        assert torch.equal(planned, cpu_attention.paged_decode_attention(*args)), layer
        assert rel_err(planned, reference.paged_decode_attention(*args)) < 1e-5


def test_extend_attends_to_the_chunks_own_kv_when_there_is_no_prefix(extend_rows: int) -> None:
    """new_kv is what a chunk without a cached prefix reads: with its cache rows poisoned after
    the fact, the result is still the reference's on the intact cache."""
    q_lens, prefixes = [20, 9, 33], [0, 40, 0]
    lens = [p + n for p, n in zip(prefixes, q_lens, strict=True)]
    case = make_paged_case(lens, 16, num_kv_heads=2, head_dim=32, dtype=torch.float32, device=CPU)
    cu = torch.tensor([0, 20, 29, 62], dtype=torch.int32)
    q = torch.randn(62, 4, 32)
    args = (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.15)
    expected = reference.paged_extend_attention(*args)
    # The chunks' own K/V rows in query order: all of sequences 0 and 2, the tail of sequence 1.
    new_k = torch.cat([case.keys[0], case.keys[1][40:], case.keys[2]])
    new_v = torch.cat([case.values[0], case.values[1][40:], case.values[2]])
    plan = cpu_attention.plan_extend(case.block_tables, cu, case.context_lens, case.k_cache)
    for b in (0, 2):  # the prefix-free chunks' cache rows: never read when new_kv is given
        table = case.block_tables[b, : -(-lens[b] // 16)].long()
        case.k_cache[table] = float("nan")
        case.v_cache[table] = float("nan")
    out = cpu_attention.paged_extend_attention(*args, plan=plan, new_kv=(new_k, new_v))
    assert rel_err(out, expected) < 1e-5


@pytest.mark.parametrize("skip_one", [False, True])
def test_write_kv_stores_like_the_reference_with_and_without_skipped_slots(skip_one: bool) -> None:
    shape = (6, 4, 2, 8)
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([3, 9, 17, 22, 0])
    if skip_one:
        slots[1] = -1
    ours = [torch.zeros(shape), torch.zeros(shape)]
    theirs = [torch.zeros(shape), torch.zeros(shape)]
    cpu_attention.write_kv(key, value, *ours, slots)
    reference.write_kv(key, value, *theirs, slots)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_store_kv_stores_a_mapping_without_skipped_slots_as_write_kv_does() -> None:
    shape = (6, 4, 2, 8)
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([3, 9, 17, 22, 0])
    stored = [torch.zeros(shape), torch.zeros(shape)]
    written = [torch.zeros(shape), torch.zeros(shape)]
    cpu_attention.store_kv(key, value, *stored, slots)
    cpu_attention.write_kv(key, value, *written, slots)
    assert torch.equal(stored[0], written[0]) and torch.equal(stored[1], written[1])
