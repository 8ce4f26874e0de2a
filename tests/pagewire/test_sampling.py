import pytest

from pagewire.sampling import DEFAULT_MAX_TOKENS, SamplingParams, ValidationError, validate
from pagewire.v1 import common_pb2


def check(prompt_len: int = 5, **fields: object) -> SamplingParams:
    return validate(
        common_pb2.SamplingParams(**fields), prompt_len=prompt_len, max_model_len=100, vocab_size=50
    )


def test_defaults_apply_to_unset_fields() -> None:
    p = check()
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, DEFAULT_MAX_TOKENS)
    assert p.seed is None and p.skip_special_tokens


def test_explicit_zero_temperature_is_greedy_not_default() -> None:
    assert check(temperature=0.0).greedy


@pytest.mark.parametrize(
    ("fields", "prompt_len", "field"),
    [
        ({"temperature": -0.5}, 5, "temperature"),
        ({"top_p": 0.0}, 5, "top_p"),
        ({"top_p": 1.5}, 5, "top_p"),
        ({"top_k": -2}, 5, "top_k"),
        ({"max_tokens": 0}, 5, "max_tokens"),
        ({"max_tokens": -3}, 5, "max_tokens"),
        ({}, 0, "prompt"),
        ({}, 100, "prompt"),
        ({"max_tokens": 96}, 5, "max_tokens"),
        ({"stop": [""]}, 5, "stop"),
        ({"stop": ["x"] * 17}, 5, "stop"),
        ({"stop_token_ids": [50]}, 5, "stop_token_ids"),
    ],
)
def test_out_of_bounds_fields_are_named(fields: dict, prompt_len: int, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        check(prompt_len, **fields)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_round_trip_through_proto() -> None:
    p = check(temperature=0.7, top_p=0.9, top_k=5, max_tokens=8, seed=3, stop=["a"])
    assert SamplingParams.from_proto(p.to_proto()) == p
