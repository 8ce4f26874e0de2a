"""Medians, ranges and ratios over alternating rounds, as Markdown tables (pure: no servers).

A workload's record is ``{"workload": {...}, "rounds": [round, ...]}``; a round holds each
server's metrics (``vs_vllm_workloads.metrics``) and each server's CPU-seconds by process role.
Rounds pair the two servers, so a ratio is taken per round, then its median and range are
reported: on a shared machine a slow spell hits both runs of a round alike more often than it hits
all runs of one server. Every ratio reads as pagewire's speed relative to vLLM's (> 1: pagewire is
better): throughputs are pagewire / vLLM, latencies vLLM / pagewire.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Sequence

SERVERS = ("pagewire", "vllm")
COLUMNS = (  # (metric key, column title)
    ("output_throughput", "out tok/s"), ("request_throughput", "req/s"),
    ("p50_ttft_ms", "TTFT p50"), ("p99_ttft_ms", "TTFT p99"),
    ("p50_tpot_ms", "TPOT p50"), ("p99_tpot_ms", "TPOT p99"),
    ("p50_itl_ms", "ITL p50"), ("p99_itl_ms", "ITL p99"),
)
HIGHER_IS_BETTER = {"output_throughput", "request_throughput"}


def speed_ratio(metric: str, pagewire: float, vllm: float) -> float:
    """pagewire relative to vLLM, > 1 when pagewire is better; nan when undefined."""
    num, den = (pagewire, vllm) if metric in HIGHER_IS_BETTER else (vllm, pagewire)
    return num / den if den > 0 else float("nan")


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, min and max (nan for none)."""
    vals = [v for v in values if v == v]
    if not vals:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals), "n": len(vals)}


def summarize(record: dict) -> dict[str, dict]:
    """Per metric: each server's spread and the per-round ratio's spread."""
    rounds = record["rounds"]
    out = {}
    for key, _ in COLUMNS:
        out[key] = {s: spread([r[s][key] for r in rounds]) for s in SERVERS}
        out[key]["ratio"] = spread([speed_ratio(key, r["pagewire"][key], r["vllm"][key])
                                    for r in rounds])
    return out


def fmt(x: float) -> str:
    if x != x:
        return "–"
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def fmt_spread(s: dict, digits: str = "") -> str:
    f = (lambda x: f"{x:{digits}}") if digits else fmt
    if s["n"] <= 1:
        return f(s["median"]) if s["n"] else "–"
    return f"{f(s['median'])} ({f(s['min'])}–{f(s['max'])})"


def other_jobs_share(record: dict, cores: int) -> dict:
    """Spread over all runs of the CPU other jobs used, in % of the machine, while a run went."""
    return spread([100 * r["other_jobs_cpu_s"][s] / (max(r[s]["client_wall_s"], 1e-9) * cores)
                   for r in record["rounds"] for s in SERVERS])


def quiet_rounds(results: dict[str, dict], below_pct: float, cores: int = 0) -> dict[str, dict]:
    """Only the rounds in which other jobs used under ``below_pct`` % of the machine during both
    servers' runs; workloads left with none are dropped. On a shared machine the servers do not
    suffer contention alike (vLLM's threads, bound to every core, lose more), so a ratio from a
    contended round says more about the neighbours than about either server."""
    cores = cores or os.cpu_count() or 1

    def quiet(r: dict) -> bool:
        return all(100 * r["other_jobs_cpu_s"][s] / (max(r[s]["client_wall_s"], 1e-9) * cores)
                   < below_pct for s in SERVERS)

    out = {}
    for name, rec in results.items():
        kept = [r for r in rec["rounds"] if quiet(r)]
        if kept:
            out[name] = rec | {"rounds": kept}
    return out


