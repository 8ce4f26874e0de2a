"""Metrics as Prometheus scrapes them: exact vLLM-style names, labels, values, one owner each."""

from __future__ import annotations

import socket
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from pagewire import metrics
from pagewire.metrics import RequestTimer

MODEL = "tiny"
ROUTER_NAMES = {
    "pagewire:time_to_first_token_seconds",
    "pagewire:time_per_output_token_seconds",
    "pagewire:e2e_request_latency_seconds",
    "pagewire:request_prompt_tokens",
    "pagewire:request_generation_tokens",
    "pagewire:request_success_total",
    "pagewire:routing_decisions_total",
}
SCHEDULER_NAMES = {
    "pagewire:request_queue_time_seconds",
    "pagewire:scheduler_step_seconds",
    "pagewire:num_requests_running",
    "pagewire:num_requests_waiting",
    "pagewire:kv_cache_usage_perc",
    "pagewire:kv_blocks_used",
    "pagewire:kv_blocks_total",
    "pagewire:prompt_tokens_total",
    "pagewire:generation_tokens_total",
    "pagewire:prefix_cache_queries_total",
    "pagewire:prefix_cache_hits_total",
    "pagewire:num_preemptions_total",
}
WORKER_NAMES = {"pagewire:worker_step_seconds"}


