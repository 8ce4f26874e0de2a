"""The bench's workloads and how ``vllm bench serve`` runs one against a server; and how
pagewire's own client (``bench/serving.py --openai-url``) runs one, the second opinion.

Every workload uses vLLM's random dataset (random token ids decoded to text, so both servers
tokenize the same prompt text), greedy sampling and ``ignore_eos`` (every request generates
exactly its output length). The round number goes into the dataset seed: each round draws new
prompts, so no round is served from the prefix cache of an earlier one, while both servers see
exactly the same prompts within a round.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import vllm_env

# What the table reports from each run; vLLM's result keys. (p50 is vLLM's ``--metric-percentiles``.)
METRIC_KEYS = ("output_throughput", "request_throughput", "p50_ttft_ms", "p99_ttft_ms",
               "p50_tpot_ms", "p99_tpot_ms", "p50_itl_ms", "p99_itl_ms")
# Poisson rates per dtype (req/s), as in issue 12: bfloat16 serves about twice as fast.
DEFAULT_RATES = {"float32": (2.0, 4.0, 8.0), "bfloat16": (4.0, 8.0, 16.0)}
SWEEP_CONCURRENCY = (1, 8, 32, 64, 128)


@dataclass(frozen=True)
class Workload:
    name: str
    num_prompts: int
    input_len: int
    output_len: int
    input_range: float = 0.0  # lengths uniform in [len*(1-r), len*(1+r)]
    output_range: float = 0.0
    request_rate: float = math.inf  # Poisson req/s; inf: all at once
    max_concurrency: int = 0  # 0: no cap
    group: str = "main"  # "main", "poisson" or "sweep" (the plot draws the sweep)


BURST = Workload("64 x (256 in, 128 out), all at once", 64, 256, 128)
MIXED = Workload("64 mixed (in 32-512, out 32-128), all at once", 64, 272, 80, 0.88, 0.6)
SINGLE = Workload("1 stream, 128 in / 128 out", 8, 128, 128, max_concurrency=1)


def poisson(rate: float) -> Workload:
    return Workload(f"Poisson {rate:g} req/s, 64 mixed", 64, 272, 80, 0.88, 0.6,
                    request_rate=rate, group="poisson")


def sweep(concurrency: int) -> Workload:
    """(256 in, 128 out) at a concurrency cap: one wave of requests (at least 8), so the sweep
    fits a 2-core machine's time; the cap keeps the server at that many streams from the start."""
    return Workload(f"concurrency {concurrency}, 256 in / 128 out", max(8, concurrency),
                    256, 128, max_concurrency=concurrency, group="sweep")


def workloads(quick: bool, dtype: str, rates: tuple[float, ...] = (), sweep_conc=SWEEP_CONCURRENCY
              ) -> list[Workload]:
    """``--quick``: the burst and the single stream; else the issue's rows and the sweep."""
    if quick:
        return [BURST, SINGLE]
    rows = [BURST, MIXED, SINGLE, *(poisson(r) for r in rates or DEFAULT_RATES[dtype])]
    return rows + [sweep(c) for c in sweep_conc]


def bench_command(venv: Path, w: Workload, base_url: str, model: str, served_name: str,
                  seed: int, result: Path) -> list[str]:
    """``vllm bench serve`` for one run of ``w``; the result JSON goes to ``result``."""
    ranges = json.dumps({"input": w.input_range, "output": w.output_range})
    args = [
        "bench", "serve", "--backend", "openai", "--base-url", base_url,
        "--endpoint", "/v1/completions", "--model", served_name, "--tokenizer", model,
        "--dataset-name", "random", "--random-input-len", str(w.input_len),
        "--random-output-len", str(w.output_len), "--random-range-ratio", ranges,
        "--num-prompts", str(w.num_prompts), "--request-rate", str(w.request_rate),
        "--ignore-eos", "--temperature", "0", "--seed", str(seed),
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(result.parent), "--result-filename", result.name,
        "--save-detailed", "--disable-tqdm",  # per-request TTFTs: the phases of a burst
    ]
    if w.max_concurrency:
        args += ["--max-concurrency", str(w.max_concurrency)]
    return vllm_env.cli_command(venv, *args)


def run_bench(cmd: list[str], result: Path, log: Path, timeout: float = 1800) -> dict:
    """Run the client; its saved JSON, checked: every request completed, none failed."""
    result.unlink(missing_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                              cwd=result.parent)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed (exit {proc.returncode}); see {log}")
    data = json.loads(result.read_text())
    if data.get("failed"):
        raise RuntimeError(f"{data['failed']} requests failed; see {log}")
    return data


def metrics(data: dict) -> dict[str, float]:
    """The reported figures of one run, plus the token count that CPU-per-token divides by and,
    from the per-request TTFTs, when the last request got its first token (for requests sent all
    at once: how long the prompts took, with the decodes that ran beside them) and how long the
    run went on after it (decodes only)."""
    out = {k: float(data[k]) for k in METRIC_KEYS}
    out["total_output_tokens"] = float(data["total_output_tokens"])
    out["duration_s"] = float(data["duration"])
    if data.get("ttfts"):
        out["last_first_token_s"] = float(max(data["ttfts"]))
        out["after_last_first_s"] = out["duration_s"] - out["last_first_token_s"]
    return out


SERVING = Path(__file__).resolve().parent / "serving.py"


def serving_command(w: Workload, base_url: str, model: str, served_name: str, seed: int,
                    result: Path) -> list[str]:
    """pagewire's client on ``w`` over the OpenAI API: the same lengths, rate and cap as
    ``vllm bench serve`` gets (its own random token-id prompts, the same for both servers)."""
    rate = "inf" if math.isinf(w.request_rate) else str(w.request_rate)
    return [sys.executable, str(SERVING), "--openai-url", base_url, "--served-model-name",
            served_name, "--model", model, "--num-requests", str(w.num_prompts),
            "--input-len", str(w.input_len), "--input-len-range", str(w.input_range),
            "--output-len", str(w.output_len), "--output-len-range", str(w.output_range),
            "--request-rate", rate, "--max-concurrency", str(w.max_concurrency),
            "--seed", str(seed), "--no-progress", "--out", str(result)]


def run_serving(cmd: list[str], result: Path, log: Path, timeout: float = 1800) -> dict[str, float]:
    """Run pagewire's client; its figures under vLLM's result keys (:data:`METRIC_KEYS`), checked:
    every request completed with exactly its tokens."""
    result.unlink(missing_ok=True)
    repo = str(SERVING.parents[1])
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    with open(log, "ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, env=env)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"bench/serving.py failed (exit {proc.returncode}); see {log}")
    s = json.loads(result.read_text())["results"]["main"][0]["summary"]
    if s["failed"]:
        raise RuntimeError(f"{s['failed']} requests failed ({s['errors']}); see {log}")
    out = {"output_throughput": s["output_throughput"], "request_throughput": s["request_throughput"],
           "total_output_tokens": float(s["total_output_tokens"]), "duration_s": s["duration_s"]}
    for name in ("ttft", "tpot", "itl"):
        out |= {f"p{p}_{name}_ms": s[f"{name}_ms"][f"p{p}"] for p in (50, 99)}
    return out
