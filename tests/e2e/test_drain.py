"""SIGTERM is a drain, not a kill: the router turns NOT_SERVING, refuses new requests, lets the
streams in flight finish, then exits."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from e2e_util import greedy_request, launch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pagewire import serving
from pagewire.v1 import common_pb2, generation_pb2_grpc


def test_router_sigterm_finishes_streams_in_flight_and_refuses_new_ones(
    tiny_model: Path, tmp_path: Path
) -> None:
    stack = launch(tiny_model, tmp_path, router_args=["--drain-timeout-s", "60"])
    router = stack.service("router")
    try:
        async def scenario() -> tuple[list[int], int, grpc.StatusCode, int]:
            async with serving.insecure_channel(stack.router) as channel:
                stub = generation_pb2_grpc.GenerationStub(channel)
                call = stub.Generate(greedy_request("Drain me", 120, ignore_eos=True))
                ids: list[int] = []
                last = None
                terminated = False
                async for r in call:
                    ids += r.token_ids
                    last = r
                    if len(ids) >= 3 and not terminated:
                        terminated = True
                        router.process.send_signal(signal.SIGTERM)
                        health = health_pb2_grpc.HealthStub(channel)
                        status = (await health.Check(health_pb2.HealthCheckRequest())).status
                        with pytest.raises(grpc.aio.AioRpcError) as refused:
                            async for _ in stub.Generate(greedy_request("too late", 4)):
                                pass
                        code = refused.value.code()
                assert last is not None
                return ids, last.finish_reason, code, status

        ids, reason, refused_code, health_status = asyncio.run(scenario())
        assert len(ids) == 120 and reason == common_pb2.FINISH_REASON_LENGTH
        assert refused_code == grpc.StatusCode.UNAVAILABLE
        assert health_status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert router.process.wait(timeout=30) == 0, "the router exits once drained"
    finally:
        stack.stop()
