"""Scheduling decisions: token budget, chunked prefill, continuous batching, preemption."""

from __future__ import annotations

from pagewire.block_hash import prompt_block_hashes
from pagewire.sampling import SamplingParams
from pagewire.v1 import common_pb2
from scheduler_svc.block_pool import BlockPool
from scheduler_svc.request import Request
from scheduler_svc.scheduler import Scheduler, SchedulerLimits

EOS = 0


def make(num_blocks: int = 64, budget: int = 32, max_seqs: int = 8, bs: int = 4) -> Scheduler:
    limits = SchedulerLimits(max_seqs, budget, bs, max_model_len=1000, eos_token_ids=(EOS,))
    return Scheduler(limits, BlockPool(num_blocks))


def req(rid: str, n: int, max_tokens: int = 4, priority: int = 0, first: int | None = None) -> Request:
    """A request with n prompt tokens; distinct ids give distinct prompts unless ``first`` is set."""
    start = first if first is not None else 1 + 1000 * (sum(map(ord, rid)) % 97)
    return Request(rid, list(range(start, start + n)),
                   SamplingParams(temperature=0, max_tokens=max_tokens), priority=priority)


def run_step(s: Scheduler, token: int = 7) -> list[Request]:
    batch = s.schedule()
    s.update(batch, [token] * len(batch.sampling_order()))
    s.check_invariants()
    return batch.requests()


def test_new_request_joins_running_batch_at_next_step() -> None:
    s = make()
    a = req("a", 5)
    s.add(a)
    run_step(s)
    b = req("b", 3)
    s.add(b)
    ran = run_step(s)
    assert a in ran and b in ran


def test_long_prompt_is_chunked_and_decodes_go_first() -> None:
    s = make(budget=8)
    a = req("a", 3, max_tokens=10)
    s.add(a)
    run_step(s)  # a prefilled, 1 token out
    long = req("long", 20)
    s.add(long)
    batch = s.schedule()
    assert batch.decodes == [a], "the decode goes first"
    [chunk] = batch.seqs
    assert (chunk.request, chunk.num_tokens) == (long, 7), "the chunk takes the rest of the budget"
    assert not chunk.sample
    s.update(batch, [7])
    for _ in range(2):  # 20 prompt tokens: chunks of 7, 7, 6 (one decode beside each)
        assert not long.output
        run_step(s)
    assert long.output, "the last chunk samples"


def test_finished_request_leaves_and_gives_blocks_back() -> None:
    s = make()
    a = req("a", 5, max_tokens=2)
    s.add(a)
    run_step(s)
    run_step(s)
    assert a.finished and a.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert s.pool.num_free == s.pool.num_blocks


def test_eos_stops_unless_ignored() -> None:
    s = make()
    a = req("a", 5, max_tokens=10)
    s.add(a)
    run_step(s, token=EOS)
    assert a.finished and a.finish_reason == common_pb2.FINISH_REASON_STOP


def test_preemption_frees_blocks_of_latest_request_and_requeues_it_first() -> None:
    s = make(num_blocks=6, budget=64, bs=4)
    a, b = req("a", 8, max_tokens=20), req("b", 8, max_tokens=20)
    s.add(a)
    s.add(b)
    run_step(s)  # 2 blocks each + 1 token each -> 9 tokens: need a third block on next decode
    for _ in range(8):
        run_step(s)
    assert b in s.waiting or a in s.waiting
    victim = b if b in s.waiting else a
    assert victim is b, "the latest arrival is preempted"
    assert victim.num_computed == 0 and not victim.block_table
    assert s.waiting[0] is b


def test_priority_orders_waiting_queue() -> None:
    s = make(budget=4, max_seqs=1)
    lo, hi = req("lo", 3), req("hi", 3, priority=5)
    s.add(lo)
    s.add(hi)
    assert run_step(s) == [hi]


def test_abort_releases_blocks_and_reports_released() -> None:
    s = make()
    a = req("a", 9, max_tokens=10)
    s.add(a)
    run_step(s)
    s.abort(a)
    assert s.pool.num_free == s.pool.num_blocks
    batch = s.schedule()
    assert a in batch.ended and a.aborted


