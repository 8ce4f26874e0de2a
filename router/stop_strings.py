"""Stop strings: cut the streamed output at the first stop string, across token boundaries.

Text that could still become the start of a stop string is held back until the next delta
shows it is not. Only the held-back tail plus the new delta is ever searched, so the work per
delta is bounded by the delta's length plus the longest stop string.

Which match wins: generation must stop as soon as any stop string is complete, so the match
that ends first wins, and of those ending at the same character the longest (the one starting
earliest). This makes the result independent of how the text is split into deltas: with stops
"ab" and "abc", "xabc" stops at "ab" whether it arrives whole or as "xab" + "c".
"""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StopResult:
    text: str  # safe to emit now
    stopped: bool
    stop_string: str | None  # the stop string that matched, once stopped


class StopStringMatcher:
    """Filters one request's text deltas through its stop strings."""

    def __init__(self, stops: Sequence[str], include_stop_str_in_output: bool = False) -> None:
        if any(stop == "" for stop in stops):
            raise ValueError("stop strings must be non-empty")
        self._stops = tuple(dict.fromkeys(stops))
        self._include_stop = include_stop_str_in_output
        self._max_partial = max((len(stop) for stop in self._stops), default=1) - 1
        # Every proper prefix of a stop string: a tail equal to one of these is held back.
        self._partials = {stop[:n] for stop in self._stops for n in range(1, len(stop))}
        self._held = ""
        self._stop_string: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stop_string is not None

    def feed(self, delta: str) -> StopResult:
        """Takes the next text delta; returns the text that can be emitted now."""
        if self.stopped:
            return StopResult("", True, self._stop_string)
        if not self._stops:
            return StopResult(delta, False, None)
        text = self._held + delta
        match = self._first_match(text)
        if match is not None:
            start, stop = match
            self._stop_string = stop
            self._held = ""
            end = start + len(stop) if self._include_stop else start
            return StopResult(text[:end], True, stop)
        keep = self._partial_match_len(text)
        self._held = text[len(text) - keep :]
        return StopResult(text[: len(text) - keep], False, None)

    def flush(self) -> str:
        """At the end of generation without a stop: releases the held-back tail."""
        held, self._held = self._held, ""
        return held

    def _first_match(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the match that ends first; ties go to the longest."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            start = text.find(stop)  # the earliest start is also this stop's earliest end
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                if best is None or candidate < best:
                    best = candidate
        if best is None:
            return None
        end, _, stop = best
        return end - len(stop), stop

    def _partial_match_len(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        for n in range(min(self._max_partial, len(text)), 0, -1):
            if text[len(text) - n :] in self._partials:
                return n
        return 0
