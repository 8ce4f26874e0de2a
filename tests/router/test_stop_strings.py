import random

import pytest

from router.stop_strings import StopResult, StopStringMatcher


def run(matcher: StopStringMatcher, deltas: list[str]) -> tuple[str, str | None]:
    """Streams `deltas`; returns (everything emitted, the stop string that matched)."""
    out, stop = [], None
    for delta in deltas:
        result = matcher.feed(delta)
        out.append(result.text)
        if result.stopped:
            stop = result.stop_string
    if stop is None:
        out.append(matcher.flush())
    return "".join(out), stop


def reference(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Whole-text semantics: cut at the match that ends first; ties go to the longest."""
    for end in range(1, len(text) + 1):
        ending_here = [s for s in stops if text[:end].endswith(s)]
        if ending_here:
            stop = max(ending_here, key=len)
            return text[: end if include else end - len(stop)], stop
    return text, None


def test_stop_string_inside_one_delta():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello STOP world") == StopResult("Hello ", True, "STOP")


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_split_across_deltas_at_every_position(include):
    text = "Hello STOP world"
    expected = ("Hello STOP" if include else "Hello ", "STOP")
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            deltas = [text[:i], text[i:j], text[j:]]
            assert run(StopStringMatcher(["STOP"], include), deltas) == expected


def test_stop_string_arriving_one_character_at_a_time():
    assert run(StopStringMatcher(["STOP"]), list("Hello STOP world")) == ("Hello ", "STOP")


def test_possible_start_of_stop_string_is_held_until_disproved():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("Hello ST") == StopResult("Hello ", False, None)
    assert matcher.feed("O") == StopResult("", False, None)
    assert matcher.feed("NE") == StopResult("STONE", False, None)


def test_held_back_tail_is_released_by_flush():
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("the end ST").text == "the end "
    assert matcher.flush() == "ST"
    assert matcher.flush() == ""


def test_overlapping_candidates_first_completed_wins_ties_go_to_longest():
    stops = ["abc", "b", "ab"]
    assert run(StopStringMatcher(stops), ["xabc"]) == ("x", "ab")  # "ab", "b" end first
    assert run(StopStringMatcher(stops), ["xa", "bc"]) == ("x", "ab")
    assert run(StopStringMatcher(stops, True), ["xabc"]) == ("xab", "ab")
    assert run(StopStringMatcher(["abc", "b"]), ["xabc"]) == ("xa", "b")


def test_earliest_match_in_the_text_wins_regardless_of_stop_order():
    for stops in (["world", "lo"], ["lo", "world"]):
        assert run(StopStringMatcher(stops), ["hello world"]) == ("hel", "lo")
        assert run(StopStringMatcher(stops), ["hello wor", "ld lo"]) == ("hel", "lo")


def test_include_stop_str_in_output():
    matcher = StopStringMatcher(["</answer>"], include_stop_str_in_output=True)
    assert matcher.feed("42</ans") == StopResult("42", False, None)
    assert matcher.feed("wer> trailing") == StopResult("</answer>", True, "</answer>")


def test_nothing_after_the_stop_is_emitted():
    matcher = StopStringMatcher(["\n\n"])
    assert matcher.feed("line\n\nnext") == StopResult("line", True, "\n\n")
    assert matcher.feed("more text") == StopResult("", True, "\n\n")
    assert matcher.flush() == ""


def test_no_stop_strings_pass_text_through_unchanged():
    matcher = StopStringMatcher([])
    for delta in ["Hel", "lo", "", " world"]:
        assert matcher.feed(delta) == StopResult(delta, False, None)
    assert matcher.flush() == ""


def test_unicode_stop_strings():
    assert run(StopStringMatcher(["。"]), ["你好", "。再见"]) == ("你好", "。")
    assert run(StopStringMatcher(["🛑 end"]), ["go 🛑", " en", "d now"]) == ("go ", "🛑 end")
    assert run(StopStringMatcher(["🛑 end"]), ["go 🛑", " e", "ast"]) == ("go 🛑 east", None)


def test_hold_back_never_exceeds_longest_stop_minus_one():
    matcher = StopStringMatcher(["aaaa", "xyz"])
    assert matcher.feed("a" * 3) == StopResult("", False, None)
    assert matcher.feed("b" + "a" * 1000 + "b") == StopResult("aaab", True, "aaaa")
    matcher = StopStringMatcher(["aaab"])
    assert matcher.feed("a" * 1000).text == "a" * 997


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])


def test_random_splits_match_whole_text_semantics():
    rng = random.Random(5)
    for _ in range(2000):
        stops = ["".join(rng.choices("abc", k=rng.randrange(1, 4))) for _ in range(3)]
        text = "".join(rng.choices("abcd", k=rng.randrange(0, 20)))
        include = rng.random() < 0.5
        cuts = sorted(rng.choices(range(len(text) + 1), k=rng.randrange(0, 6)))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert run(StopStringMatcher(stops, include), deltas) == reference(text, stops, include)
