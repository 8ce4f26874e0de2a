"""Prometheus metrics of every pagewire service: one home for names, labels and buckets.

Names are vLLM's with the ``pagewire:`` prefix instead of ``vllm:`` (same buckets, same
``model_name`` label), so a vLLM dashboard ports by renaming the prefix. Each metric belongs to
exactly one service, so a sum over all scraped pods never counts anything twice:

- router: what the client sees (time to first token, time per output token, end-to-end latency,
  prompt / generation tokens per request, finished requests, routing decisions);
- scheduler: queues, KV blocks, token and prefix-cache counters, preemptions, step time, with a
  ``worker_id`` label because one scheduler drives several workers (vLLM's ``engine`` label);
- worker: its own step time.

Every group binds its label values once, so a hot path pays one method call per observation,
and the step-level helpers take counts (``inc(n)``), never one call per token.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

PREFIX = "pagewire:"
MODEL_LABEL = "model_name"
WORKER_LABEL = "worker_id"

TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
TPOT_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)
# vLLM has no step histogram; a decode step is ~1 ms (tiny model) to ~100 ms (large batch, big
# model), so the resolution is finest there.
STEP_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25,
    0.5, 1.0, 2.5, 5.0,
)


def token_buckets(max_model_len: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_model_len`` (vLLM's buckets for token counts)."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_model_len:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


def new_registry() -> CollectorRegistry:
    """A registry for one service: its own metrics plus the process, platform and GC ones that
    the default registry would carry (a private registry so tests can build many)."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


# ---- router ----------------------------------------------------------------------------------
@dataclass
class RequestTimer:
    """Monotonic timestamps of one request as the router sees it (arrival to last byte)."""

    arrival: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def tokens_sent(self) -> None:
        """Call whenever tokens go to the client; only the first call records anything."""
        if self.first_token is None:
            self.first_token = time.monotonic()


@dataclass(frozen=True)
class RouterMetrics:
    model_name: str
    time_to_first_token: Histogram
    time_per_output_token: Histogram
    e2e_request_latency: Histogram
    request_prompt_tokens: Histogram
    request_generation_tokens: Histogram
    request_success: Counter  # labels: model_name, finished_reason
    routing_decisions: Counter  # labels: model_name, policy

    def observe_finished(
        self,
        timer: RequestTimer,
        prompt_tokens: int,
        generation_tokens: int,
        finished_reason: str,
        now: float | None = None,
    ) -> None:
        """Record a request that ended (any reason, aborts included): once per request.

        Time per output token is the request's mean after its first token, as vLLM's
        ``time_per_output_token_seconds`` is; a request without tokens adds no latency sample
        but still counts under its ``finished_reason`` (lower case: stop, length, abort, error).
        """
        end = time.monotonic() if now is None else now
        self.e2e_request_latency.observe(end - timer.arrival)
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)
        if timer.first_token is not None:
            self.time_to_first_token.observe(timer.first_token - timer.arrival)
            if generation_tokens > 1:
                self.time_per_output_token.observe(
                    (end - timer.first_token) / (generation_tokens - 1)
                )
        self.request_success.labels(self.model_name, finished_reason).inc()

    def observe_routed(self, policy: str) -> None:
        """One routing decision made by ``policy`` (prefix, least-load, round-robin, ...)."""
        self.routing_decisions.labels(self.model_name, policy).inc()


