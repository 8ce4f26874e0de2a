"""PNG plots for the sweeps: latency against request rate, throughput against concurrency.

matplotlib's Agg backend is selected before pyplot is imported, so plotting works on a headless
machine and never tries to open a window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (must follow the backend choice)

# Burst (rate inf) has no place on a numeric axis; it is drawn one step past the largest rate.
BURST_LABEL = "burst"


def _rate_positions(rates: Sequence[float]) -> tuple[list[float], list[str]]:
    finite = [r for r in rates if not math.isinf(r)]
    burst_x = (max(finite) * 2) if finite else 1.0
    xs = [burst_x if math.isinf(r) else r for r in rates]
    labels = [BURST_LABEL if math.isinf(r) else f"{r:g}" for r in rates]
    return xs, labels


def plot_latency_vs_rate(points: list[dict], path: Path) -> Path:
    """TTFT, TPOT and E2E latency (p50 solid, p99 dashed) for each request rate."""
    rates = [float(p["request_rate"]) for p in points]
    xs, labels = _rate_positions(rates)
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for ax, metric, title in zip(
        axes, ("ttft_ms", "tpot_ms", "e2el_ms"), ("TTFT", "TPOT", "E2E latency"), strict=True
    ):
        for pct, style in (("p50", "-o"), ("p99", "--s")):
            ax.plot(xs, [p["summary"][metric][pct] for p in points], style, label=pct)
        ax.set_title(f"{title} (ms)")
        ax.set_xlabel("request rate (req/s)")
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_throughput_vs_concurrency(points: list[dict], path: Path) -> Path:
    """Output tokens/s and requests/s for each concurrency cap."""
    conc = [int(p["max_concurrency"]) for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(conc, [p["summary"]["output_throughput"] for p in points], "-o", label="output tok/s")
    ax.set_xlabel("max concurrency")
    ax.set_ylabel("output tokens/s")
    ax.set_xscale("log", base=2)
    ax.set_xticks(conc, [str(c) for c in conc])
    ax.grid(alpha=0.3)
    twin = ax.twinx()
    twin.plot(conc, [p["summary"]["request_throughput"] for p in points], "--s", color="tab:orange",
              label="req/s")
    twin.set_ylabel("requests/s")
    fig.legend(loc="upper left", bbox_to_anchor=(0.12, 0.88))
    ax.set_title("Throughput vs concurrency")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
