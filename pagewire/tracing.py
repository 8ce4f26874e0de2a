"""OpenTelemetry tracing for every pagewire service: setup from OTEL_* variables, spans, context.

One trace per request: the router's span is the parent of the scheduler's and the worker's spans
for that request. One gRPC stream carries many requests between the tiers, so the W3C context
(``traceparent``, ``tracestate``) rides in each request's ``trace_context`` map field
(``SubmitRequest``, ``SequenceStep``); only the public API takes it from call metadata.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (otlp, console) or an OTLP endpoint
is set, unless ``OTEL_SDK_DISABLED=true``; otherwise every helper returns at its first line: no
span objects (``start_span`` hands back OTel's shared invalid span, whose methods do nothing),
no context lookups. The standard variables do the rest (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_EXPORTER_OTLP_*).

Spans are explicit objects, not "current span" magic: a request's span starts in one callback
and ends in another, and nothing here has to be entered and exited in the same task. Downstream
tiers only continue traces (``start_child``); they never start one for an untraced request.
The SDK tracer provider stays private to this module: OTel's global provider can be set only
once per process, and keeping ours private lets ``init_tracing`` / ``shutdown_tracing`` repeat
(tests). The SDK and exporter are imported only when tracing turns on.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.types import AttributeValue

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

log = logging.getLogger("pagewire.tracing")

# Span attribute names: one home, so every tier writes the same keys.
REQUEST_ID = "pagewire.request_id"
PROMPT_TOKENS = "pagewire.prompt_tokens"
OUTPUT_TOKENS = "pagewire.output_tokens"
CACHED_TOKENS = "pagewire.cached_tokens"
WORKER_ID = "pagewire.worker_id"
FINISH_REASON = "pagewire.finish_reason"

# Span names.
ROUTER_SPAN = "pagewire.router.generate"
SCHEDULER_QUEUE_SPAN = "pagewire.scheduler.queue"
SCHEDULER_SCHEDULE_SPAN = "pagewire.scheduler.schedule"
WORKER_STEP_SPAN = "pagewire.worker.step"

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

Attributes = Mapping[str, AttributeValue]

_PROPAGATOR = TraceContextTextMapPropagator()
_NO_BLOCK: AbstractContextManager[None] = contextlib.nullcontext()
_on = False
_provider: TracerProvider | None = None
_tracer: trace.Tracer | None = None
_atexit_registered = False


def enabled() -> bool:
    """Whether this process traces. Hot paths test it before building span attributes."""
    return _on


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The span exporters ``env`` asks for; empty means tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
            "OTEL_EXPORTER_OTLP_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [n.strip() for n in raw.split(",") if n.strip()]
    return [] if "none" in names else names


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter | None:
    if name == "otlp":
        protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"
        )
        if protocol != "grpc":
            log.warning("OTLP protocol %r is not supported; exporting over grpc", protocol)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()  # endpoint, headers, TLS, timeout: from OTEL_EXPORTER_OTLP_*
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    log.warning("unknown OTEL_TRACES_EXPORTER %r ignored (supported: otlp, console, none)", name)
    return None


def init_tracing(service_name: str) -> bool:
    """Configure tracing from the environment; returns whether it is on.

    ``service_name`` is the default ``service.name``; OTEL_SERVICE_NAME or a ``service.name`` in
    OTEL_RESOURCE_ATTRIBUTES wins over it. Spans are batched (BatchSpanProcessor) and flushed at
    interpreter exit; call :func:`shutdown_tracing` to flush earlier.
    """
    global _on, _provider, _tracer, _atexit_registered
    shutdown_tracing()
    exporters = [e for n in exporter_names(os.environ) if (e := _exporter(n, os.environ))]
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, OTELResourceDetector, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    configured = OTELResourceDetector().detect().attributes.get(SERVICE_NAME)
    resource = Resource.create({SERVICE_NAME: configured or service_name})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # sampler: OTEL_TRACES_*
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider, _tracer, _on = provider, provider.get_tracer("pagewire"), True
    if not _atexit_registered:
        atexit.register(shutdown_tracing)
        _atexit_registered = True
    return True


def flush(timeout_s: float = 5.0) -> bool:
    """Export every ended span now; False if that took longer than ``timeout_s``."""
    return _provider.force_flush(int(timeout_s * 1000)) if _provider is not None else True


def shutdown_tracing(timeout_s: float = 3.0) -> None:
    """Flush and stop exporting; tracing is off afterwards. Safe to call twice.

    Waits at most ``timeout_s``: with the collector down, the exporter's retries would hold a
    terminating service for up to OTEL_EXPORTER_OTLP_TIMEOUT (10 s); its spans are lost anyway.
    """
    global _on, _provider, _tracer
    provider, _provider, _tracer, _on = _provider, None, None, False
    if provider is None:
        return
    closing = threading.Thread(target=provider.shutdown, name="otel-shutdown", daemon=True)
    closing.start()
    closing.join(timeout_s)
    if closing.is_alive():
        log.warning("trace export did not finish within %.1f s; unsent spans are dropped", timeout_s)


# ---- context propagation -------------------------------------------------------------------
def inject(span: Span | None = None) -> dict[str, str]:
    """W3C context of ``span`` (default: the current span) for a ``trace_context`` field or
    call metadata; empty when tracing is off or there is no valid span."""
    if not _on:
        return {}
    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=context)
    return carrier


def extract(carrier: Mapping[str, str]) -> Context | None:
    """The parent context a ``trace_context`` map carries; None when off, empty or malformed."""
    if not _on or TRACEPARENT not in carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def extract_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> Context | None:
    """The parent context a client sent as gRPC metadata (``context.invocation_metadata()``)."""
    if not _on or not metadata:
        return None
    carrier = {
        k: v for k, v in metadata if k in (TRACEPARENT, TRACESTATE) and isinstance(v, str)
    }
    return extract(carrier)


# ---- spans ---------------------------------------------------------------------------------
def start_span(
    name: str,
    parent: Context | None = None,
    attributes: Attributes | None = None,
    start_time_ns: int | None = None,
    kind: SpanKind = SpanKind.INTERNAL,
) -> Span:
    """Start a span under ``parent`` (None: the current context, so usually a new trace).

    The span is not made current; end it with :func:`end_span` wherever the work ends.
    ``start_time_ns`` (``time.time_ns()`` clock) records a span after the fact, e.g. a queue
    wait measured from the request's arrival.
    """
    if not _on or _tracer is None:
        return INVALID_SPAN
    return _tracer.start_span(
        name, context=parent, kind=kind, attributes=attributes, start_time=start_time_ns
    )


def start_child(
    name: str,
    carrier: Mapping[str, str],
    attributes: Attributes | None = None,
    start_time_ns: int | None = None,
) -> Span:
    """A span continuing the trace in ``carrier``; a no-op span if the request is not traced."""
    if not _on:
        return INVALID_SPAN
    parent = extract(carrier)
    if parent is None:
        return INVALID_SPAN
    return start_span(name, parent, attributes, start_time_ns)


def wall_ns(monotonic_s: float) -> int:
    """The ``time.time_ns()`` instant of a ``time.monotonic()`` reading (e.g. a request's
    arrival), for ``start_time_ns`` of a span recorded after the fact."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def end_span(
    span: Span,
    attributes: Attributes | None = None,
    error: BaseException | None = None,
    end_time_ns: int | None = None,
) -> None:
    """Add the final attributes (output tokens, finish reason), mark an error, end the span."""
    if not _on or not span.is_recording():
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end(end_time=end_time_ns)


def use_span(span: Span) -> AbstractContextManager[object]:
    """Make ``span`` current for a block (log lines in it carry its trace id); does not end it."""
    if not _on:
        return _NO_BLOCK
    return trace.use_span(span, end_on_exit=False)


def current_ids() -> tuple[str, str] | None:
    """(trace id, span id) of the current span in hex, for log lines; None when there is none."""
    if not _on:
        return None
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


@contextlib.contextmanager
def span(
    name: str,
    parent: Context | None = None,
    attributes: Attributes | None = None,
) -> Iterator[Span]:
    """Start, make current and end a span around a block (for work that fits in one block)."""
    if not _on:
        yield INVALID_SPAN
        return
    s = start_span(name, parent, attributes)
    error: BaseException | None = None
    try:
        with trace.use_span(
            s, end_on_exit=False, record_exception=False, set_status_on_exception=False
        ):
            yield s
    except BaseException as e:
        error = e
        raise
    finally:
        end_span(s, error=error)
