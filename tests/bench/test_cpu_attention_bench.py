"""Smoke test of bench/cpu_attention.py: it runs as a script, checks every backend against the
reference before timing, and writes one row per backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_attention_bench_times_every_backend_it_checked(tmp_path: Path) -> None:
    out = tmp_path / "cpu_attention.json"
    subprocess.run(
        [sys.executable, "bench/cpu_attention.py", "--batch", "3", "--min-context", "1",
         "--max-context", "40", "--layers", "2", "--rounds", "2", "--out", str(out)],
        cwd=ROOT, check=True, capture_output=True,
    )
    report = json.loads(out.read_text())
    names = [r["backend"] for r in report["rows"]]
    assert names[:2] == ["reference", "torch (gather + SDPA)"]
    assert all(len(r["rounds_ms"]) == 2 and r["median_ms"] > 0 for r in report["rows"])
