"""The pagewire-vs-vLLM bench's pure parts: flags, workloads, the client's command line, ratios,
medians and ranges, CPU accounting. No vLLM, no servers: the bench itself is run by hand."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
sys.path.append(str(BENCH_DIR))

import vllm_env  # noqa: E402
import vs_vllm  # noqa: E402
import vs_vllm_cpu as cpu  # noqa: E402
import vs_vllm_report as rep  # noqa: E402
import vs_vllm_workloads as wl  # noqa: E402


def metrics(tps: float, tpot: float, tokens: float = 1000.0) -> dict[str, float]:
    m = {k: 10.0 for k in wl.METRIC_KEYS}
    m.update(output_throughput=tps, request_throughput=tps / 100, p50_tpot_ms=tpot,
             total_output_tokens=tokens, duration_s=tokens / tps, client_wall_s=tokens / tps + 5)
    return m


def record(pairs: list[tuple[float, float]], cpu_s: dict[str, dict[str, float]] | None = None) -> dict:
    """Rounds with pagewire / vLLM output tok/s as given (TPOT: 1000 / tok/s)."""
    cpu_s = cpu_s or {"pagewire": {"worker": 1.0}, "vllm": {"Worker": 1.0}}
    rounds = [{"pagewire": metrics(p, 1e3 / p), "vllm": metrics(v, 1e3 / v), "cpu": cpu_s,
               "idle_cpu": {"pagewire": {"worker": 0.1}, "vllm": {"Worker": 0.1}},
               "client_cpu_s": {"pagewire": 6.0, "vllm": 6.0},
               "other_jobs_cpu_s": {"pagewire": 10.0, "vllm": 10.0}} for p, v in pairs]
    return {"workload": vars(wl.BURST) | {"request_rate": "inf"}, "rounds": rounds}


def test_quick_defaults_to_one_float32_round_of_two_workloads() -> None:
    args = vs_vllm.resolve(vs_vllm.build_parser().parse_args(["--quick"]))
    assert (args.dtypes, args.rounds) == (["float32"], 1)
    assert [w.name for w in wl.workloads(True, "float32")] == [wl.BURST.name, wl.SINGLE.name]


def test_full_run_has_the_issue_rows_and_the_concurrency_sweep() -> None:
    args = vs_vllm.resolve(vs_vllm.build_parser().parse_args(["--rates", "1,2"]))
    assert args.dtypes == ["float32", "bfloat16"] and args.rounds == 3 and args.rates == [1.0, 2.0]
    loads = wl.workloads(False, "bfloat16")
    assert [w.request_rate for w in loads if w.group == "poisson"] == [4.0, 8.0, 16.0]
    assert [w.max_concurrency for w in loads if w.group == "sweep"] == [1, 8, 32, 64, 128]
    assert {wl.BURST.name, wl.MIXED.name, wl.SINGLE.name} <= {w.name for w in loads}
    assert [w.request_rate for w in wl.workloads(False, "float32", (3.0,), ())
            if w.group == "poisson"] == [3.0]


def test_client_command_is_greedy_ignore_eos_with_the_workloads_lengths(tmp_path: Path) -> None:
    cmd = wl.bench_command(tmp_path, wl.MIXED, "http://127.0.0.1:1", "/m", "name", 5,
                           tmp_path / "r.json")
    flags = dict(zip(cmd, cmd[1:], strict=False))
    assert cmd[1] == str(vllm_env.CLI_WRAPPER) and cmd[2:4] == ["bench", "serve"]
    assert "--ignore-eos" in cmd and flags["--temperature"] == "0"
    assert json.loads(flags["--random-range-ratio"]) == {"input": 0.88, "output": 0.6}
    assert (flags["--random-input-len"], flags["--random-output-len"]) == ("272", "80")
    assert flags["--request-rate"] == "inf" and "--max-concurrency" not in cmd
    assert "--save-detailed" in cmd  # per-request TTFTs: the phase table
    single = wl.bench_command(tmp_path, wl.SINGLE, "u", "/m", "n", 5, tmp_path / "r.json")
    assert single[single.index("--max-concurrency") + 1] == "1"


def test_second_opinion_client_gets_the_workloads_lengths_rate_and_cap(tmp_path: Path) -> None:
    import serving

    cmd = wl.serving_command(wl.MIXED, "http://127.0.0.1:1", "/m", "name", 5, tmp_path / "r.json")
    args = serving.build_parser().parse_args(cmd[2:])
    assert cmd[1] == str(wl.SERVING)
    assert (args.openai_url, args.served_model_name, args.model) == ("http://127.0.0.1:1", "name", "/m")
    assert (args.num_requests, args.input_len, args.input_len_range) == (64, 272, 0.88)
    assert (args.output_len, args.output_len_range, args.seed) == (80, 0.6, 5)
    assert math.isinf(args.request_rate) and args.max_concurrency == 0
    sweep = serving.build_parser().parse_args(
        wl.serving_command(wl.sweep(32), "u", "/m", "n", 1, tmp_path / "r.json")[2:])
    assert (sweep.max_concurrency, sweep.num_requests, sweep.output_len_range) == (32, 32, 0.0)
    poisson = serving.build_parser().parse_args(
        wl.serving_command(wl.poisson(4.0), "u", "/m", "n", 1, tmp_path / "r.json")[2:])
    assert poisson.request_rate == 4.0


def test_second_opinion_table_puts_both_clients_ratios_side_by_side() -> None:
    rec = record([(80, 100), (90, 100)])
    for r, (p, v) in zip(rec["rounds"], [(85, 100), (95, 100)], strict=True):
        r["second_opinion"] = {"pagewire": metrics(p, 1e3 / p), "vllm": metrics(v, 1e3 / v)}
    results = {wl.BURST.name: rec, wl.MIXED.name: record([(50, 100)])}
    assert list(rep.second_opinion(results)) == [wl.BURST.name]
    table = rep.second_opinion_table(results).splitlines()
    assert len(table) == 4 and wl.MIXED.name not in "".join(table)
    assert "| vllm bench serve | 2 | 0.85 (0.80–0.90) |" in table[2]
    assert "| bench/serving.py | 2 | 0.90 (0.85–0.95) |" in table[3]


def test_a_runs_phases_come_from_its_requests_ttfts() -> None:
    data = {k: 1.0 for k in wl.METRIC_KEYS} | {"total_output_tokens": 100, "duration": 9.0,
                                                "ttfts": [0.5, 4.0, 2.5]}
    m = wl.metrics(data)
    assert (m["last_first_token_s"], m["after_last_first_s"]) == (4.0, 5.0)
    assert "last_first_token_s" not in wl.metrics(data | {"ttfts": []})


def test_phase_table_splits_all_at_once_runs_at_the_last_first_token() -> None:
    def phased(rec: dict, split: list[tuple[float, float]]) -> dict:
        for r, (p, v) in zip(rec["rounds"], split, strict=True):
            r["pagewire"].update(last_first_token_s=p, after_last_first_s=r["pagewire"]["duration_s"] - p)
            r["vllm"].update(last_first_token_s=v, after_last_first_s=r["vllm"]["duration_s"] - v)
        return rec

    burst = phased(record([(100, 80), (100, 90)]), [(4.0, 5.0), (4.0, 4.4)])  # runs 10 / 12.5, 11.1 s
    poisson = phased(record([(100, 80)]), [(4.0, 5.0)])
    poisson["workload"] |= {"request_rate": "4.0"}
    no_ttfts = record([(100, 80)])
    results = {"burst": burst, "poisson": poisson, "old run": no_ttfts}
    assert list(rep.phases(results)) == ["burst"]
    table = rep.phase_table(results).splitlines()
    assert len(table) == 2 + len(rep.PHASES)
    assert table[2] == ("| burst | prompts: last first token (s) | 4.00 (4.00–4.00) | 4.70 (4.40–5.00)"
                        " | 1.18 (1.10–1.25) |")
    assert table[3].startswith("| burst | decodes after it (s) | 6.00 (6.00–6.00) | 7.11 (6.71–7.50) |")


def test_ratio_reads_as_pagewire_speed_for_throughput_and_latency() -> None:
    assert rep.speed_ratio("output_throughput", 50, 100) == 0.5
    assert rep.speed_ratio("p50_tpot_ms", 20, 10) == 0.5
    assert math.isnan(rep.speed_ratio("p50_tpot_ms", 0, 10))


def test_ratios_are_per_round_then_median_and_range() -> None:
    s = rep.summarize(record([(80, 100), (90, 100), (40, 50)]))
    r = s["output_throughput"]["ratio"]
    assert (r["median"], r["min"], r["max"], r["n"]) == (0.8, 0.8, 0.9, 3)
    assert s["output_throughput"]["vllm"]["median"] == 100
    assert s["p50_tpot_ms"]["ratio"]["median"] == pytest.approx(0.8)
    table = rep.ratio_table({"burst": record([(80, 100), (90, 100), (40, 50)])})
    assert "| burst | 3 | 0.80 (0.80–0.90) |" in table


def test_cpu_table_is_ms_per_output_token_per_process() -> None:
    cpu_s = {"pagewire": {"worker": 3.0, "router": 1.0}, "vllm": {"Worker": 2.0}}
    per = rep.cpu_per_token(record([(100, 100)], cpu_s), "pagewire")
    assert per["worker"]["median"] == 3.0 and per["total"]["median"] == 4.0  # 1000 tokens
    table = rep.cpu_table({"burst": record([(100, 100)], cpu_s)}, ["burst", "absent"])
    assert "| burst | pagewire | worker | 3.000 | 75 % |" in table
    assert "| burst | vllm | **total** | 2.000 | 0.20 cores busy |" in table
    assert "other jobs" in rep.machine_note({"burst": record([(100, 100)])}, cores=2)


def test_cpu_accounting_reads_this_process_and_splits_by_role() -> None:
    pid = os.getpid()
    t0 = cpu.cpu_seconds(pid)
    sum(i * i for i in range(2_000_000))
    assert cpu.cpu_seconds(pid) > t0
    assert cpu.cpu_seconds(2**22 + 12345) == 0.0  # no such process
    snap = cpu.snapshot({"bench": pid})
    assert snap[pid][0] == "bench"
    before = {pid: ("bench", 1.0)}
    after = {pid: ("bench", 3.0), 7: ("Worker", 0.5)}
    assert cpu.cpu_by_role(before, after) == {"bench": 2.0, "Worker": 0.5}
    assert cpu.machine_busy_seconds() > 0


def test_venv_key_follows_the_pinned_versions(monkeypatch: pytest.MonkeyPatch) -> None:
    key = vllm_env.venv_key("3.11")
    assert key == vllm_env.venv_key("3.11") and key != vllm_env.venv_key("3.12")
    monkeypatch.setattr(vllm_env, "VLLM_VERSION", "0.0.1")
    assert vllm_env.venv_key("3.11") != key


def test_quiet_rounds_keep_only_rounds_without_other_jobs() -> None:
    rec = record([(80, 100), (90, 100), (40, 50)])
    rec["rounds"][1]["other_jobs_cpu_s"] = {"pagewire": 0.0, "vllm": 0.01}
    quiet = rep.quiet_rounds({"burst": rec, "busy": record([(100, 100)])}, below_pct=5, cores=2)
    assert list(quiet) == ["burst"] and len(quiet["burst"]["rounds"]) == 1
    assert rep.summarize(quiet["burst"])["output_throughput"]["ratio"]["median"] == 0.9
