"""The scheduler restarts while one of its two workers drains: it starts at once, with both.

Requests stream on both workers; worker-1 is SIGTERMed (a long drain timeout keeps it up,
NOT_SERVING), then the scheduler is SIGKILLed and restarted. The new scheduler does not wait for
worker-1 to serve again (it never will): it attaches it as draining, its recovered requests
recompute on worker-0 as after a worker loss, worker-1 exits once the new scheduler holds nothing
there, and every stream ends identical to transformers, no token lost or repeated.
"""

from __future__ import annotations

import asyncio
import signal
import time
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

IN_FLIGHT = [f"Request number {i}: " + "tell me more " * i for i in range(8)]
AFTER = [f"Asked after the restart, number {i}: " + "go on " * i for i in range(4)]
MAX_TOKENS = 160
AFTER_TOKENS = 24
DRAIN_TIMEOUT_S = 120  # longer than the whole test: worker-1 stays up unless it holds nothing
NUM_BLOCKS = 256


def request(rid: str, prompt: str, max_tokens: int) -> generation_pb2.GenerateRequest:
    req = greedy_request(prompt, max_tokens, ignore_eos=True)
    req.request_id = rid
    return req




def test_scheduler_restarted_while_a_worker_drains_starts_at_once_and_loses_nothing(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    stack = launch(tiny_model, tmp_path, num_workers=2,
                   worker_args=["--num-blocks", str(NUM_BLOCKS),
                                "--drain-timeout-s", str(DRAIN_TIMEOUT_S)],
                   scheduler_args=["--check-invariants", "--lease-ttl-s", "2"],
                   router_args=["--routing-policy", "round-robin"])  # puts requests on both
    draining = stack.service("worker-1").process
    client = redis.Redis.from_url(stack.redis_url)
    load_key = redis_keys(tiny_model).worker_load("worker-1")
    try:
        async def scenario() -> tuple[list, list[int], float]:
            """(prompt, output, last message, max_tokens) per stream; worker-1's requests at
            SIGTERM; seconds the restarted scheduler took to serve."""
            old: list[list[int]] = [[] for _ in IN_FLIGHT]
            new: list[list[int]] = [[] for _ in AFTER]
            async with serving.insecure_channel(stack.router) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                streaming = [asyncio.create_task(stream_into(stub, request(f"old-{i}", p, MAX_TOKENS), o))
                             for i, (p, o) in enumerate(zip(IN_FLIGHT, old, strict=True))]
                while not all(len(o) >= 2 for o in old):
                    ended = [(len(o), t.exception()) for t, o in zip(streaming, old, strict=True)
                             if t.done()]
                    assert not ended, f"a stream ended before the fault: (tokens, error) {ended}"
                    await asyncio.sleep(0.01)
                on_1 = [i for i in range(len(IN_FLIGHT))
                        if worker_of(client, tiny_model, f"old-{i}") == "worker-1"]
                assert on_1, "requests in flight on worker-1"
                draining.send_signal(signal.SIGTERM)
                sigterm = time.monotonic()
                while client.hget(load_key, "draining") != b"1":  # the old scheduler saw it
                    assert time.monotonic() - sigterm < 5, "the drain was not announced"
                    await asyncio.sleep(0.005)
                stack.service("scheduler").process.kill()
                stack.service("scheduler").process.wait()
                before = [len(o) for o in old]
                start = time.monotonic()
                await stack.restart("scheduler", timeout=60)
                started = time.monotonic() - start
                old_last = await asyncio.gather(*streaming)
                later = [stream_into(stub, request(f"new-{i}", p, AFTER_TOKENS), o)
                         for i, (p, o) in enumerate(zip(AFTER, new, strict=True))]
                new_last = await asyncio.gather(*later)
            assert all(b < MAX_TOKENS for b in before), "the restart must come mid-generation"
            checks = [*zip(IN_FLIGHT, old, old_last, [MAX_TOKENS] * len(old), strict=True),
                      *zip(AFTER, new, new_last, [AFTER_TOKENS] * len(new), strict=True)]
            return checks, on_1, started

        checks, on_1, started = asyncio.run(scenario())
        assert started < 10, f"the restarted scheduler took {started:.1f} s to serve"
        for prompt, ids, last, n in checks:
            assert len(ids) == n, f"{len(ids)} tokens: lost or repeated"
            assert ids == hf_reference.greedy(hf_reference.tokenizer.encode(prompt), n, stop_at_eos=False)
            assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert {worker_of(client, tiny_model, f"new-{i}") for i in range(len(AFTER))} == {"worker-0"}
        assert {worker_of(client, tiny_model, f"old-{i}") for i in on_1} == {"worker-0"}, (
            "worker-1's recovered requests recomputed on worker-0")
        # It held nothing for the new scheduler: it exits long before its drain timeout.
        assert draining.wait(30) == 0
        log = (tmp_path / "scheduler.log").read_text()
        assert "worker worker-1 is draining at start-up" in log
        deadline = time.monotonic() + 10
        while log.count("worker worker-1 lost") < 1:  # and the scheduler drops it
            assert time.monotonic() < deadline, "the exited worker was not noticed"
            time.sleep(0.2)
            log = (tmp_path / "scheduler.log").read_text()
        assert_block_invariants(stack.redis_url, tiny_model, "worker-0", NUM_BLOCKS)
        live = client.smembers(redis_keys(tiny_model).requests())
        assert not live, f"requests left in Redis: {live}"
    finally:
        client.close()
        stack.stop()
