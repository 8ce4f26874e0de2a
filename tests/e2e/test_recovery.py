"""Faults through real processes: SIGKILL the scheduler, SIGKILL a worker, mid-generation.

Each ends with every stream complete — greedy outputs identical to transformers', no token lost or
repeated — and the block invariants intact in Redis.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
import urllib.request
from pathlib import Path

from e2e_util import HFReference, assert_block_invariants, launch
from prometheus_client.parser import text_string_to_metric_families

from pagewire import serving
from pagewire.launcher import Stack, free_port
from pagewire.v1 import common_pb2, generation_pb2, generation_pb2_grpc

PROMPTS = [f"Request number {i}: " + "tell me more " * i for i in range(8)]
MAX_TOKENS = 160


async def stream_tokens(stub: generation_pb2_grpc.GenerationStub, prompt: str, got: list[int]) -> generation_pb2.GenerateResponse:
    req = generation_pb2.GenerateRequest(
        text=prompt,
        sampling=common_pb2.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True),
    )
    last = generation_pb2.GenerateResponse()
    async for resp in stub.Generate(req):
        got.extend(resp.token_ids)
        last = resp
    return last


async def generate_through_fault(stack: Stack, fault: object) -> tuple[list[list[int]], list]:
    """Run all prompts; once every stream has tokens, await ``fault()``; collect the outputs."""
    outputs: list[list[int]] = [[] for _ in PROMPTS]
    async with serving.insecure_channel(stack.router) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        tasks = [asyncio.create_task(stream_tokens(stub, p, out)) for p, out in zip(PROMPTS, outputs, strict=True)]
        while not all(len(o) >= 2 for o in outputs):
            assert not any(t.done() for t in tasks), "a stream ended before the fault"
            await asyncio.sleep(0.01)
        before = [len(o) for o in outputs]
        await fault()  # type: ignore[operator]
        finals = await asyncio.gather(*tasks)
    assert all(b < MAX_TOKENS for b in before), "the fault must come mid-generation"
    return outputs, finals


def check_outputs(outputs: list[list[int]], finals: list, hf: HFReference) -> None:
    for prompt, ids, last in zip(PROMPTS, outputs, finals, strict=True):
        expected = hf.greedy(hf.tokenizer.encode(prompt), MAX_TOKENS, stop_at_eos=False)
        assert len(ids) == MAX_TOKENS, f"{len(ids)} tokens: lost or repeated across the fault"
        assert ids == expected
        assert last.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert last.usage.completion_tokens == MAX_TOKENS


def test_scheduler_sigkill_mid_generation_streams_continue(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    stack = launch(tiny_model, tmp_path, worker_args=["--num-blocks", "256"],
                   scheduler_args=["--check-invariants", "--lease-ttl-s", "2"])
    try:
        async def kill_and_restart() -> None:
            stack.service("scheduler").process.kill()
            stack.service("scheduler").process.wait()
            await stack.restart("scheduler")

        outputs, finals = asyncio.run(generate_through_fault(stack, kill_and_restart))
        check_outputs(outputs, finals, hf_reference)
        assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 256)
        log = (tmp_path / "scheduler.log").read_text()
        recovered = [(int(n), int(t)) for n, t in
                     re.findall(r"(\d+) requests recovered with (\d+) output tokens", log)]
        assert recovered[0] == (0, 0)
        assert recovered[1][0] >= 1 and recovered[1][1] >= recovered[1][0], (
            "the new scheduler reloads in-flight requests with the tokens Redis recorded"
        )
    finally:
        stack.stop()


def scheduler_gauges(port: int, name: str) -> dict[str, float]:
    """A scheduler gauge's value per worker id, as Prometheus would scrape it."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        s.labels["worker_id"]: s.value
        for family in text_string_to_metric_families(text) for s in family.samples
        if s.name == name
    }


def test_worker_sigkill_moves_its_requests_to_the_other_worker(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    metrics_port = free_port()
    stack = launch(tiny_model, tmp_path, num_workers=2, worker_args=["--num-blocks", "256"],
                   scheduler_args=["--check-invariants", "--lease-ttl-s", "2",
                                   "--metrics-port", str(metrics_port)])
    try:
        async def kill_worker() -> None:
            stack.service("worker-1").process.kill()

        outputs, finals = asyncio.run(generate_through_fault(stack, kill_worker))
        check_outputs(outputs, finals, hf_reference)
        assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 256)
        log = (tmp_path / "scheduler.log").read_text()
        assert "moved" in log and "off worker worker-1" in log
        # The lost worker's gauges are gone, not frozen at what it held when it died.
        for gauge in ("pagewire:num_requests_running", "pagewire:kv_blocks_used"):
            assert set(scheduler_gauges(metrics_port, gauge)) == {"worker-0"}, gauge
        assert scheduler_gauges(metrics_port, "pagewire:num_requests_running")["worker-0"] == 0
    finally:
        stack.stop()


def test_hung_worker_is_declared_lost_when_its_heartbeat_expires(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    """SIGSTOP keeps the worker's connection open: only the Redis heartbeat can tell it is gone."""
    stack = launch(tiny_model, tmp_path, num_workers=2,
                   worker_args=["--num-blocks", "256", "--heartbeat-s", "0.3"],
                   scheduler_args=["--check-invariants", "--heartbeat-check-s", "0.3"])
    hung = stack.service("worker-1").process
    try:
        async def freeze_worker() -> None:
            hung.send_signal(signal.SIGSTOP)

        outputs, finals = asyncio.run(generate_through_fault(stack, freeze_worker))
        check_outputs(outputs, finals, hf_reference)
        assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 256)
        log = (tmp_path / "scheduler.log").read_text()
        assert "worker worker-1 lost: heartbeat expired" in log
    finally:
        hung.send_signal(signal.SIGCONT)
        stack.stop()


def test_scheduler_restarted_right_after_sigkill_takes_its_lease_at_once(
    tiny_model: Path, hf_reference: HFReference, tmp_path: Path
) -> None:
    """With a 20 s lease, a scheduler restarted on the same machine right after a SIGKILL does not
    wait for the dead holder's lease to expire: it proves the holder gone and takes it over, so
    streams stall for the restart (a few seconds), not the TTL."""
    stack = launch(tiny_model, tmp_path, worker_args=["--num-blocks", "256"],
                   scheduler_args=["--check-invariants", "--lease-ttl-s", "20"])
    took: list[float] = []
    try:
        async def kill_and_restart() -> None:
            start = time.monotonic()
            stack.service("scheduler").process.kill()
            stack.service("scheduler").process.wait()
            await stack.restart("scheduler")
            took.append(time.monotonic() - start)

        outputs, finals = asyncio.run(generate_through_fault(stack, kill_and_restart))
        check_outputs(outputs, finals, hf_reference)
        print(f"scheduler SIGKILL -> restarted and serving: {took[0]:.2f} s (lease TTL 20 s)")
        assert took[0] < 10, f"{took[0]:.1f} s: the new scheduler waited for the old lease"
        assert "took over lease" in (tmp_path / "scheduler.log").read_text()
        assert_block_invariants(stack.redis_url, tiny_model, "worker-0", 256)
    finally:
        stack.stop()
