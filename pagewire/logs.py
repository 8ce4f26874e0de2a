"""Logging for every pagewire service: text lines for people, JSON lines for log collectors.

Each line says which request it is about and, when tracing is on, which trace: the request id
comes from ``extra={"request_id": ...}`` or from a context variable set for a block
(:func:`request_context`) or for the rest of a task (:func:`set_request_id`); the trace and span
ids come from the current OpenTelemetry span (see ``tracing.use_span``). Looking them up happens
only for lines that are actually written, so a filtered-out debug call costs what it always did.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, TextIO

from pagewire import tracing

FORMATS = ("text", "json")

_request_id: ContextVar[str | None] = ContextVar("pagewire_request_id", default=None)
_STANDARD_ATTRS = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"}
)
_handler: logging.Handler | None = None  # the one setup_logging installed, replaced on a re-run


def set_request_id(request_id: str | None) -> None:
    """Tag every line logged from here to the end of the current asyncio task (each task has its
    own copy of the context, so the caller's lines are not tagged)."""
    _request_id.set(request_id)


def current_request_id() -> str | None:
    return _request_id.get()


@contextlib.contextmanager
def request_context(request_id: str | None) -> Iterator[None]:
    """Tag every line logged inside the block with ``request_id``."""
    token = _request_id.set(request_id)
    try:
        yield
    finally:
        _request_id.reset(token)


def line_context(record: logging.LogRecord) -> dict[str, str]:
    """request_id, trace_id and span_id of a log line, those that are known."""
    out: dict[str, str] = {}
    request_id = getattr(record, "request_id", None) or _request_id.get()
    if request_id:
        out["request_id"] = str(request_id)
    ids = tracing.current_ids()
    if ids is not None:
        out["trace_id"], out["span_id"] = ids
    return out


class TextFormatter(logging.Formatter):
    """``<time> <service> <LEVEL> <logger>: <message> [request_id=.. trace_id=..]``: the line
    ``serving.setup_logging`` writes, with the request's ids appended when known."""

    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ctx = line_context(record)
        if ctx:
            line += " [" + " ".join(f"{k}={v}" for k, v in ctx.items()) + "]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, service, logger, message, the ids
    of :func:`line_context`, exc_info (the formatted traceback) and any ``extra`` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, tz=timezone.utc)
        obj: dict[str, Any] = {
            "time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        obj.update(line_context(record))
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in obj:
                obj[key] = value
        if record.exc_info:
            obj["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            obj["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def setup_logging(
    level: str | int, service: str, fmt: str = "text", stream: TextIO | None = None
) -> logging.Logger:
    """Send the process's logs to ``stream`` (stderr) as ``fmt`` ("text" or "json") lines.

    A superset of ``serving.setup_logging(level, service)`` (same text line when no request is
    in context). Calling it again replaces the handler it installed, and only that one.
    """
    global _handler
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}; got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(TextFormatter(service) if fmt == "text" else JsonFormatter(service))
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    if isinstance(level, str):
        level = getattr(logging, level.upper(), logging.INFO)
    root.setLevel(level)
    return logging.getLogger(service)
