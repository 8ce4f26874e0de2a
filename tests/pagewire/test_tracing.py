"""Tracing as a collector sees it: real processes export over OTLP/gRPC to an in-test receiver."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import timeit
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from opentelemetry.trace import INVALID_SPAN, SpanKind
from otlp_receiver import OtlpReceiver

from pagewire import tracing

REPO = Path(__file__).resolve().parents[2]

# One tier of a request's path, as its own process: continue the trace the previous tier handed
# over (none: start it, as the router does), pass the context on (stdout), end the span, exit.
# It never calls shutdown_tracing: the flush at interpreter exit must deliver the span.
HOP = """
import json, sys
from pagewire import tracing
service, carrier = sys.argv[1], json.loads(sys.argv[2])
assert tracing.init_tracing(service) == (sys.argv[3] == "on")
attrs = {tracing.REQUEST_ID: "req-1", tracing.WORKER_ID: service}
if carrier:
    span = tracing.start_child(service + ".work", carrier, attrs)
else:
    span = tracing.start_span(service + ".work", None, attrs, kind=tracing.SpanKind.SERVER)
print(json.dumps(tracing.inject(span)))
tracing.end_span(span, {tracing.OUTPUT_TOKENS: 3, tracing.FINISH_REASON: "stop"})
"""


def otel_free_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def hop(service: str, carrier: dict[str, str], env: dict[str, str], on: bool = True) -> dict:
    """Run one tier to completion (the process has exited when this returns)."""
    proc = subprocess.run(
        [sys.executable, "-c", HOP, service, json.dumps(carrier), "on" if on else "off"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as r:
        yield r


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    yield
    tracing.shutdown_tracing()


@pytest.fixture
def traced(
    receiver: OtlpReceiver, no_otel_env: None, monkeypatch: pytest.MonkeyPatch
) -> OtlpReceiver:
    """Tracing on in this process, exporting to ``receiver``."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    assert tracing.init_tracing("pytest")
    return receiver


def test_a_trace_crosses_three_processes_through_carriers(receiver: OtlpReceiver) -> None:
    env = otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint)
    to_scheduler = hop("router", {}, env)
    assert set(to_scheduler) == {"traceparent"}
    to_worker = hop("scheduler", to_scheduler, env)
    hop("worker", to_worker, env)

    spans = {s.service_name: s for s in receiver.wait_for(lambda got: len(got) >= 3)}
    assert set(spans) == {"router", "scheduler", "worker"}
    router, scheduler, worker = spans["router"], spans["scheduler"], spans["worker"]
    assert router.parent_span_id is None and router.kind == "SERVER"
    assert scheduler.parent_span_id == router.span_id
    assert worker.parent_span_id == scheduler.span_id
    assert router.trace_id == scheduler.trace_id == worker.trace_id
    version, trace_id, span_id, flags = to_scheduler["traceparent"].split("-")
    assert (trace_id, span_id) == (router.trace_id, router.span_id)
    assert int(flags, 16) & 1  # sampled
    assert worker.attributes == {
        "pagewire.request_id": "req-1", "pagewire.worker_id": "worker",
        "pagewire.output_tokens": 3, "pagewire.finish_reason": "stop",
    }


def test_disabled_sdk_exports_nothing_even_with_an_endpoint(receiver: OtlpReceiver) -> None:
    off = otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint, OTEL_SDK_DISABLED="true")
    assert hop("silent", {}, off, on=False) == {}
    # A traced process run afterwards is the control: once its span is in, the silent one
    # would have been too (both flush at exit, and the silent one exited first).
    hop("control", {}, otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint))
    spans = receiver.wait_for(lambda got: any(s.service_name == "control" for s in got))
    assert [s.service_name for s in spans] == ["control"]


def test_tracing_is_off_without_configuration(no_otel_env: None) -> None:
    assert tracing.init_tracing("router") is False
    assert not tracing.enabled()
    span = tracing.start_span(tracing.ROUTER_SPAN, None, {tracing.REQUEST_ID: "r"})
    assert span is INVALID_SPAN  # the shared no-op span: nothing allocated, nothing recorded
    assert tracing.start_child("x", {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}) is INVALID_SPAN
    assert tracing.inject(span) == {}
    assert tracing.extract_metadata([("traceparent", f"00-{'1' * 32}-{'2' * 16}-01")]) is None
    assert tracing.current_ids() is None
    with tracing.span("block") as s:
        assert s is INVALID_SPAN


