"""The compiled bfloat16 prefill attention (kernels.cpu_extend, AMX tiles) against the reference.

Chunks with and without a cached prefix, lengths that fill no tile or key block evenly, GQA
groups, sliding windows, both head dims it takes; the cache's unused memory is NaN
(paged_case), so a read past a chunk's keys shows up. bfloat16 against the float32-accurate
reference: held to the same bound as the torch path's bfloat16 (rel. error 1e-2, the output's own
rounding is 4e-3).
"""

from __future__ import annotations

import pytest
import torch
from paged_case import make_paged_case, rel_err

from kernels import cpu_attention, cpu_extend, reference

pytestmark = pytest.mark.skipif(cpu_extend.load() is None,
                                reason="no C compiler, or no AMX on this CPU")
BF16 = torch.bfloat16
# (new tokens, cached prefix) per chunk: none, a few, exactly a tile, across key blocks
CHUNKS = [(1, 0), (7, 0), (16, 0), (70, 0), (200, 0), (9, 40), (33, 64), (1, 130), (65, 64)]


def extend_case(head_dim: int, group: int, chunks=CHUNKS):
    q_lens = [n for n, _ in chunks]
    case = make_paged_case([n + p for n, p in chunks], 16, num_kv_heads=2, head_dim=head_dim,
                           dtype=BF16)
    cu = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(q_lens), 2 * group, head_dim).to(BF16)
    new_kv = tuple(torch.cat([t[len(t) - n :] for t, n in zip(ts, q_lens, strict=True)])
                   for ts in (case.keys, case.values))
    return case, (q, case.k_cache, case.v_cache, case.block_tables, cu, case.context_lens, 0.125), new_kv


@pytest.mark.parametrize("head_dim", cpu_extend.HEAD_DIMS)
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 5, 16, 50])
def test_compiled_extend_matches_the_reference(head_dim: int, group: int, window, monkeypatch
                                               ) -> None:
    calls = []
    attend = cpu_extend.attend
    monkeypatch.setattr(cpu_extend, "attend", lambda *a: calls.append(attend(*a)) or calls[-1])
    case, args, new_kv = extend_case(head_dim, group)
    out = cpu_attention.paged_extend_attention(*args, new_kv=new_kv, window=window)
    assert calls == [True] * len(CHUNKS)  # every chunk went through the kernel
    assert out.dtype == BF16 and not out.isnan().any()
    assert rel_err(out, reference.paged_extend_attention(*args, window=window)) < 1e-2


def test_its_error_is_the_torch_paths_error(monkeypatch) -> None:
    """Against a float64 oracle the kernel is as close as the fused torch attention it replaces."""
    case, args, new_kv = extend_case(64, 2, [(300, 0), (45, 100)])
    oracle = reference.paged_extend_attention(args[0].double(), case.k_cache.double(),
                                              case.v_cache.double(), *args[3:])
    compiled = cpu_attention.paged_extend_attention(*args, new_kv=new_kv)
    monkeypatch.setattr(cpu_extend, "takes", lambda q, head_dim: False)  # the torch path
    torch_path = cpu_attention.paged_extend_attention(*args, new_kv=new_kv)
    assert rel_err(compiled, oracle) < 1.1 * rel_err(torch_path, oracle)


def test_calls_it_does_not_take_are_refused_untouched() -> None:
    q = torch.randn(5, 2, 96).to(BF16)  # head dim 96
    kv = torch.randn(5, 1, 96).to(BF16)
    out = torch.zeros_like(q)
    assert not cpu_extend.takes(q, 96)
    assert not cpu_extend.attend(q, kv, kv, 0, None, 0.1, out)
    assert not cpu_extend.attend(q.float(), kv, kv, 0, None, 0.1, out)  # dtype mismatch
    assert torch.equal(out, torch.zeros_like(q))
