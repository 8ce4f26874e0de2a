"""Feeding parsers text split in every way, and reassembling their deltas as a client would."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

from router.tool_parser import Parsed


def reassemble(parts: list[Parsed]) -> dict[str, Any]:
    """Content, reasoning and calls (name, arguments; ids checked once per call) of the deltas."""
    calls: dict[int, dict[str, str]] = {}
    for part in parts:
        for delta in part.tool_calls:
            if delta.id:
                assert delta.index not in calls, "a call announced twice"
                assert delta.index == len(calls), "calls are numbered in order from 0"
                assert delta.name
                calls[delta.index] = {"name": delta.name, "arguments": ""}
            else:
                assert delta.index in calls, "arguments before the call's id and name"
            calls[delta.index]["arguments"] += delta.arguments
    return {
        "content": "".join(p.content for p in parts),
        "reasoning": "".join(p.reasoning for p in parts),
        "calls": [calls[i] for i in sorted(calls)],
    }


def splits(text: str, seed: int = 0) -> Iterator[list[str]]:
    """Whole, one character at a time, every single cut, and random chunkings."""
    yield [text]
    yield list(text)
    if len(text) < 2:
        return
    for cut in range(1, len(text)):
        yield [text[:cut], text[cut:]]
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def run(make: Callable[[], Any], pieces: list[str]) -> dict[str, Any]:
    parser = make()
    parts = [parser.feed(p) for p in pieces]
    parts.append(parser.finish())
    return reassemble(parts)


def same_for_every_split(make: Callable[[], Any], text: str) -> dict[str, Any]:
    """The reassembled result, asserted identical however the text is split."""
    whole = run(make, [text])
    for pieces in splits(text):
        assert run(make, pieces) == whole, pieces
    return whole
