"""Smoke test of the load benchmark: a few streams for a few seconds, then a small overload.

Checks that the report is consistent and says what the benchmark exists to show: no errors
under sustained load, refusals (RESOURCE_EXHAUSTED) past the queue bound with the rest complete,
RSS sampled for every process, and the KV pool whole after each phase.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH_DIR))  # appended: bench/ scripts must not shadow packages

import load  # noqa: E402

MAX_TOKENS, BURST, QUEUE, RUNNING = 4, 40, 4, 4


def test_load_bench_reports_clean_sustained_load_and_refusals_past_the_queue(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "load.json"
    report = load.run([
        "--model", str(tiny_model), "--streams", "8", "--duration", "2", "--channels", "2",
        "--max-tokens", str(MAX_TOKENS), "--sample-s", "0.5", "--burst", str(BURST),
        "--burst-max-tokens", "32", "--queue-max", str(QUEUE),
        "--queue-max-num-seqs", str(RUNNING), "--out", str(out),
    ])  # fmt: skip

    sustained = report["sustained"]
    assert sustained["statuses"] == {"OK": sustained["completed"]} and sustained["completed"] > 8
    assert sustained["tokens"] == MAX_TOKENS * sustained["completed"]
    assert sustained["short_completions"] == 0
    assert set(sustained["rss_mib"]) == {"router", "scheduler", "worker-0", "redis"}
    for rss in sustained["rss_mib"].values():
        assert 0 < rss["start"] <= rss["peak"] and rss["end"] <= rss["peak"]
    assert len(sustained["rss_samples"]) >= 3

    overload = report["overload"]
    statuses = overload["statuses"]
    assert set(statuses) == {"OK", "RESOURCE_EXHAUSTED"}, statuses
    assert statuses["OK"] + statuses["RESOURCE_EXHAUSTED"] == BURST
    # Everything past the running batch and the queue is refused (a request that finished
    # during the burst makes room for one more).
    assert statuses["RESOURCE_EXHAUSTED"] >= BURST - 2 * (QUEUE + RUNNING)
    assert overload["short_completions"] == 0

    for phase in (sustained, overload):
        assert phase["pool"]["ok"] and phase["pool"]["live_requests"] == 0, phase["pool"]
    assert json.loads(out.read_text())["overload"]["statuses"] == statuses
