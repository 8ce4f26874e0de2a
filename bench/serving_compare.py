"""pagewire against transformers ``generate`` on the same requests: the side-by-side table.

Runs after the pagewire stack has stopped, so the baseline has the machine to itself, with the
same ``--threads`` the worker had. Every mode counts the output tokens the requests asked for over
its own wall time; ratios are pagewire's output tokens/s over each baseline's.
"""

from __future__ import annotations

import argparse

from hf_baseline import HfRun, run_baseline
from serving_data import BenchRequest

GOAL_RATIO = 3.0  # issue 7: pagewire >= 3x transformers' best output tokens/s


def compare(
    args: argparse.Namespace, requests: list[BenchRequest], pagewire_point: dict
) -> dict[str, object]:
    """Run the baseline modes, print the table, return it as JSON-ready rows plus the verdict."""
    sizes = [int(b) for b in args.hf_batch_sizes.split(",") if b.strip()]
    hf_runs = run_baseline(args.model, requests, sizes, args.threads, args.hf_single_limit,
                           progress=not args.no_progress, repeats=args.repeats, dtype=args.dtype)
    rows = [pagewire_row(pagewire_point)] + [hf_row(r) for r in hf_runs]
    pw_tps = rows[0]["output_throughput"]
    for row in rows:
        row["pagewire_ratio"] = pw_tps / row["output_throughput"] if row["output_throughput"] else 0.0
    best = max(rows[1:], key=lambda r: r["output_throughput"]) if hf_runs else None
    verdict = {
        "best_hf_mode": best["mode"] if best else "",
        "ratio_vs_best_hf": best["pagewire_ratio"] if best else 0.0,
        "goal_ratio": GOAL_RATIO,
        "goal_met": bool(best and best["pagewire_ratio"] >= GOAL_RATIO),
    }
    print(format_table(rows, verdict, args.threads, args.dtype))
    return {"rows": rows, **verdict}


def pagewire_row(point: dict) -> dict[str, object]:
    s = point["summary"]
    conc = point["max_concurrency"] or "all"
    return {"mode": f"pagewire (rate {point['request_rate']}, conc {conc})",
            "requests": s["completed"], "output_tokens": s["total_output_tokens"],
            "generated_tokens": s["total_output_tokens"], "wall_s": s["duration_s"],
            "output_throughput": s["output_throughput"], "failed": s["failed"],
            "throughput_runs": sorted(point["output_throughput_runs"])}


def hf_row(run: HfRun) -> dict[str, object]:
    return {"mode": f"transformers {run.mode}", "requests": run.requests,
            "output_tokens": run.output_tokens, "generated_tokens": run.generated_tokens,
            "wall_s": run.wall_s, "output_throughput": run.output_throughput, "failed": 0,
            "throughput_runs": run.throughput_runs}


def format_table(rows: list[dict], verdict: dict, threads: int, dtype: str = "float32") -> str:
    """Markdown, so it can be pasted into docs/BENCHMARKS.md as printed."""
    lines = [
        f"\nSide by side ({dtype}, torch threads {threads}; output tok/s = requested output tokens / wall s;"
        " median run shown, all runs' tok/s in the last column)",
        "",
        "| mode | requests | output tokens | generated tokens | wall s | output tok/s | pagewire × "
        "| runs tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['requests']} | {r['output_tokens']} | {r['generated_tokens']} | "
            f"{r['wall_s']:.2f} | {r['output_throughput']:.1f} | {r['pagewire_ratio']:.2f} | "
            + ", ".join(f"{t:.1f}" for t in r["throughput_runs"]) + " |"
        )
    met = "met" if verdict["goal_met"] else "NOT met"
    lines.append(
        f"\npagewire / best transformers ({verdict['best_hf_mode']}): "
        f"{verdict['ratio_vs_best_hf']:.2f}x (goal {verdict['goal_ratio']:.0f}x: {met})"
    )
    return "\n".join(lines)