def router_metrics(
    registry: CollectorRegistry, model_name: str, max_model_len: int
) -> RouterMetrics:
    labels = [MODEL_LABEL]
    tokens = token_buckets(max_model_len)

    def hist(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
        family = Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=registry)
        return family.labels(model_name)

    return RouterMetrics(
        model_name=model_name,
        time_to_first_token=hist(
            "time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        ),
        time_per_output_token=hist(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per request, in seconds.",
            TPOT_BUCKETS,
        ),
        e2e_request_latency=hist(
            "e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        ),
        request_prompt_tokens=hist(
            "request_prompt_tokens", "Prompt tokens per finished request.", tokens
        ),
        request_generation_tokens=hist(
            "request_generation_tokens", "Generated tokens per finished request.", tokens
        ),
        request_success=Counter(
            PREFIX + "request_success_total",
            "Finished requests by finish reason.",
            [MODEL_LABEL, "finished_reason"],
            registry=registry,
        ),
        routing_decisions=Counter(
            PREFIX + "routing_decisions_total",
            "Requests routed to a worker, by routing policy.",
            [MODEL_LABEL, "policy"],
            registry=registry,
        ),
    )


# ---- scheduler -------------------------------------------------------------------------------
@dataclass
class EngineMetrics:
    """The scheduler's metrics for one worker, label values bound."""

    queue_time: Histogram
    step_time: Histogram
    running: Gauge
    waiting: Gauge
    kv_usage: Gauge
    blocks_used: Gauge
    blocks_total: Gauge
    prompt_tokens: Counter
    generation_tokens: Counter
    prefix_queries: Counter
    prefix_hits: Counter
    preemptions: Counter
    _last_totals: tuple[int, int, int] = (0, 0, 0)

    def observe_step(
        self,
        seconds: float,
        prompt_tokens: int,
        generation_tokens: int,
    ) -> None:
        """Once per step: its duration, the prompt tokens whose prefill completed in it (the
        whole prompt, cached part included, as vLLM counts) and the tokens it generated."""
        self.step_time.observe(seconds)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)

    def set_state(self, running: int, waiting: int, blocks_used: int, blocks_total: int) -> None:
        """The queue and KV pool after a step. ``blocks_used`` counts blocks requests hold;
        cached blocks nobody holds are free (they can be evicted), as in vLLM's usage figure."""
        self.running.set(running)
        self.waiting.set(waiting)
        self.blocks_used.set(blocks_used)
        self.blocks_total.set(blocks_total)
        self.kv_usage.set(blocks_used / blocks_total if blocks_total else 0.0)

    def sync_totals(self, preemptions: int, prefix_queries: int, prefix_hits: int) -> None:
        """Feed the scheduler's own running totals; counters advance by the difference since the
        last call. A total that went down (a fresh scheduler object after recovery) restarts
        the difference from zero, so the counter never goes backwards."""
        new = (preemptions, prefix_queries, prefix_hits)
        counters = (self.preemptions, self.prefix_queries, self.prefix_hits)
        for counter, now, last in zip(counters, new, self._last_totals, strict=True):
            delta = now - last if now >= last else now
            if delta:
                counter.inc(delta)
        self._last_totals = new

    def observe_queue_time(self, seconds: float) -> None:
        """Once per request, when it is first scheduled: time since it was queued."""
        self.queue_time.observe(seconds)


@dataclass(frozen=True)
class SchedulerMetrics:
    model_name: str
    families: dict[str, Histogram | Gauge | Counter]

    def for_worker(self, worker_id: str) -> EngineMetrics:
        """Bound metrics for one worker engine; call once when the engine is created."""
        bound = {k: f.labels(self.model_name, worker_id) for k, f in self.families.items()}
        return EngineMetrics(**bound)  # type: ignore[arg-type]

    def remove_worker(self, worker_id: str) -> None:
        """Drop a lost worker's series so its last gauge values do not linger."""
        for family in self.families.values():
            family.remove(self.model_name, worker_id)


def scheduler_metrics(registry: CollectorRegistry, model_name: str) -> SchedulerMetrics:
    labels = [MODEL_LABEL, WORKER_LABEL]

    def gauge(name: str, doc: str) -> Gauge:
        return Gauge(PREFIX + name, doc, labels, registry=registry)

    def counter(name: str, doc: str) -> Counter:
        return Counter(PREFIX + name, doc, labels, registry=registry)

    families: dict[str, Histogram | Gauge | Counter] = {
        "queue_time": Histogram(
            PREFIX + "request_queue_time_seconds",
            "Time a request waited before it was first scheduled, in seconds.",
            labels, buckets=REQUEST_LATENCY_BUCKETS, registry=registry,
        ),
        "step_time": Histogram(
            PREFIX + "scheduler_step_seconds",
            "Scheduler step time: schedule, send, apply the result, in seconds.",
            labels, buckets=STEP_BUCKETS, registry=registry,
        ),
        "running": gauge("num_requests_running", "Requests in the running batch."),
        "waiting": gauge("num_requests_waiting", "Requests waiting to be scheduled."),
        "kv_usage": gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1)."),
        "blocks_used": gauge("kv_blocks_used", "KV blocks held by requests."),
        "blocks_total": gauge("kv_blocks_total", "KV blocks of the worker."),
        "prompt_tokens": counter("prompt_tokens_total", "Prompt tokens prefilled."),
        "generation_tokens": counter("generation_tokens_total", "Tokens generated."),
        "prefix_queries": counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
        ),
        "prefix_hits": counter(
            "prefix_cache_hits_total", "Prompt tokens found in the prefix cache."
        ),
        "preemptions": counter("num_preemptions_total", "Requests preempted (by recompute)."),
    }
    return SchedulerMetrics(model_name, families)


# ---- worker ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerMetrics:
    step_time: Histogram

    def observe_step(self, seconds: float) -> None:
        """Once per executed step: forward pass and sampling, in seconds."""
        self.step_time.observe(seconds)


def worker_metrics(
    registry: CollectorRegistry, model_name: str, worker_id: str
) -> WorkerMetrics:
    family = Histogram(
        PREFIX + "worker_step_seconds",
        "Worker step time: forward pass and sampling, in seconds.",
        [MODEL_LABEL, WORKER_LABEL], buckets=STEP_BUCKETS, registry=registry,
    )
    return WorkerMetrics(step_time=family.labels(model_name, worker_id))


# ---- exposition ------------------------------------------------------------------------------
@dataclass
class MetricsServer:
    """A running /metrics endpoint (``port`` -1: none was started; ``stop`` is then a no-op)."""

    port: int
    _httpd: WSGIServer | None = None
    _thread: threading.Thread | None = None

    def stop(self) -> None:
        """Stop serving and release the port; safe to call twice."""
        if self._httpd is None or self._thread is None:
            return
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()
        self._httpd = self._thread = None


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "127.0.0.1") -> MetricsServer:
    """Serve ``registry`` as Prometheus text on ``http://host:port/metrics`` from a daemon thread.

    ``port`` 0 picks a free port (read it from ``.port``); -1 serves nothing. Scrapes run on
    their own thread and only read the metrics, so the service's event loop never waits on them.
    """
    if port < 0:
        return MetricsServer(-1)
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(httpd.server_port, httpd, thread)