def test_tracing_off_costs_well_under_a_microsecond_per_call(no_otel_env: None) -> None:
    tracing.init_tracing("router")
    attrs = {tracing.REQUEST_ID: "r"}
    carrier = {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"}

    def request_path() -> None:  # what one request costs a tier when tracing is off
        span = tracing.start_child(tracing.SCHEDULER_SCHEDULE_SPAN, carrier, attrs)
        tracing.inject(span)
        tracing.end_span(span, attrs)

    best = min(timeit.repeat(request_path, number=20_000, repeat=5)) / 20_000
    print(f"tracing off: {best * 1e9:.0f} ns per start_child + inject + end_span")
    assert best < 1e-6


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"}, ["otlp"]),
        ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
        ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, []),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_TRACES_EXPORTER": "otlp"}, []),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, ["otlp"]),
    ],
)
def test_environment_decides_the_exporters(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.exporter_names(env) == exporters


def test_client_traceparent_metadata_parents_the_server_span(traced: OtlpReceiver) -> None:
    """The public API's contract: a client's ``traceparent`` call metadata makes the router's
    span its child (checked over a real gRPC call)."""

    async def call() -> None:
        async def handle(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            parent = tracing.extract_metadata(context.invocation_metadata())
            span = tracing.start_span(tracing.ROUTER_SPAN, parent, kind=SpanKind.SERVER)
            tracing.end_span(span)
            return b""

        server = grpc.aio.server()
        rpc = grpc.unary_unary_rpc_method_handler(handle)
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t.T", {"C": rpc})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            client_span = tracing.start_span("client.call", kind=SpanKind.CLIENT)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                metadata = list(tracing.inject(client_span).items())
                await channel.unary_unary("/t.T/C")(b"", metadata=metadata, timeout=10)
            tracing.end_span(client_span)
        finally:
            await server.stop(None)

    asyncio.run(call())
    tracing.flush()
    spans = {s.name: s for s in traced.wait_for(lambda got: len(got) >= 2)}
    assert spans[tracing.ROUTER_SPAN].parent_span_id == spans["client.call"].span_id
    assert spans[tracing.ROUTER_SPAN].trace_id == spans["client.call"].trace_id


def test_downstream_tiers_never_start_traces(traced: OtlpReceiver) -> None:
    assert tracing.start_child(tracing.WORKER_STEP_SPAN, {}) is INVALID_SPAN
    assert tracing.start_child(tracing.WORKER_STEP_SPAN, {"traceparent": "garbage"}) is INVALID_SPAN
    assert tracing.extract({"traceparent": "00-" + "0" * 32 + "-" + "0" * 16 + "-01"}) is None


def test_a_span_can_end_elsewhere_with_an_error_and_a_backdated_start(
    traced: OtlpReceiver,
) -> None:
    queued_at = time.monotonic() - 2.0  # e.g. the request's arrival, measured before the span
    span = tracing.start_span(
        tracing.SCHEDULER_QUEUE_SPAN, start_time_ns=tracing.wall_ns(queued_at)
    )

    def later(s: tracing.Span) -> None:  # another callback finishes it
        tracing.end_span(s, {tracing.FINISH_REASON: "abort"}, error=RuntimeError("worker lost"))

    later(span)
    tracing.flush()
    (got,) = traced.wait_for(lambda spans: len(spans) >= 1)
    assert got.status == "ERROR"
    assert got.attributes[tracing.FINISH_REASON] == "abort"
    assert 1.9e9 < got.end_ns - got.start_ns < 3e9


def test_span_block_is_current_inside_and_ended_after(traced: OtlpReceiver) -> None:
    with tracing.span("block", attributes={tracing.REQUEST_ID: "r"}) as s:
        ctx = s.get_span_context()
        assert tracing.current_ids() == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert tracing.current_ids() is None
    tracing.flush()
    (got,) = traced.wait_for(lambda spans: len(spans) >= 1)
    assert got.name == "block" and got.span_id == f"{ctx.span_id:016x}"


def test_otel_service_name_wins_over_the_default(
    receiver: OtlpReceiver, no_otel_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_SERVICE_NAME", "router-eu-1")
    assert tracing.init_tracing("router")
    tracing.end_span(tracing.start_span("x"))
    tracing.shutdown_tracing()  # flushes
    assert [s.service_name for s in receiver.wait_for(lambda got: len(got) >= 1)] == ["router-eu-1"]


def test_a_dead_collector_delays_exit_by_at_most_the_shutdown_timeout() -> None:
    script = (
        "from pagewire import tracing\n"
        "assert tracing.init_tracing('s')\n"
        "tracing.end_span(tracing.start_span('x'))\n"
        "tracing.shutdown_tracing(timeout_s=0.5)\n"
    )
    env = otel_free_env(OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1")  # nothing listens
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, check=True,
                   capture_output=True, timeout=60)
    # The exporter alone would retry for ~7 s (backoff 1 + 2 + 4 s within its 10 s deadline).
    assert time.monotonic() - started < 4.0
