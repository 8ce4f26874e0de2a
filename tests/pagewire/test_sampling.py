import pytest

from pagewire.sampling import (
    DEFAULT_MAX_TOKENS,
    MAX_REPETITION_PENALTY,
    Limits,
    SamplingParams,
    ValidationError,
    validate,
)
from pagewire.structured import StructuredOutput
from pagewire.v1 import common_pb2

LIMITS = Limits(max_n=4, max_logprobs=5, max_stop_strings=3)


def check(prompt_len: int = 5, **fields: object) -> SamplingParams:
    return validate(
        common_pb2.SamplingParams(**fields),
        prompt_len=prompt_len,
        max_model_len=100,
        vocab_size=50,
        limits=LIMITS,
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
        ({"stop": ["x"] * 4}, 5, "stop"),
        ({"stop_token_ids": [50]}, 5, "stop_token_ids"),
        ({"temperature": float("nan")}, 5, "temperature"),
        ({"min_p": -0.1}, 5, "min_p"),
        ({"min_p": 1.5}, 5, "min_p"),
        ({"min_p": float("nan")}, 5, "min_p"),
        ({"presence_penalty": 2.5}, 5, "presence_penalty"),
        ({"presence_penalty": -2.5}, 5, "presence_penalty"),
        ({"frequency_penalty": 2.01}, 5, "frequency_penalty"),
        ({"frequency_penalty": float("-inf")}, 5, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, 5, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, 5, "repetition_penalty"),
        ({"repetition_penalty": MAX_REPETITION_PENALTY * 2}, 5, "repetition_penalty"),
        ({"min_tokens": -1}, 5, "min_tokens"),
        ({"min_tokens": 9, "max_tokens": 8}, 5, "min_tokens"),
        ({"min_tokens": DEFAULT_MAX_TOKENS + 1}, 5, "min_tokens"),
        ({"logprobs": -1}, 5, "logprobs"),
        ({"logprobs": 6}, 5, "logprobs"),
        ({"prompt_logprobs": -1}, 5, "prompt_logprobs"),
        ({"prompt_logprobs": 6}, 5, "prompt_logprobs"),
        ({"n": 0}, 5, "n"),
        ({"n": 5}, 5, "n"),
        ({"logit_bias": {50: 1.0}}, 5, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, 5, "logit_bias"),
        ({"logit_bias": {3: 100.5}}, 5, "logit_bias"),
        ({"logit_bias": {3: -101.0}}, 5, "logit_bias"),
        ({"logit_bias": {3: float("nan")}}, 5, "logit_bias"),
        ({"logit_bias": dict.fromkeys(range(1025), 1.0)}, 5, "logit_bias"),
        ({"best_of": 1, "n": 2}, 5, "best_of"),
        ({"best_of": 5}, 5, "best_of"),
        ({"structured": {"kind": 0, "spec": "x"}}, 5, "structured"),
        ({"structured": {"kind": 1, "spec": "{not json"}}, 5, "structured"),
        ({"structured": {"kind": 1, "spec": "[1]"}}, 5, "structured"),
        ({"structured": {"kind": 1, "spec": ""}}, 5, "structured"),
        ({"structured": {"kind": 2, "spec": "{}"}}, 5, "structured"),
        ({"structured": {"kind": 3, "spec": ""}}, 5, "structured"),
        ({"structured": {"kind": 4, "spec": '"a"'}}, 5, "structured"),
        ({"structured": {"kind": 4, "spec": '["a", ""]'}}, 5, "structured"),
        ({"structured": {"kind": 4, "spec": "[]"}}, 5, "structured"),
        ({"structured": {"kind": 5, "spec": "x" * 65537}}, 5, "structured"),
        ({"structured": {"kind": 3, "spec": "a+"}, "ignore_eos": True}, 5, "ignore_eos"),
        ({"structured": {"kind": 3, "spec": "a+"}, "min_tokens": 1}, 5, "min_tokens"),
    ],
)
def test_out_of_bounds_fields_are_named(fields: dict, prompt_len: int, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        check(prompt_len, **fields)
    assert e.value.field == field
    assert str(e.value).startswith(field + ":")


def test_limit_named_in_message_comes_from_the_deployment() -> None:
    with pytest.raises(ValidationError, match=r"n: must be in \[1, 4\] \(--max-n\), got 5"):
        check(n=5)


def test_values_at_the_bounds_are_accepted() -> None:
    p = check(
        min_p=1.0, presence_penalty=-2.0, frequency_penalty=2.0, repetition_penalty=0.01,
        min_tokens=8, max_tokens=8, logprobs=5, prompt_logprobs=0, n=4, stop=["a", "b", "c"],
    )
    assert (p.min_tokens, p.logprobs, p.prompt_logprobs, p.n) == (8, 5, 0, 4)
    assert p.penalized


def test_unset_logprobs_differ_from_zero() -> None:
    assert check().logprobs is None and check(logprobs=0).logprobs == 0


def test_every_structured_kind_round_trips_and_unset_means_unconstrained() -> None:
    assert check().structured is None and check().to_proto().HasField("structured") is False
    for kind, spec in [("json_schema", '{"type": "object"}'), ("json_object", ""),
                       ("regex", "[a-z]+"), ("choice", '["a"]'), ("grammar", 'root ::= "a"')]:
        so = StructuredOutput(kind, spec)
        p = check(structured=so.to_proto(), temperature=0.5, seed=3)
        assert p.structured == so and SamplingParams.from_proto(p.to_proto()) == p


def test_round_trip_through_proto() -> None:
    p = check(temperature=0.7, top_p=0.9, top_k=5, max_tokens=8, seed=3, stop=["a"], min_p=0.1,
              presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.2, min_tokens=2,
              logprobs=2, prompt_logprobs=1, n=3, include_stop_str_in_output=True,
              logit_bias={7: -100.0, 2: 100.0}, best_of=4)
    assert p.logit_bias == ((2, 100.0), (7, -100.0)) and p.best_of == 4
    assert SamplingParams.from_proto(p.to_proto()) == p
