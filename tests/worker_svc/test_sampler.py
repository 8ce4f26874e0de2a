"""Batched sampling against direct reference computations."""

from __future__ import annotations

import torch

from worker_svc.sampler import NO_SEED, SamplingBatch, sample


def batch(n: int, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0,
          seeds: list[int] | None = None, index: int = 0, min_p: float = 0.0) -> SamplingBatch:
    return SamplingBatch.build([temperature] * n, [top_p] * n, [top_k] * n,
                               seeds or [NO_SEED] * n, [index] * n, torch.device("cpu"),
                               min_p=[min_p] * n)


def test_zero_temperature_is_argmax() -> None:
    logits = torch.randn(5, 50)
    assert torch.equal(sample(logits, batch(5, temperature=0.0)), logits.argmax(-1))


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = torch.randn(2, 50)
    b = SamplingBatch.build([0.0, 1.0], [1.0, 1.0], [0, 0], [NO_SEED, 1], [0, 0], torch.device("cpu"))
    out = sample(logits, b)
    assert out[0] == logits[0].argmax()


def test_top_k_never_leaves_the_top_k() -> None:
    logits = torch.randn(1, 100).repeat(400, 1)
    allowed = set(logits[0].topk(3).indices.tolist())
    assert set(sample(logits, batch(400, top_k=3)).tolist()) <= allowed


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().repeat(2000, 1)
    drawn = sample(logits, batch(2000, top_p=0.8)).tolist()
    assert set(drawn) == {0, 1}, "0.5 + 0.3 reaches 0.8; tokens 2 and 3 are cut"
    frac0 = drawn.count(0) / len(drawn)
    assert abs(frac0 - 0.5 / 0.8) < 0.05


def test_sampling_follows_the_softmax_of_scaled_logits() -> None:
    logits = torch.tensor([[1.0, 0.0, -1.0]]).repeat(20000, 1)
    drawn = sample(logits, batch(20000, temperature=2.0))
    freq = torch.bincount(drawn, minlength=3).float() / drawn.numel()
    assert torch.allclose(freq, (logits[0] / 2.0).softmax(-1), atol=0.015)


def test_seeded_rows_repeat_whatever_else_is_in_the_batch() -> None:
    logits = torch.randn(1, 1000)
    alone = sample(logits, batch(1, seeds=[42], index=3))
    crowd_logits = torch.cat([torch.randn(5, 1000), logits, torch.randn(3, 1000)])
    b = SamplingBatch.build([1.0] * 9, [1.0] * 9, [0] * 9, [NO_SEED] * 5 + [42] + [NO_SEED] * 3, [3] * 9,
                            torch.device("cpu"))
    assert sample(crowd_logits, b)[5] == alone[0]
    draws = {int(sample(logits, batch(1, seeds=[42], index=i))[0]) for i in range(20)}
    assert len(draws) > 1, "the output index must change the draw"


def test_min_p_drops_tokens_below_min_p_times_the_top_probability() -> None:
    probs = torch.tensor([[0.40, 0.30, 0.15, 0.10, 0.05]])
    logits = probs.log().repeat(4000, 1)
    drawn = sample(logits, batch(4000, min_p=0.3)).tolist()
    assert set(drawn) == {0, 1, 2}, "0.3 * 0.40 = 0.12: tokens 3 and 4 are below it"
    kept = probs[0, :3] / probs[0, :3].sum()
    freq = torch.bincount(torch.tensor(drawn), minlength=5)[:3].float() / len(drawn)
    assert torch.allclose(freq, kept, atol=0.03)


def test_min_p_applies_to_what_top_k_left_at_the_sampling_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(3000, 1)
    # At T=0.5 the probabilities are proportional to exp(2 * logit); top_k=3 drops token 3;
    # min_p=0.1 keeps p >= 0.1 * p_0, i.e. 2 * (l - 2) >= log 0.1: tokens 0 and 1 only.
    drawn = sample(logits, batch(3000, temperature=0.5, top_k=3, min_p=0.1)).tolist()
    assert set(drawn) == {0, 1}
