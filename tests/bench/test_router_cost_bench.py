"""Smoke test of the control plane's cost bench: a null worker, a scheduler, a router and Redis,
a few HTTP streams, and a report that counts every token and every process's CPU."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH_DIR))  # appended: bench/ scripts must not shadow packages

import router_cost  # noqa: E402

STREAMS, OUTPUT_LEN, ROUNDS = 8, 32, 2


def test_router_cost_counts_every_streamed_token_and_each_process_cpu(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "router_cost.json"
    report = router_cost.run([
        "--model", str(tiny_model), "--streams", str(STREAMS), "--input-len", "16",
        "--output-len", str(OUTPUT_LEN), "--step-ms", "2", "--rounds", str(ROUNDS),
        "--out", str(out),
    ])  # fmt: skip
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert len(report["rounds"]) == ROUNDS
    for row in report["rounds"]:
        assert row["tokens"] == STREAMS * OUTPUT_LEN  # checked against each stream's usage
        assert row["chunks"] >= STREAMS  # text chunks and each stream's usage chunk
        assert row["tokens_per_s"] > 0
        assert all(row[f"{role}_cpu_ms_per_token"] >= 0 for role in router_cost.ROLES)
    # the router did the work (/proc counts 10 ms ticks: ~30 ms a round here)
    assert report["summary"]["router_cpu_ms_per_token"]["max"] > 0
