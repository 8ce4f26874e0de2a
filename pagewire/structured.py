"""A constraint on a request's output: what it is (kind) and its text (spec), as data.

The constraint travels as data in :class:`~pagewire.sampling.SamplingParams` from the router to
the worker, never as a handle to compiled state, so a worker that has never seen a sequence (after
a preemption, a worker loss or a scheduler restart) rebuilds the matcher from the spec and the
sequence's output tokens. The cheap structural checks live here, next to the type; compiling the
spec against a tokenizer is the grammar engine's job (worker and router both call it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pagewire.v1 import common_pb2

JSON_SCHEMA = "json_schema"  # spec: a JSON schema, as JSON text
JSON_OBJECT = "json_object"  # spec: "" (any JSON object)
REGEX = "regex"  # spec: a regular expression the whole output must match
CHOICE = "choice"  # spec: a JSON list of strings; the output is exactly one of them
GRAMMAR = "grammar"  # spec: an EBNF (GBNF) grammar whose start rule is `root`

KINDS = (JSON_SCHEMA, JSON_OBJECT, REGEX, CHOICE, GRAMMAR)

# The proto carries the kind as an enum (typed for every client language); names map 1:1.
_TO_PROTO = {
    JSON_SCHEMA: common_pb2.STRUCTURED_KIND_JSON_SCHEMA,
    JSON_OBJECT: common_pb2.STRUCTURED_KIND_JSON_OBJECT,
    REGEX: common_pb2.STRUCTURED_KIND_REGEX,
    CHOICE: common_pb2.STRUCTURED_KIND_CHOICE,
    GRAMMAR: common_pb2.STRUCTURED_KIND_GRAMMAR,
}
_FROM_PROTO = {v: k for k, v in _TO_PROTO.items()}

# A spec is compiled on the router at validation and on every worker that runs the sequence; bound
# its size so one request cannot pin a compile thread for long.
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 1024


class SpecError(ValueError):
    """The spec is malformed for its kind (the message says how)."""


@dataclass(frozen=True)
class StructuredOutput:
    """The output must match ``spec`` read as ``kind`` (one of :data:`KINDS`)."""

    kind: str
    spec: str

    def to_proto(self) -> common_pb2.StructuredOutput:
        return common_pb2.StructuredOutput(kind=_TO_PROTO[self.kind], spec=self.spec)

    @classmethod
    def from_proto(cls, msg: common_pb2.StructuredOutput) -> StructuredOutput:
        """Map the enum back to the kind name; an unknown enum value maps to "" (invalid)."""
        return cls(kind=_FROM_PROTO.get(msg.kind, ""), spec=msg.spec)


def check(so: StructuredOutput) -> None:
    """Structural checks that need no tokenizer; raise SpecError saying what is wrong."""
    if so.kind not in KINDS:
        raise SpecError(f"kind must be one of {', '.join(KINDS)}")
    if len(so.spec) > MAX_SPEC_CHARS:
        raise SpecError(f"spec is {len(so.spec)} characters; at most {MAX_SPEC_CHARS}")
    if so.kind == JSON_OBJECT:
        if so.spec:
            raise SpecError("json_object takes no spec")
        return
    if not so.spec:
        raise SpecError(f"{so.kind} needs a non-empty spec")
    if so.kind == JSON_SCHEMA:
        try:
            schema = json.loads(so.spec)
        except ValueError as e:
            raise SpecError(f"the schema is not valid JSON ({e})") from None
        if not isinstance(schema, (dict, bool)):
            raise SpecError("the schema must be a JSON object (or true/false)")
    elif so.kind == CHOICE:
        choices = choice_list(so.spec)
        if not choices or len(choices) > MAX_CHOICES:
            raise SpecError(f"choice must list 1 to {MAX_CHOICES} strings")


def choice_list(spec: str) -> list[str]:
    """The choices of a CHOICE spec: a JSON list of non-empty strings (SpecError otherwise)."""
    try:
        choices = json.loads(spec)
    except ValueError as e:
        raise SpecError(f"choice is not valid JSON ({e})") from None
    if not isinstance(choices, list) or not all(isinstance(c, str) and c for c in choices):
        raise SpecError("choice must be a JSON list of non-empty strings")
    return choices
