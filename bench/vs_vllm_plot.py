"""The bench's PNG: per-workload ratios, and (when the sweep ran) cost and speed against load.

Left: pagewire / vLLM for output tok/s and TPOT p50 per workload and dtype (median, bars for the
range over rounds; the dashed line is parity). Right, for the concurrency sweep: output tok/s
and total CPU-ms per output token of each server against the number of streams.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 (must follow the backend choice)
from vs_vllm_report import SERVERS, cpu_per_token, summarize  # noqa: E402

RATIO_METRICS = (("output_throughput", "out tok/s"), ("p50_tpot_ms", "TPOT p50"))


def _ratio_panel(ax, report: dict) -> None:
    labels, series = [], {m: ([], [], []) for m, _ in RATIO_METRICS}
    for dtype, results in report["results"].items():
        for name, record in results.items():
            if record["workload"]["group"] == "sweep":
                continue
            labels.append(f"{dtype}: {name}")
            s = summarize(record)
            for m, _ in RATIO_METRICS:
                r = s[m]["ratio"]
                series[m][0].append(r["median"])
                series[m][1].append(r["median"] - r["min"])
                series[m][2].append(r["max"] - r["median"])
    ys = range(len(labels))
    h = 0.38
    for i, (m, title) in enumerate(RATIO_METRICS):
        med, lo, hi = series[m]
        ax.barh([y + (i - 0.5) * h for y in ys], med, h, xerr=[lo, hi], label=title, capsize=2)
    ax.axvline(1.0, color="k", ls="--", lw=1)
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("pagewire relative to vLLM (> 1: pagewire better)")
    ax.legend(fontsize=8)
    ax.grid(axis="x", alpha=0.3)


def _sweep_panels(ax_tps, ax_cpu, report: dict) -> None:
    for dtype, results in report["results"].items():
        sweep = [r for r in results.values() if r["workload"]["group"] == "sweep"]
        if not sweep:
            continue
        conc = [r["workload"]["max_concurrency"] for r in sweep]
        for server, style in zip(SERVERS, ("-o", "--s"), strict=True):
            tps = [summarize(r)["output_throughput"][server]["median"] for r in sweep]
            cpu = [cpu_per_token(r, server)["total"]["median"] for r in sweep]
            ax_tps.plot(conc, tps, style, label=f"{server} {dtype}")
            ax_cpu.plot(conc, cpu, style, label=f"{server} {dtype}")
    for ax, title in ((ax_tps, "output tok/s"), (ax_cpu, "CPU ms per output token (all processes)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent streams")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)


def plot(report: dict, path: Path) -> Path:
    has_sweep = any(r["workload"]["group"] == "sweep"
                    for results in report["results"].values() for r in results.values())
    fig, axes = plt.subplots(1, 3 if has_sweep else 1, figsize=(20 if has_sweep else 10, 6),
                             squeeze=False)
    _ratio_panel(axes[0][0], report)
    if has_sweep:
        _sweep_panels(axes[0][1], axes[0][2], report)
    fig.suptitle(f"pagewire vs {report['environment']['vllm']} (CPU backend), "
                 f"{report['environment']['date']}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
