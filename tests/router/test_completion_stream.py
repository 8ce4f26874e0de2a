"""A completion's token events become client messages: stop strings, min_tokens, logprobs."""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2, generation_pb2, scheduler_pb2
from router.completion import CompletionStream

LENGTH, STOP = common_pb2.FINISH_REASON_LENGTH, common_pb2.FINISH_REASON_STOP
PROMPT = [5, 6, 7]


def logprob(token: int) -> common_pb2.Logprobs:
    """A recognisable entry per token: its logprob is minus its id."""
    return common_pb2.Logprobs(token_id=token, logprob=-float(token), rank=1)


def event(
    ids: list[int], index: int, finish: int = 0, **fields: object
) -> scheduler_pb2.TokenEvent:
    return scheduler_pb2.TokenEvent(
        request_id="r",
        token_ids=ids,
        index=index,
        finish_reason=finish,
        logprobs=[logprob(t) for t in ids],
        prompt_tokens=len(PROMPT),
        **fields,
    )


def one_by_one(ids: list[int], finish: int = LENGTH) -> list[scheduler_pb2.TokenEvent]:
    return [event([t], i, finish if i == len(ids) - 1 else 0) for i, t in enumerate(ids)]


def run(
    tokenizer: PreTrainedTokenizerFast, events: list[scheduler_pb2.TokenEvent], **params: object
) -> tuple[CompletionStream, list[generation_pb2.GenerateResponse]]:
    stream = CompletionStream("r", 0, PROMPT, SamplingParams(**params), tokenizer)
    out = []
    for e in events:
        if stream.done:
            break
        response = stream.on_event(e)
        if response is not None:
            out.append(response)
    return stream, out


def joined(responses: list[generation_pb2.GenerateResponse]) -> tuple[str, list[int]]:
    return "".join(r.text for r in responses), [t for r in responses for t in r.token_ids]


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_one_token_events_add_up_to_the_decoded_output(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "Hello, world! 你好 😀 café")
    stream, out = run(bpe_tokenizer, one_by_one(ids))
    assert joined(out) == (bpe_tokenizer.decode(ids), ids)
    last = out[-1]
    assert last.finish_reason == LENGTH and stream.done and stream.scheduler_done
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(PROMPT), len(ids))
    assert all(r.finish_reason == 0 and not r.HasField("usage") for r in out[:-1])


def test_stop_string_cuts_text_and_drops_the_ids_after_it(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "The quick brown fox jumps over the lazy dog.")
    # All ids in one event (a replay after a restart looks like this).
    stream, out = run(bpe_tokenizer, [event(ids, 0)], stop=("fox",))
    text, got = joined(out)
    assert text == "The quick brown "
    assert bpe_tokenizer.decode(got).endswith("fox")  # up to the token that completed "fox"
    assert len(got) < len(ids)
    assert [lp.token_id for lp in out[-1].logprobs] == got
    assert out[-1].finish_reason == STOP and out[-1].stop_string == "fox"
    assert out[-1].usage.completion_tokens == len(got)
    assert stream.done and not stream.scheduler_done  # the router must abort it downstream


def test_include_stop_str_in_output_keeps_the_stop_string(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "The quick brown fox jumps over the lazy dog.")
    _, out = run(bpe_tokenizer, one_by_one(ids), stop=("fox",), include_stop_str_in_output=True)
    assert joined(out)[0] == "The quick brown fox"


def test_stop_strings_are_not_matched_within_min_tokens(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    first, rest = "Hello. How", " are you. Fine"
    ids = ids_of(bpe_tokenizer, first) + ids_of(bpe_tokenizer, rest)
    min_tokens = len(ids_of(bpe_tokenizer, first))
    _, out = run(bpe_tokenizer, one_by_one(ids), stop=(".",), min_tokens=min_tokens)
    assert joined(out)[0] == "Hello. How are you"
    _, out = run(bpe_tokenizer, one_by_one(ids), stop=(".",), min_tokens=min_tokens - 2)
    assert joined(out)[0] == "Hello"


def test_logprobs_stay_with_their_ids_while_text_waits_for_a_whole_character(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "a 🦀 b")  # not in the training text: one token per byte
    _, out = run(bpe_tokenizer, one_by_one(ids))
    assert any(r.token_ids and not r.text for r in out), "the emoji's first bytes should wait"
    for r in out:
        assert [lp.token_id for lp in r.logprobs] == list(r.token_ids)


def test_replayed_tokens_are_not_repeated(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = ids_of(bpe_tokenizer, "streams continue after a restart")
    events = [event(ids[:3], 0), event(ids[:5], 0), event(ids[2:4], 2), event(ids[5:], 5, LENGTH)]
    _, out = run(bpe_tokenizer, events)
    assert joined(out) == (bpe_tokenizer.decode(ids), ids)
    assert [lp.token_id for r in out for lp in r.logprobs] == ids


def test_stop_token_is_counted_but_its_text_is_not_emitted(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "Hello world")
    eos = bpe_tokenizer.convert_tokens_to_ids("<|eos|>")
    _, out = run(bpe_tokenizer, one_by_one([*ids, eos], STOP), skip_special_tokens=False)
    assert joined(out) == ("Hello world", [*ids, eos])
    assert out[-1].finish_reason == STOP and out[-1].stop_string == ""
    assert out[-1].usage.completion_tokens == len(ids) + 1


def test_prompt_logprobs_go_out_once_on_the_first_message(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "Hello world")
    prompt_lps = [logprob(t) for t in PROMPT[1:]]
    events = one_by_one(ids)
    events[0].prompt_logprobs.extend(prompt_lps)
    events[1].prompt_logprobs.extend(prompt_lps)  # e.g. sent again after a restart
    _, out = run(bpe_tokenizer, events)
    assert list(out[0].prompt_logprobs) == prompt_lps
    assert all(not r.prompt_logprobs for r in out[1:])


def test_cached_tokens_come_from_the_last_event(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = ids_of(bpe_tokenizer, "Hello")
    events = one_by_one(ids)
    events[-1].cached_tokens = 16
    _, out = run(bpe_tokenizer, events)
    assert out[-1].usage.cached_tokens == 16


def test_a_stop_string_between_the_first_and_last_events_keeps_the_cached_tokens(
    bpe_tokenizer: PreTrainedTokenizerFast,
) -> None:
    ids = ids_of(bpe_tokenizer, "The quick brown fox jumps over the lazy dog.")
    events = one_by_one(ids)
    events[0].cached_tokens = events[-1].cached_tokens = 16  # the scheduler tells first and last
    _, out = run(bpe_tokenizer, events, stop=("fox",))
    assert out[-1].stop_string == "fox" and out[-1].usage.cached_tokens == 16


def test_index_tags_every_message(bpe_tokenizer: PreTrainedTokenizerFast) -> None:
    stream = CompletionStream("r", 3, PROMPT, SamplingParams(), bpe_tokenizer)
    response = stream.on_event(event(ids_of(bpe_tokenizer, "Hi"), 0, LENGTH))
    assert response is not None and response.index == 3 and response.request_id == "r"
