"""Operators' view of real processes: one trace per request across router, scheduler and worker
(context carried from the client's ``traceparent``), and Prometheus metrics on every service under
the names the Grafana dashboard uses."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from e2e_util import greedy_request, launch
from otlp_receiver import OtlpReceiver

from pagewire import serving, tracing
from pagewire.launcher import free_port
from pagewire.v1 import generation_pb2_grpc

DASHBOARD_METRICS = Path(__file__).parents[2] / "deploy" / "grafana" / "metrics.txt"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def sample(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets)."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_trace_spans_three_services_and_metrics_match_the_dashboard(
    tiny_model: Path, tmp_path: Path
) -> None:
    ports = {name: free_port() for name in ("worker", "scheduler", "router")}
    with OtlpReceiver() as receiver:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_BSP_SCHEDULE_DELAY": "100"}
        stack = launch(
            tiny_model, tmp_path, env=env,
            worker_args=["--metrics-port", str(ports["worker"])],
            scheduler_args=["--metrics-port", str(ports["scheduler"])],
            router_args=["--metrics-port", str(ports["router"])],
        )
        try:
            async def generate() -> None:
                async with serving.insecure_channel(stack.router) as channel:
                    stub = generation_pb2_grpc.GenerationStub(channel)
                    metadata = (("traceparent", f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"),)
                    async for _ in stub.Generate(greedy_request("Tell me a story", 8),
                                                 metadata=metadata):
                        pass

            asyncio.run(generate())
            names = {tracing.ROUTER_SPAN, tracing.SCHEDULER_QUEUE_SPAN,
                     tracing.SCHEDULER_SCHEDULE_SPAN, tracing.WORKER_STEP_SPAN}
            spans = receiver.wait_for(lambda ss: names <= {s.name for s in ss}, timeout=30)
            text = {name: scrape(port) for name, port in ports.items()}
        finally:
            stack.stop()

    by_name = {s.name: s for s in spans if s.trace_id == CLIENT_TRACE}
    assert names <= set(by_name), "every tier's span joins the client's trace"
    router = by_name[tracing.ROUTER_SPAN]
    schedule = by_name[tracing.SCHEDULER_SCHEDULE_SPAN]
    assert router.parent_span_id == CLIENT_SPAN and router.service_name == "pagewire-router"
    assert by_name[tracing.SCHEDULER_QUEUE_SPAN].parent_span_id == router.span_id
    assert schedule.parent_span_id == router.span_id
    assert schedule.service_name == "pagewire-scheduler"
    assert by_name[tracing.WORKER_STEP_SPAN].parent_span_id == schedule.span_id
    assert by_name[tracing.WORKER_STEP_SPAN].service_name == "pagewire-worker"
    assert router.attributes[tracing.OUTPUT_TOKENS] == 8
    assert schedule.attributes[tracing.FINISH_REASON] == "FINISH_REASON_LENGTH"

    # Every name on the dashboard is exported by some service.
    exported = "\n".join(text.values())
    for name in DASHBOARD_METRICS.read_text().split():
        assert f"# TYPE {name} " in exported, f"{name} not exported"
    assert sample(text["scheduler"], "pagewire:generation_tokens_total") == 8
    assert sample(text["router"], "pagewire:time_to_first_token_seconds_count") == 1
    assert sample(text["router"], "pagewire:request_success_total") == 1
    assert sample(text["router"], "pagewire:routing_decisions_total") == 1
    assert sample(text["scheduler"], "pagewire:kv_blocks_total") > 0
    assert sample(text["worker"], "pagewire:worker_step_seconds_count") >= 8