def scrape(port: int) -> list[Sample]:
    """Fetch /metrics over HTTP, as Prometheus does, and parse the text format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def exposed_names(samples: list[Sample]) -> set[str]:
    """Metric names as a query would use them: counters with _total, histograms without the
    _bucket/_count/_sum suffixes, and no _created series."""
    names = set()
    for s in samples:
        if s.name.endswith("_created"):
            continue
        for suffix in ("_bucket", "_count", "_sum"):
            if s.name.endswith(suffix) and not s.name.endswith("_total"):
                names.add(s.name.removesuffix(suffix))
                break
        else:
            names.add(s.name)
    return {n for n in names if n.startswith("pagewire:")}


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == name and labels.items() <= s.labels.items()]
    assert len(found) == 1, f"{name} {labels}: {found}"
    return found[0]


@pytest.fixture
def served() -> Iterator[tuple[CollectorRegistry, int]]:
    registry = metrics.new_registry()
    server = metrics.serve_metrics(0, registry)
    try:
        yield registry, server.port
    finally:
        server.stop()


def test_each_service_exposes_exactly_its_own_metrics_under_vllm_names(
    served: tuple[CollectorRegistry, int],
) -> None:
    registry, port = served
    router = metrics.router_metrics(registry, MODEL, max_model_len=2048)
    router.observe_finished(RequestTimer(), 4, 2, "stop")
    router.observe_routed("prefix")
    assert exposed_names(scrape(port)) == ROUTER_NAMES

    scheduler_registry = CollectorRegistry()
    engine = metrics.scheduler_metrics(scheduler_registry, MODEL).for_worker("w0")
    engine.observe_queue_time(0.1)
    worker_registry = CollectorRegistry()
    metrics.worker_metrics(worker_registry, MODEL, "w0").observe_step(0.01)
    with_servers = [metrics.serve_metrics(0, r) for r in (scheduler_registry, worker_registry)]
    try:
        assert exposed_names(scrape(with_servers[0].port)) == SCHEDULER_NAMES
        assert exposed_names(scrape(with_servers[1].port)) == WORKER_NAMES
    finally:
        for s in with_servers:
            s.stop()


def test_every_metric_carries_the_model_name(served: tuple[CollectorRegistry, int]) -> None:
    registry, port = served
    metrics.router_metrics(registry, MODEL, 2048).observe_finished(RequestTimer(), 1, 1, "stop")
    engine = metrics.scheduler_metrics(registry, MODEL).for_worker("w0")
    engine.set_state(1, 0, 1, 8)
    metrics.worker_metrics(registry, MODEL, "w0").observe_step(0.01)
    ours = [s for s in scrape(port) if s.name.startswith("pagewire:")]
    assert ours and all(s.labels.get("model_name") == MODEL for s in ours)


def test_finished_request_records_ttft_tpot_latency_tokens_and_reason(
    served: tuple[CollectorRegistry, int],
) -> None:
    registry, port = served
    router = metrics.router_metrics(registry, MODEL, max_model_len=2048)
    timer = RequestTimer(arrival=100.0, first_token=100.5)
    router.observe_finished(timer, prompt_tokens=30, generation_tokens=11, finished_reason="length",
                            now=102.5)
    samples = scrape(port)
    assert value(samples, "pagewire:time_to_first_token_seconds_sum") == pytest.approx(0.5)
    # 10 tokens after the first, in 2 s
    assert value(samples, "pagewire:time_per_output_token_seconds_sum") == pytest.approx(0.2)
    assert value(samples, "pagewire:e2e_request_latency_seconds_sum") == pytest.approx(2.5)
    assert value(samples, "pagewire:request_prompt_tokens_sum") == 30
    assert value(samples, "pagewire:request_generation_tokens_bucket", le="10.0") == 0
    assert value(samples, "pagewire:request_generation_tokens_bucket", le="20.0") == 1
    assert value(samples, "pagewire:request_success_total", finished_reason="length") == 1


def test_request_without_tokens_counts_but_adds_no_token_latency(
    served: tuple[CollectorRegistry, int],
) -> None:
    registry, port = served
    router = metrics.router_metrics(registry, MODEL, max_model_len=2048)
    router.observe_finished(RequestTimer(arrival=1.0), 5, 0, "abort", now=3.0)
    samples = scrape(port)
    assert value(samples, "pagewire:request_success_total", finished_reason="abort") == 1
    assert value(samples, "pagewire:e2e_request_latency_seconds_count") == 1
    assert value(samples, "pagewire:time_to_first_token_seconds_count") == 0
    assert value(samples, "pagewire:time_per_output_token_seconds_count") == 0


def test_first_token_time_is_kept_from_the_first_send() -> None:
    timer = RequestTimer()
    timer.tokens_sent()
    first = timer.first_token
    timer.tokens_sent()
    assert first is not None and timer.first_token == first


def test_routing_decisions_count_per_policy(served: tuple[CollectorRegistry, int]) -> None:
    registry, port = served
    router = metrics.router_metrics(registry, MODEL, max_model_len=2048)
    for policy in ("prefix", "prefix", "least-load"):
        router.observe_routed(policy)
    samples = scrape(port)
    assert value(samples, "pagewire:routing_decisions_total", policy="prefix") == 2
    assert value(samples, "pagewire:routing_decisions_total", policy="least-load") == 1


def test_scheduler_step_counts_tokens_and_kv_state_per_worker(
    served: tuple[CollectorRegistry, int],
) -> None:
    registry, port = served
    family = metrics.scheduler_metrics(registry, MODEL)
    w0, w1 = family.for_worker("w0"), family.for_worker("w1")
    w0.observe_step(0.004, prompt_tokens=100, generation_tokens=8)
    w0.observe_step(0.002, prompt_tokens=0, generation_tokens=8)
    w0.set_state(running=8, waiting=3, blocks_used=24, blocks_total=96)
    w1.set_state(running=0, waiting=0, blocks_used=0, blocks_total=0)
    samples = scrape(port)
    assert value(samples, "pagewire:prompt_tokens_total", worker_id="w0") == 100
    assert value(samples, "pagewire:generation_tokens_total", worker_id="w0") == 16
    assert value(samples, "pagewire:scheduler_step_seconds_count", worker_id="w0") == 2
    assert value(samples, "pagewire:num_requests_running", worker_id="w0") == 8
    assert value(samples, "pagewire:num_requests_waiting", worker_id="w0") == 3
    assert value(samples, "pagewire:kv_blocks_used", worker_id="w0") == 24
    assert value(samples, "pagewire:kv_blocks_total", worker_id="w0") == 96
    assert value(samples, "pagewire:kv_cache_usage_perc", worker_id="w0") == 0.25
    assert value(samples, "pagewire:kv_cache_usage_perc", worker_id="w1") == 0.0


def test_running_totals_advance_counters_by_difference_and_survive_a_reset(
    served: tuple[CollectorRegistry, int],
) -> None:
    registry, port = served
    engine = metrics.scheduler_metrics(registry, MODEL).for_worker("w0")
    engine.sync_totals(preemptions=2, prefix_queries=64, prefix_hits=32)
    engine.sync_totals(preemptions=3, prefix_queries=96, prefix_hits=32)
    engine.sync_totals(preemptions=1, prefix_queries=16, prefix_hits=16)  # a fresh scheduler
    samples = scrape(port)
    assert value(samples, "pagewire:num_preemptions_total") == 3 + 1
    assert value(samples, "pagewire:prefix_cache_queries_total") == 96 + 16
    assert value(samples, "pagewire:prefix_cache_hits_total") == 32 + 16


def test_a_removed_worker_leaves_no_series(served: tuple[CollectorRegistry, int]) -> None:
    registry, port = served
    family = metrics.scheduler_metrics(registry, MODEL)
    family.for_worker("gone").set_state(4, 0, 10, 10)
    family.for_worker("kept").set_state(1, 0, 1, 10)
    family.remove_worker("gone")
    workers = {s.labels.get("worker_id") for s in scrape(port) if s.name.startswith("pagewire:")}
    assert workers == {"kept"}


def test_buckets_are_vllms() -> None:
    assert metrics.token_buckets(2048) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]
    assert metrics.token_buckets(1) == [1]
    assert metrics.TTFT_BUCKETS[0] == 0.001 and metrics.TTFT_BUCKETS[-1] == 2560.0
    assert metrics.REQUEST_LATENCY_BUCKETS[-1] == 7680.0


def test_port_minus_one_serves_nothing() -> None:
    server = metrics.serve_metrics(-1, CollectorRegistry())
    assert server.port == -1
    server.stop()


def test_stop_releases_the_port() -> None:
    server = metrics.serve_metrics(0, CollectorRegistry())
    port = server.port
    assert scrape(port) == []  # serves, empty registry
    server.stop()
    server.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass
