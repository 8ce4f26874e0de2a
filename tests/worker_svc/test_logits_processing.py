"""Batched logits processing against per-row references written from the definitions."""

from __future__ import annotations

import numpy as np
import torch
from worker_steps import penalize

from worker_svc.logits import (
    Penalties,
    allow_only,
    apply_penalties,
    banned_ids,
    bias_tokens,
    logprob_protos,
    mask_tokens,
)
from worker_svc.seq_table import NONE, TokenHistory

V = 50
CPU = torch.device("cpu")


def test_penalties_match_the_reference_on_the_penalized_rows_only() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, V) * 3
    rows = np.array([0, 2, 3])
    prompts = [np.array([1, 2, 2, 7]), np.array([5]), np.array([], dtype=np.int64)]
    outputs = [np.array([2, 9, 9, 9, 40]), np.array([], dtype=np.int64), np.array([7, 7, NONE])]
    presence, frequency = np.array([0.5, -1.0, 1.5]), np.array([0.3, 0.2, -0.7])
    repetition = np.array([1.3, 2.0, 0.8])
    processed = logits.clone()
    apply_penalties(processed, Penalties.build(rows, prompts, outputs, presence, frequency,
                                               repetition, V, CPU))
    assert torch.equal(processed[1], logits[1]), "an unpenalized row is untouched"
    for j, r in enumerate(rows):
        expected = penalize(logits[r], prompts[j].tolist(),
                            [t for t in outputs[j].tolist() if t != NONE],
                            float(presence[j]), float(frequency[j]), float(repetition[j]))
        assert torch.allclose(processed[r], expected, atol=1e-6)


def test_mask_tokens_sets_exactly_the_listed_ids_to_minus_infinity() -> None:
    logits = torch.randn(3, V)
    masked = logits.clone()
    mask_tokens(masked, np.array([0, 2]), [np.array([4, 5]), np.array([49])])
    expected = logits.clone()
    expected[0, [4, 5]] = float("-inf")
    expected[2, 49] = float("-inf")
    assert torch.equal(masked, expected)


def test_logprob_rank_counts_strictly_more_likely_tokens() -> None:
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    lp = logits.log_softmax(-1)
    out = logprob_protos(lp, torch.tensor([2, 4]), [2, 0])
    assert out[0].rank == 2, "token 1 ties with token 2: only token 0 is more likely"
    assert list(out[0].top_token_ids) == [0, 1] or list(out[0].top_token_ids) == [0, 2]
    assert out[0].logprob == float(lp[0, 2])
    assert out[1].rank == 1 and not out[1].top_token_ids


def test_token_history_writes_by_position() -> None:
    h = TokenHistory()
    h.put(0, [1, 2, 3])
    h.put(3, [4])  # the sampled token
    h.put(3, [4])  # named again as the next step's input: no duplicate
    assert h.split(2)[0].tolist() == [1, 2] and h.split(2)[1].tolist() == [3, 4]
    h.put(100, [5])  # after a gap (a cached prefix the worker never saw)
    assert h.n == 101 and h.ids[50] == NONE
    h.put(2, [9])  # a resend from an earlier position forgets what followed
    assert h.split(1)[1].tolist() == [2, 9]


def test_bias_tokens_adds_each_rows_biases_to_exactly_its_ids() -> None:
    logits = torch.randn(3, V)
    biased = logits.clone()
    bias_tokens(biased, np.array([0, 2]), [np.array([4, 49]), np.array([4])],
                [np.array([100.0, -3.5], dtype=np.float32), np.array([-100.0], dtype=np.float32)])
    expected = logits.clone()
    expected[0, 4] += 100.0
    expected[0, 49] -= 3.5
    expected[2, 4] -= 100.0
    assert torch.equal(biased, expected)


def test_allow_only_keeps_exactly_each_rows_allowed_ids() -> None:
    logits = torch.randn(4, V)
    masked = logits.clone()
    allow_only(masked, np.array([1, 3]), [np.array([0, 7, 49]), np.array([7])])
    expected = logits.clone()
    for row, keep in ((1, [0, 7, 49]), (3, [7])):  # the definition, one row at a time
        banned = [t for t in range(V) if t not in keep]
        expected[row, banned] = float("-inf")
    assert torch.equal(masked, expected)


def test_banned_ids_follow_vllms_bad_words_rule() -> None:
    words = [(9,), (4, 5), (1, 2, 3)]
    assert banned_ids(words, np.array([], dtype=np.int64)).tolist() == [9]  # one token: always
    assert banned_ids(words, np.array([7, 4])).tolist() == [9, 5]  # "4" ends the output
    assert banned_ids(words, np.array([1, 2])).tolist() == [9, 3]
    assert banned_ids(words, np.array([1, 2, 0])).tolist() == [9]  # not at the end: no ban
    assert banned_ids(words, np.array([2])).tolist() == [9]  # too short to hold "1 2"
