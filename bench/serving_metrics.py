"""Turn request records into vLLM's serving metrics.

Definitions (as vLLM's ``benchmark_serving`` uses them):

- TTFT: arrival of the first token minus the send time.
- TPOT: (end-to-end latency − TTFT) / (output tokens − 1), per request; requests with one output
  token have none.
- ITL: the gaps between successive token arrivals, pooled over all requests. pagewire may deliver
  several tokens in one message; such a message's gap is split evenly over its tokens, and the
  extra tokens of the first message get a gap of 0, so every request contributes exactly
  output tokens − 1 ITL values and they sum to (last token − first token).
- E2E latency: end of the stream minus the send time.
- Request throughput and output tokens/s: completed requests and their output tokens over the
  run's wall time.

Percentiles are numpy's linear interpolation; latencies are reported in milliseconds.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from serving_client import RequestRecord, RunResult

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


def token_gaps(rec: RequestRecord) -> list[float]:
    """Per-token inter-token latencies in seconds (output tokens − 1 values)."""
    if not rec.chunks:
        return []
    first_t, first_n = rec.chunks[0]
    gaps = [0.0] * (first_n - 1)
    prev = first_t
    for t, n in rec.chunks[1:]:
        gaps.extend([(t - prev) / n] * n)
        prev = t
    return gaps


def ttft_s(rec: RequestRecord) -> float:
    return rec.chunks[0][0] - rec.send_s


def tpot_s(rec: RequestRecord) -> float | None:
    n = rec.output_len
    return (rec.end_s - rec.send_s - ttft_s(rec)) / (n - 1) if n > 1 else None


def distribution_ms(values: Sequence[float]) -> dict[str, float]:
    """Mean, median and p50/p90/p99 of seconds values, in ms; zeros when there are none."""
    if not values:
        return {"mean": 0.0, "median": 0.0, **{f"p{p}": 0.0 for p in PERCENTILES}}
    arr = np.asarray(values, dtype=np.float64) * 1e3
    out = {"mean": float(arr.mean()), "median": float(np.median(arr))}
    out.update({f"p{p}": float(np.percentile(arr, p)) for p in PERCENTILES})
    return out


def summarize(run: RunResult) -> dict[str, object]:
    """The run's metrics as a JSON-ready dict; failed or short requests are counted, not timed."""
    done = [r for r in run.records if r.ok and r.chunks]
    out_tokens = sum(r.output_len for r in done)
    tpots = [t for t in (tpot_s(r) for r in done) if t is not None]
    wall = run.wall_s if run.wall_s > 0 else float("nan")
    summary: dict[str, object] = {
        "completed": len(done),
        "failed": len(run.records) - len(done),
        "errors": sorted({r.error for r in run.records if r.error})[:5],
        "duration_s": run.wall_s,
        "total_input_tokens": sum(r.input_len for r in done),
        "total_cached_tokens": sum(r.cached_tokens for r in done),
        "total_output_tokens": out_tokens,
        "request_throughput": len(done) / wall,
        "output_throughput": out_tokens / wall,
        "ttft_ms": distribution_ms([ttft_s(r) for r in done]),
        "tpot_ms": distribution_ms(tpots),
        "itl_ms": distribution_ms([g for r in done for g in token_gaps(r)]),
        "e2el_ms": distribution_ms([r.end_s - r.send_s for r in done]),
    }
    return summary


def format_summary(title: str, s: dict[str, object]) -> str:
    """A vLLM-style block: counts and throughput, then one latency line per metric."""
    lines = [
        f"=== {title} ===",
        f"completed {s['completed']}  failed {s['failed']}  duration {s['duration_s']:.2f} s",
        f"request throughput {s['request_throughput']:.2f} req/s   "
        f"output {s['output_throughput']:.1f} tok/s   "
        f"(input {s['total_input_tokens']} / output {s['total_output_tokens']} tokens)",
        f"{'ms':<6}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name in LATENCY_METRICS:
        d = s[f"{name}_ms"]
        assert isinstance(d, dict)
        lines.append(
            f"{name.upper():<6}{d['mean']:>10.1f}{d['p50']:>10.1f}{d['p90']:>10.1f}{d['p99']:>10.1f}"
        )
    return "\n".join(lines)
