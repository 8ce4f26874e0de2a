"""SIGTERM one of two workers while requests stream: a drain, not a loss.

The scheduler sees the worker's health turn NOT_SERVING and publishes ``draining`` in its load
figures; from then on routers and the scheduler send it nothing new. Requests queued on it that
had not started (``--max-num-seqs`` keeps some waiting) move to the other worker; what it runs
finishes there (nothing is recomputed elsewhere), then it exits 0 well before its drain timeout.
"""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import redis
from e2e_util import (
    HFReference,
    assert_block_invariants,
    greedy_request,
    launch,
    redis_keys,
    stream_into,
    worker_of,
)

from pagewire import serving
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

IN_FLIGHT = [f"Request number {i}: " + "tell me more " * i for i in range(10)]
AFTER = [f"Asked after the drain began, number {i}: " + "go on " * i for i in range(6)]
MAX_TOKENS = 160  # in flight when the worker is told to stop
AFTER_TOKENS = 24
DRAIN_TIMEOUT_S = 60
NUM_BLOCKS = 256
MAX_NUM_SEQS = 3  # per worker: of the 5 requests round-robin places on each, 2 wait


def request(rid: str, prompt: str, max_tokens: int) -> generation_pb2.GenerateRequest:
    req = greedy_request(prompt, max_tokens, ignore_eos=True)
    req.request_id = rid
    return req



@dataclass
class Drained:
    """What the scenario saw: outputs and last messages of the requests in flight at SIGTERM and
    of those sent after it, which of worker-1's requests were running / waiting at SIGTERM, and
    seconds from SIGTERM to the drain showing in Redis and to the worker's exit."""

    old: list[list[int]]
    old_last: list[generation_pb2.GenerateResponse]
    new: list[list[int]]
    new_last: list[generation_pb2.GenerateResponse]
    running_1: list[int]
    queued_1: list[int]
    announced: float
    exited: float



def test_sigterm_worker_drains_while_the_other_takes_new_requests(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    stack = launch(tiny_model, tmp_path, num_workers=2,
                   worker_args=["--num-blocks", str(NUM_BLOCKS),
                                "--drain-timeout-s", str(DRAIN_TIMEOUT_S)],
                   scheduler_args=["--check-invariants", "--max-num-seqs", str(MAX_NUM_SEQS)],
                   router_args=["--routing-policy", "round-robin"])  # which alone would pick worker-1
    draining = stack.service("worker-1").process
    client = redis.Redis.from_url(stack.redis_url)
    load_key = redis_keys(tiny_model).worker_load("worker-1")
    try:
        async def scenario() -> Drained:
            old: list[list[int]] = [[] for _ in IN_FLIGHT]
            new: list[list[int]] = [[] for _ in AFTER]
            async with serving.insecure_channel(stack.router) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                streaming = [asyncio.create_task(stream_into(stub, request(f"old-{i}", p, MAX_TOKENS), o))
                             for i, (p, o) in enumerate(zip(IN_FLIGHT, old, strict=True))]
                while sum(len(o) >= 2 for o in old) < 2 * MAX_NUM_SEQS:  # both workers full
                    assert not any(t.done() for t in streaming), "a stream ended before SIGTERM"
                    await asyncio.sleep(0.01)
                on_1 = [i for i in range(len(IN_FLIGHT)) if worker_of(client, tiny_model, f"old-{i}") == "worker-1"]
                running_1 = [i for i in on_1 if old[i]]
                queued_1 = [i for i in on_1 if not old[i]]
                assert running_1 and queued_1, f"running and waiting requests on worker-1: {on_1}"
                sigterm = time.monotonic()
                draining.send_signal(signal.SIGTERM)
                while client.hget(load_key, "draining") != b"1":  # the routers' view of it
                    assert time.monotonic() - sigterm < 5, "the drain was not announced"
                    await asyncio.sleep(0.005)
                announced = time.monotonic() - sigterm
                assert all(len(o) < MAX_TOKENS for o in old), "SIGTERM must come mid-generation"
                # Mid-drain, with requests live on it, the draining worker's blocks are consistent.
                await asyncio.to_thread(assert_block_invariants, stack.redis_url, tiny_model,
                                        "worker-1", NUM_BLOCKS, False)
                later = [asyncio.create_task(stream_into(stub, request(f"new-{i}", p, AFTER_TOKENS), o))
                         for i, (p, o) in enumerate(zip(AFTER, new, strict=True))]
                old_last = await asyncio.gather(*streaming)
                new_last = await asyncio.gather(*later)
            code = await asyncio.to_thread(draining.wait, DRAIN_TIMEOUT_S)
            assert code == 0, "the drained worker exits cleanly"
            return Drained(old, list(old_last), new, list(new_last), running_1, queued_1,
                           announced, time.monotonic() - sigterm)

        d = asyncio.run(scenario())
        assert d.exited < DRAIN_TIMEOUT_S / 2, f"exited {d.exited:.1f} s after SIGTERM: drained, not timed out"
        assert d.announced < 2.0, f"the scheduler learned of the drain {d.announced:.2f} s after SIGTERM"
        for prompts, outs, lasts, n in ((IN_FLIGHT, d.old, d.old_last, MAX_TOKENS),
                                        (AFTER, d.new, d.new_last, AFTER_TOKENS)):
            for prompt, ids, last in zip(prompts, outs, lasts, strict=True):
                assert len(ids) == n, f"{len(ids)} tokens: lost or repeated"
                assert ids == hf_reference.greedy(hf_reference.tokenizer.encode(prompt), n, stop_at_eos=False)
                assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert {worker_of(client, tiny_model, f"new-{i}") for i in range(len(AFTER))} == {"worker-0"}
        log = (tmp_path / "scheduler.log").read_text()
        assert "worker worker-1 is not serving" in log
        assert "off worker worker-1" not in log, "nothing was left to recompute at the deadline"
        assert {worker_of(client, tiny_model, f"old-{i}") for i in d.running_1} == {"worker-1"}, (
            "what ran on the draining worker finished there")
        # No slot on worker-1 freed before the drain was known (every stream was short of its
        # end), so every request waiting there had not started: all of them moved.
        assert {worker_of(client, tiny_model, f"old-{i}") for i in d.queued_1} == {"worker-0"}, (
            "requests waiting on the draining worker moved to the other one")
        assert f"worker worker-1 is draining: moved {len(d.queued_1)} waiting requests" in log
        assert_block_invariants(stack.redis_url, tiny_model, "worker-0", NUM_BLOCKS)
        live = client.smembers(redis_keys(tiny_model).requests())
        assert not live, f"requests left in Redis: {live}"
    finally:
        client.close()
        stack.stop()