def test_waiting_request_reuses_cached_prefix_and_skips_its_compute() -> None:
    s = make(budget=64)
    a = req("a", 10, max_tokens=1, first=1)
    s.add(a)
    run_step(s)
    assert a.finished
    b = req("b", 12, first=1)  # same first 8 tokens = 2 full blocks of 4
    s.add(b)
    batch = s.schedule()
    [seq] = batch.seqs
    assert (seq.start, seq.num_tokens) == (8, 4)
    assert b.num_cached == 8
    hashes = prompt_block_hashes(a.prompt, 4)
    assert b.block_table[:2] == [s.pool.index[h] for h in hashes[:2]]


def test_no_prefix_caching_computes_everything() -> None:
    limits = SchedulerLimits(8, 64, 4, 1000, (EOS,), prefix_caching=False)
    s = Scheduler(limits, BlockPool(64))
    for rid in ("a", "b"):
        r = req(rid, 10, max_tokens=1, first=1)
        s.add(r)
        batch = s.schedule()
        [seq] = batch.seqs
        assert seq.start == 0 and r.num_cached == 0
        s.update(batch, [7])


def test_long_prompt_is_admitted_within_bounded_steps_under_a_stream_of_short_ones() -> None:
    """No starvation: FCFS with chunked prefill lets a long prompt in while short ones keep coming."""
    s = make(num_blocks=256, budget=16, max_seqs=8, bs=4)
    s.add(req("short-0", 4, max_tokens=6))
    run_step(s)
    long = req("long", 200, max_tokens=2)
    s.add(long)
    steps = 0
    while not long.output:
        s.add(req(f"short-{steps + 1}", 4, max_tokens=6))  # a new short request every step
        run_step(s)
        steps += 1
        assert steps <= 200 // 4 + 10, "the long prompt starved"
    assert long.output


def test_fully_cached_prompt_still_computes_its_last_token() -> None:
    s = make(budget=64)
    a = req("a", 8, max_tokens=1, first=1)
    s.add(a)
    run_step(s)
    b = req("b", 8, max_tokens=1, first=1)
    s.add(b)
    [seq] = s.schedule().seqs
    assert (seq.start, seq.num_tokens, seq.sample) == (7, 1, True)


def test_low_priority_request_ages_past_a_stream_of_higher_priority_ones() -> None:
    limits = SchedulerLimits(1, 64, 4, 1000, (EOS,), priority_aging_s=1.0)
    s = Scheduler(limits, BlockPool(64))
    low = req("low", 4, max_tokens=1, priority=0)
    low.arrival -= 5.0  # waited 5 s: worth 5 levels
    s.add(low)
    s.add(req("high", 4, max_tokens=1, priority=3))
    assert run_step(s) == [low]
    s.add(req("higher", 4, max_tokens=1, priority=9))
    assert s.schedule().seqs[0].request.request_id == "higher"


def test_steady_decodes_are_packed_with_positions_blocks_and_output_indices() -> None:
    s = make(bs=4)
    a = req("a", 3, max_tokens=10)
    s.add(a)
    run_step(s)  # prefill: 3 prompt tokens computed, 1 token sampled
    batch = s.schedule()
    assert not batch.seqs and batch.decodes == [a]
    # Position 3 (the sampled token) still fits the first block; output index 1 is sampled next.
    assert (batch.decode_positions, batch.decode_blocks, batch.decode_indices) == ([3], [-1], [1])
    s.update(batch, [8])
    batch = s.schedule()
    assert batch.decode_positions == [4] and batch.decode_blocks == [a.block_table[1]]
    assert batch.appended == [(a, a.block_table[1])]
    s.update(batch, [9])
    assert a.output == [7, 8, 9]


def test_pipelined_decode_counts_tokens_in_flight() -> None:
    """Step N+1 is scheduled before N's token is back: it feeds the worker's own sample."""
    s = make(bs=4)
    a = req("a", 3, max_tokens=10)
    s.add(a)
    run_step(s)
    first, second = s.schedule(), s.schedule()
    assert second.decode_positions == [4] and second.decode_indices == [2]
    s.update(first, [8])
    s.update(second, [9])
    assert a.output == [7, 8, 9] and a.pending == 0


def test_min_tokens_defers_eos() -> None:
    s = make()
    a = Request("a", [5, 6], SamplingParams(temperature=0, max_tokens=10, min_tokens=2))
    s.add(a)
    run_step(s, token=EOS)
    run_step(s, token=EOS)
    assert not a.finished, "EOS within min_tokens is not a stop"
    run_step(s, token=EOS)
    assert a.finished and a.finish_reason == common_pb2.FINISH_REASON_STOP


