"""Smoke test of the fault matrix: a few short streams through the fault-free run and a worker
SIGKILL; the table must say what the benchmark exists to show."""

from __future__ import annotations

import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH_DIR))  # appended: bench/ scripts must not shadow packages

import faults  # noqa: E402


def test_fault_matrix_reports_identical_streams_blocks_and_gauges_back(tiny_model: Path) -> None:
    rows = faults.run(["--model", str(tiny_model), "--streams", "4", "--tokens", "80",
                       "--scenarios", "worker-kill", "--hang-s", "60"])
    assert [r["scenario"] for r in rows] == ["none", "worker-kill"]
    for row in rows:
        assert (row["identical"], row["wrong"], row["failed"], row["hung"]) == (4, 0, 0, 0), row
        assert row["blocks_back"] and row["gauges_back"], row
        assert row["stall_s"] >= 0
