"""Log lines as a person or a log collector reads them: text, JSON, request and trace ids."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from datetime import datetime

import pytest
from otlp_receiver import OtlpReceiver

from pagewire import logs, tracing

# serving.setup_logging's line: "<asctime> <service> <LEVEL> <logger>: <message>"
SERVING_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} router INFO router\.link: ")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in root.handlers[:]:
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)


def capture(fmt: str, level: str = "INFO") -> io.StringIO:
    out = io.StringIO()
    logs.setup_logging(level, "router", fmt, stream=out)
    return out


def lines(out: io.StringIO) -> list[str]:
    return out.getvalue().splitlines()


def test_text_line_is_servings_line_when_no_request_is_in_context() -> None:
    out = capture("text")
    logging.getLogger("router.link").info("scheduler %s is back", "s0")
    (line,) = lines(out)
    assert SERVING_LINE.match(line) and line.endswith(": scheduler s0 is back")


def test_text_line_ends_with_the_request_id() -> None:
    out = capture("text")
    with logs.request_context("req-7"):
        logging.getLogger("router.link").warning("slow")
    assert lines(out)[0].endswith("router.link: slow [request_id=req-7]")


def test_json_line_has_time_level_service_logger_message_and_request_id() -> None:
    out = capture("json")
    with logs.request_context("req-1"):
        logging.getLogger("router.link").info("submitted %d tokens", 12)
    (line,) = lines(out)
    obj = json.loads(line)
    assert obj == {
        "time": obj["time"], "level": "INFO", "service": "router", "logger": "router.link",
        "message": "submitted 12 tokens", "request_id": "req-1",
    }
    assert obj["time"].endswith("Z") and datetime.fromisoformat(obj["time"].replace("Z", "+00:00"))


def test_extra_request_id_wins_and_other_extras_become_fields() -> None:
    out = capture("json")
    with logs.request_context("outer"):
        logging.getLogger("s").info("x", extra={"request_id": "inner", "worker_id": "w3"})
    obj = json.loads(lines(out)[0])
    assert obj["request_id"] == "inner" and obj["worker_id"] == "w3"


def test_an_exception_is_one_field_of_one_line() -> None:
    out = capture("json")
    try:
        raise ValueError("bad block table")
    except ValueError:
        logging.getLogger("scheduler").exception("step failed")
    (line,) = lines(out)
    obj = json.loads(line)
    assert obj["level"] == "ERROR" and obj["message"] == "step failed"
    assert obj["exc_info"].startswith("Traceback") and "ValueError: bad block table" in obj["exc_info"]


def test_request_context_ends_with_its_block() -> None:
    with logs.request_context("r1"):
        assert logs.current_request_id() == "r1"
    assert logs.current_request_id() is None


def test_a_request_id_set_in_a_task_stays_in_that_task() -> None:
    out = capture("json")
    log = logging.getLogger("router")

    async def handler() -> None:  # as a gRPC handler task does for its request
        logs.set_request_id("req-9")
        await asyncio.sleep(0)
        log.info("in handler")

    async def main() -> None:
        await asyncio.create_task(handler())
        log.info("after handler")

    asyncio.run(main())
    first, second = (json.loads(line) for line in lines(out))
    assert first["request_id"] == "req-9"
    assert "request_id" not in second


def test_trace_and_span_ids_come_from_the_current_span(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("OTEL_")]:
        monkeypatch.delenv(key)
    out = capture("json")
    log = logging.getLogger("router")
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        assert tracing.init_tracing("router")
        try:
            span = tracing.start_span(tracing.ROUTER_SPAN)
            with tracing.use_span(span):
                log.info("inside")
            log.info("outside")
            tracing.end_span(span)
        finally:
            tracing.shutdown_tracing()
    inside, outside = (json.loads(line) for line in lines(out))
    ctx = span.get_span_context()
    assert (inside["trace_id"], inside["span_id"]) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert "trace_id" not in outside and "span_id" not in outside


def test_level_filters_and_an_unknown_format_is_refused() -> None:
    out = capture("text", level="warning")
    logging.getLogger("x").info("dropped")
    logging.getLogger("x").warning("kept")
    assert [line.rsplit(": ", 1)[1] for line in lines(out)] == ["kept"]
    with pytest.raises(ValueError, match="text, json"):
        logs.setup_logging("INFO", "router", "yaml")


def test_setting_up_again_replaces_only_its_own_handler() -> None:
    foreign = logging.NullHandler()
    logging.getLogger().addHandler(foreign)
    first, second = capture("text"), capture("json")
    logging.getLogger("x").warning("once")
    assert lines(first) == [] and json.loads(lines(second)[0])["message"] == "once"
    assert foreign in logging.getLogger().handlers
