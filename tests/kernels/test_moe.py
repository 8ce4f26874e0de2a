"""Mixture-of-experts kernels against the dense reference: routing, the CPU grouped path, and the
Triton fused kernel (on CUDA if present, else under the interpreter on small shapes)."""

from __future__ import annotations

import pytest
import torch
from paged_case import DEVICE, REL_TOL, TRITON_DTYPES, rel_err

from kernels.moe import grouped_moe, moe_reference, route


def experts(num_experts: int, hidden: int, inter: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=g) / inter**0.5
    return w13.to(DEVICE, dtype), w2.to(DEVICE, dtype)


def routed(tokens: int, num_experts: int, hidden: int, top_k: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    logits = torch.randn(tokens, num_experts, generator=g).to(DEVICE)
    return x, *route(logits, top_k, renormalize=True)


def test_routing_renormalises_only_when_asked() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, ids = route(logits, 2, renormalize=False)
    probs = torch.softmax(logits, -1)
    assert ids.tolist() == [[0, 1]] and torch.allclose(w, probs[:, :2])
    w, _ = route(logits, 2, renormalize=True)
    assert torch.allclose(w, probs[:, :2] / probs[:, :2].sum())


@pytest.mark.parametrize("tokens,num_experts,top_k", [(1, 8, 2), (13, 4, 2), (40, 16, 4),
                                                       (7, 8, 8)])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_grouped_cpu_path_matches_the_dense_reference(tokens, num_experts, top_k,
                                                      activation) -> None:
    if DEVICE.type != "cpu":
        pytest.skip("the CPU path")
    w13, w2 = experts(num_experts, 32, 24, torch.float32)
    x, weights, ids = routed(tokens, num_experts, 32, top_k, torch.float32)
    ref = moe_reference(x, w13, w2, weights, ids, activation)
    assert rel_err(grouped_moe(x, w13, w2, weights, ids, activation), ref) < 1e-5


def test_experts_no_token_chose_are_skipped_not_read() -> None:
    w13, w2 = experts(6, 16, 8, torch.float32)
    w13[3:] = float("nan")
    w2[3:] = float("nan")
    x = torch.randn(5, 16, device=DEVICE)
    ids = torch.tensor([[0, 1], [2, 0], [1, 2], [0, 2], [1, 0]], device=DEVICE)
    weights = torch.full((5, 2), 0.5, device=DEVICE)
    out = grouped_moe(x.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu())
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("dtype", TRITON_DTYPES)
@pytest.mark.parametrize("tokens,num_experts,top_k,hidden,inter", [
    (1, 4, 2, 32, 32), (9, 4, 2, 32, 48), (20, 8, 3, 64, 32)])
def test_triton_fused_moe_matches_the_dense_reference(dtype, tokens, num_experts, top_k, hidden,
                                                      inter) -> None:
    pytest.importorskip("triton")
    from kernels.triton_ops.fused_moe import fused_moe

    w13, w2 = experts(num_experts, hidden, inter, dtype)
    x, weights, ids = routed(tokens, num_experts, hidden, top_k, dtype)
    out = fused_moe(x, w13, w2, weights, ids)
    ref = moe_reference(x, w13, w2, weights, ids)
    assert out.dtype == dtype and out.shape == x.shape
    assert rel_err(out, ref) < REL_TOL[dtype]


def test_alignment_pads_each_experts_run_to_whole_tiles() -> None:
    pytest.importorskip("triton")
    from kernels.triton_ops.fused_moe import align_by_expert

    ids = torch.tensor([[2, 0], [2, 1], [0, 2]])  # flat: 2 0 2 1 0 2
    rows, tiles = align_by_expert(ids, 4, block_m=2)
    assert tiles.tolist()[:4] == [0, 1, 2, 2] and set(tiles.tolist()[4:]) <= {-1}
    assert rows.tolist()[:8] == [1, 4, 3, -1, 0, 2, 5, -1]
