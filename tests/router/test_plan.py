"""How a request with n completions becomes n scheduler requests."""

from __future__ import annotations

from pagewire.sampling import MAX_SEED, SamplingParams
from router.generation import ValidatedRequest


def plan(**params: object) -> ValidatedRequest:
    return ValidatedRequest("req", [1, 2, 3], SamplingParams(**params), priority=7)


def test_one_completion_keeps_the_request_id() -> None:
    submit = plan().submit_request(0)
    assert submit.request_id == "req"
    assert (list(submit.prompt_token_ids), submit.priority) == ([1, 2, 3], 7)
    assert not submit.sampling.HasField("seed")


def test_n_completions_get_suffixed_ids_and_consecutive_seeds() -> None:
    p = plan(n=3, seed=40, temperature=0.5)
    submits = [p.submit_request(i) for i in range(3)]
    assert [s.request_id for s in submits] == ["req-0", "req-1", "req-2"]
    assert [s.sampling.seed for s in submits] == [40, 41, 42]
    assert all(s.sampling.n == 1 and s.sampling.temperature == 0.5 for s in submits)


def test_unseeded_completions_stay_unseeded() -> None:
    p = plan(n=2)
    assert not any(p.submit_request(i).sampling.HasField("seed") for i in range(2))


def test_seeds_wrap_within_the_valid_range() -> None:
    assert plan(n=2, seed=MAX_SEED).submit_request(1).sampling.seed == 0
