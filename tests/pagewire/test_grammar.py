"""What each kind of spec means once compiled (pagewire.grammar, shared by router and worker)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import jsonschema
import pytest
import torch
from transformers import AutoTokenizer

from pagewire.grammar import Compiler, bounded_strings_as_patterns, matcher
from pagewire.structured import SpecError, StructuredOutput

EOS = (1, 4)


@pytest.fixture(scope="module")
def compiler(tiny_model: Path) -> Compiler:
    return Compiler(AutoTokenizer.from_pretrained(tiny_model), 1024, EOS)


def accepts(compiler: Compiler, spec: StructuredOutput, text: str) -> bool:
    """Whether ``text`` is a complete output under ``spec``."""
    m = matcher(compiler.compile(spec))
    return m.accept_string(text) and m.accept_token(EOS[0])


def test_choices_match_literally_whatever_they_contain(compiler: Compiler) -> None:
    choices = ['say "hi"', "back\\slash", "new\nline", "naïve ☃", "a|b"]
    spec = StructuredOutput("choice", json.dumps(choices))
    assert all(accepts(compiler, spec, c) for c in choices)
    assert not accepts(compiler, spec, "a") and not accepts(compiler, spec, "say")


def test_regex_is_anchored_and_json_object_is_an_object(compiler: Compiler) -> None:
    rx = StructuredOutput("regex", "[0-9]{2}x")
    assert accepts(compiler, rx, "12x") and not accepts(compiler, rx, "12xx")
    obj = StructuredOutput("json_object", "")
    assert accepts(compiler, obj, '{"a": [1, {"b": null}]}')
    assert not accepts(compiler, obj, "[1]")


def test_a_schema_in_strict_mode_allows_no_undeclared_keys(compiler: Compiler) -> None:
    spec = StructuredOutput("json_schema", json.dumps(
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}))
    assert accepts(compiler, spec, '{"a": 1}')
    assert not accepts(compiler, spec, '{"a": 1, "b": 2}')


@pytest.mark.parametrize(("kind", "spec", "says"), [
    ("regex", "[a-", "Unclosed"),
    ("json_schema", '{"type": "nope"}', "nope"),
    ("grammar", 'start ::= "a"', "root"),
    ("grammar", "root ::= ", "EBNF"),
])
def test_a_spec_the_engine_refuses_says_why(compiler: Compiler, kind: str, spec: str,
                                             says: str) -> None:
    with pytest.raises(SpecError, match=says) as e:
        compiler.compile(StructuredOutput(kind, spec))
    assert "/project/" not in str(e.value), "the engine's source location is not the client's"


def test_bounded_strings_become_patterns_of_unescaped_characters() -> None:
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 1, "maxLength": 4},
        "p": {"type": "string", "maxLength": 4, "pattern": "^a+$"},
        "t": {"type": "array", "items": {"type": "string", "maxLength": 2}}}}
    out = bounded_strings_as_patterns(schema)
    assert out["properties"]["s"] == {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,4}$'}
    assert out["properties"]["p"] == schema["properties"]["p"], "a pattern of its own is kept"
    assert out["properties"]["t"]["items"]["pattern"].endswith("{0,2}$")


def test_random_walks_under_a_bounded_schema_always_parse_and_validate(
    compiler: Compiler, tiny_model: Path
) -> None:
    """Any allowed token at every position (not just a model's likely ones): the output is JSON
    that validates. Before the bounded-string rewrite, raw control characters got through."""
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
        "n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["name", "tags", "n"]}
    tok = AutoTokenizer.from_pretrained(tiny_model)
    compiled = compiler.compile(StructuredOutput("json_schema", json.dumps(schema)))
    rng = random.Random(0)
    mask = torch.zeros(1, 32, dtype=torch.int32)
    for _ in range(30):
        m, out = matcher(compiled), []
        while not m.is_terminated():
            m.fill_next_token_bitmask(mask, 0)
            allowed = [t for t in range(1024) if (int(mask[0, t // 32]) >> (t % 32)) & 1]
            out.append(rng.choice(allowed))
            assert m.accept_token(out[-1])
            assert len(out) < 200
        jsonschema.validate(json.loads(tok.decode(out[:-1])), schema)