def ratio_table(results: dict[str, dict], cores: int = 0) -> str:
    """One row per workload: the per-round ratio of every metric, median (min–max); the last
    column is how busy other jobs kept the machine meanwhile (% of all cores)."""
    cores = cores or os.cpu_count() or 1
    head = "| workload | rounds | " + " | ".join(t for _, t in COLUMNS) + " | other jobs % |"
    lines = [head, "|---|---:|" + "---:|" * (len(COLUMNS) + 1)]
    for name, record in results.items():
        s = summarize(record)
        cells = [fmt_spread(s[k]["ratio"], ".2f") for k, _ in COLUMNS]
        cells.append(fmt_spread(other_jobs_share(record, cores), ".0f"))
        lines.append(f"| {name} | {len(record['rounds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def absolute_table(results: dict[str, dict]) -> str:
    """One row per workload and server: medians (output tok/s with its range); latencies in ms."""
    head = "| workload | server | " + " | ".join(t for _, t in COLUMNS) + " |"
    lines = [head, "|---|---|" + "---:|" * len(COLUMNS)]
    for name, record in results.items():
        s = summarize(record)
        for server in SERVERS:
            cells = [fmt_spread(s[k][server]) if k == "output_throughput"
                     else fmt(s[k][server]["median"]) for k, _ in COLUMNS]
            lines.append(f"| {name} | {server} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SECOND_COLUMNS = (("output_throughput", "out tok/s"), ("p50_ttft_ms", "TTFT p50"),
                  ("p50_tpot_ms", "TPOT p50"), ("p50_itl_ms", "ITL p50"), ("p99_itl_ms", "ITL p99"))


def second_opinion(results: dict[str, dict]) -> dict[str, dict]:
    """The workloads pagewire's own client also ran, as records of its figures (its rounds)."""
    out = {}
    for name, rec in results.items():
        rounds = [r["second_opinion"] for r in rec["rounds"] if "second_opinion" in r]
        if rounds:
            out[name] = {"rounds": rounds}
    return out


def second_opinion_table(results: dict[str, dict]) -> str:
    """Per workload both clients ran: each client's per-round ratios, median (min–max)."""
    head = "| workload | client | rounds | " + " | ".join(t for _, t in SECOND_COLUMNS) + " |"
    lines = [head, "|---|---|---:|" + "---:|" * len(SECOND_COLUMNS)]
    for name, mine in second_opinion(results).items():
        for client, record in (("vllm bench serve", results[name]), ("bench/serving.py", mine)):
            s = summarize(record)
            cells = [fmt_spread(s[k]["ratio"], ".2f") for k, _ in SECOND_COLUMNS]
            lines.append(f"| {name} | {client} | {len(record['rounds'])} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


PHASES = (("last_first_token_s", "prompts: last first token (s)"),
          ("after_last_first_s", "decodes after it (s)"), ("duration_s", "whole run (s)"))


def phases(results: dict[str, dict]) -> dict[str, dict]:
    """The all-at-once workloads whose every round has both servers' per-request TTFTs."""
    return {name: rec for name, rec in results.items()
            if rec["workload"]["request_rate"] == "inf" and not rec["workload"]["max_concurrency"]
            and all(PHASES[0][0] in r[s] for r in rec["rounds"] for s in SERVERS)}


def phase_table(results: dict[str, dict]) -> str:
    """Where an all-at-once run's time goes, per server: until the last request's first token
    (the prompts, with the decodes that ran beside them), and after it; medians over rounds and
    vLLM / pagewire per round (> 1: pagewire is quicker)."""
    head = "| workload | phase | pagewire | vLLM | vLLM / pagewire |"
    lines = [head, "|---|---|---:|---:|---:|"]
    for name, rec in phases(results).items():
        for key, title in PHASES:
            per = {s: spread([r[s][key] for r in rec["rounds"]]) for s in SERVERS}
            ratio = spread([r["vllm"][key] / r["pagewire"][key] for r in rec["rounds"]
                            if r["pagewire"][key] > 0])
            lines.append(f"| {name} | {title} | {fmt_spread(per['pagewire'], '.2f')} | "
                         f"{fmt_spread(per['vllm'], '.2f')} | {fmt_spread(ratio, '.2f')} |")
    return "\n".join(lines)


def cpu_per_token(record: dict, server: str) -> dict[str, dict]:
    """Process role -> spread over rounds of CPU-ms per output token (and ``total``)."""
    roles = sorted({role for r in record["rounds"] for role in r["cpu"][server]})
    per: dict[str, list[float]] = {role: [] for role in [*roles, "total"]}
    for r in record["rounds"]:
        tokens = r[server]["total_output_tokens"]
        cpu = r["cpu"][server]
        for role in roles:
            per[role].append(1e3 * cpu.get(role, 0.0) / tokens)
        per["total"].append(1e3 * sum(cpu.values()) / tokens)
        per.setdefault("cores", []).append(sum(cpu.values()) / r[server]["duration_s"])
    return {role: spread(v) for role, v in per.items()}


def cpu_table(results: dict[str, dict], names: Sequence[str]) -> str:
    """CPU-ms per output token of every process, for the named workloads (both servers)."""
    lines = ["| workload | server | process | CPU ms / output token | share (total: CPU-s / s) |",
             "|---|---|---|---:|---:|"]
    for name in names:
        if name not in results:
            continue
        for server in SERVERS:
            per = cpu_per_token(results[name], server)
            total, cores = per["total"]["median"], per.pop("cores")
            for role, s in sorted(per.items(), key=lambda kv: (kv[0] == "total", -kv[1]["median"])):
                share = (f"{fmt_spread(cores, '.2f')} cores busy" if role == "total"
                         else f"{100 * s['median'] / total:.0f} %")
                label = f"**{role}**" if role == "total" else role
                lines.append(f"| {name} | {server} | {label} | {fmt_spread(s, '.3f')} | {share} |")
    return "\n".join(lines)


def machine_note(results: dict[str, dict], cores: int = 0) -> str:
    """What else used the cores during the runs: the idle server, the client, other jobs."""
    cores = cores or os.cpu_count() or 1
    idle: dict[str, list[float]] = {s: [] for s in SERVERS}
    client: list[float] = []
    for rec in results.values():
        for r in rec["rounds"]:
            for server in SERVERS:
                other = next(s for s in SERVERS if s != server)
                # Measured over the client's whole life (its start-up too), not just the run.
                idle[server].append(100 * sum(r["idle_cpu"][server].values())
                                    / max(r[other]["client_wall_s"], 1e-9))
                client.append(r["client_cpu_s"][server])
    o = spread([v for rec in results.values() for v in [other_jobs_share(rec, cores)["median"]]])
    return (f"idle server while the other ran: pagewire {fmt(spread(idle['pagewire'])['median'])} %,"
            f" vLLM {fmt(spread(idle['vllm'])['median'])} % of a core; client (vllm bench serve) "
            f"{fmt(spread(client)['median'])} CPU-s per run; other jobs on the machine: median "
            f"{fmt(o['median'])} % of all {cores} cores (workload medians {fmt(o['min'])}–{fmt(o['max'])} %)")