def test_embedding_request_finishes_after_its_prompt_with_the_pooled_state() -> None:
    s = make(budget=4)
    e = Request("e", list(range(10, 20)), SamplingParams(max_tokens=1), pooling=common_pb2.POOLING_MEAN)
    s.add(e)
    steps = 0
    while not e.finished:
        batch = s.schedule()
        assert not batch.sampling_order(), "an embedding samples nothing"
        s.update(batch, [], embeddings={e.seq_id: [0.5, -0.5]})
        steps += 1
    assert steps == 3 and e.embedding == [0.5, -0.5] and not e.output
    assert s.pool.num_used == 0, "its blocks are back (cached, evictable)"


def test_prompt_logprobs_and_mean_pooling_bypass_the_prefix_cache() -> None:
    s = make(budget=64)
    a = req("a", 9, max_tokens=1, first=1)
    s.add(a)
    run_step(s)
    b = Request("b", list(range(1, 10)), SamplingParams(max_tokens=1, prompt_logprobs=0))
    s.add(b)
    [seq] = s.schedule().seqs
    assert seq.start == 0 and b.num_cached == 0, "every prompt position must be computed"


def test_logprobs_follow_their_tokens() -> None:
    s = make()
    a = Request("a", [5, 6], SamplingParams(temperature=0, max_tokens=3, logprobs=1))
    s.add(a)
    for t in (7, 8):
        batch = s.schedule()
        s.update(batch, [t], logprobs=[common_pb2.Logprobs(token_id=t, logprob=-0.5)])
    assert [lp.token_id for lp in a.logprobs] == [7, 8]


def test_cached_prefix_is_shared_only_between_requests_of_the_same_salt() -> None:
    s = make(budget=64)
    a = req("a", 10, max_tokens=1, first=1)
    a.cache_salt = b"tenant-a"
    s.add(a)
    run_step(s)
    assert a.finished
    assert a.block_hashes[:2] == prompt_block_hashes(a.prompt, 4, salt=b"tenant-a")[:2]
    for rid, salt, cached in (("b", b"tenant-b", 0), ("c", b"", 0), ("d", b"tenant-a", 8)):
        r = req(rid, 12, max_tokens=1, first=1)  # the same first 8 tokens as a
        r.cache_salt = salt
        s.add(r)
        batch = s.schedule()
        assert r.num_cached == cached, rid
        s.update(batch, [7] * len(batch.sampling_order()))


def test_a_joining_step_takes_new_requests_within_what_the_step_sent_left() -> None:
    """The step sent ahead holds a's decode; b and c arrive: a step joining it takes them, in
    order, within the rest of the token budget (c's prompt chunked), and nothing running."""
    s = make(budget=32)
    a = req("a", 5, max_tokens=10)
    s.add(a)
    run_step(s)
    sent = s.schedule()
    b, c = req("b", 20), req("c", 20)
    s.add(b)
    s.add(c)
    joining = s.schedule_joining(sent.num_tokens, sent.num_seqs)
    assert not joining.decodes
    assert [(x.request, x.num_tokens, x.sample) for x in joining.seqs] == [(b, 20, True), (c, 11, False)]
    s.update(sent, [7])
    s.update(joining, [7])
    s.check_invariants()
    assert set(s.schedule().requests()) == {a, b, c}  # c's next chunk with the decodes


def test_nothing_joins_after_an_abort_or_behind_a_request_that_ran_before() -> None:
    s = make()
    a = req("a", 5, max_tokens=10)
    s.add(a)
    run_step(s)
    sent = s.schedule()
    b, c = req("b", 5, max_tokens=10), req("c", 3)
    b.output.append(9)  # preempted after a token: it recomputes prompt and output, as resent
    s.add(b)
    s.add(c)
    assert not s.schedule_joining(sent.num_tokens, sent.num_seqs).num_seqs
    assert s.waiting == [b, c]

    s = make()
    a, b = req("a", 5, max_tokens=10), req("b", 5, max_tokens=10)
    s.add(a)
    s.add(b)
    run_step(s)
    sent = s.schedule()
    s.abort(b)  # its blocks are free, and the step sent still writes them
    s.add(req("c", 3))
    assert not s.schedule_joining(sent.num_tokens, sent.num_seqs).num_seqs
