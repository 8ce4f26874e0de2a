"""Smoke test of the serving benchmark and the transformers baseline on the tiny model.

Runs the real thing end to end (a local stack, a few requests, one small sweep each way) and
checks that the report is internally consistent, not how fast anything is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"
# bench/ is a folder of scripts, not a package. Appended, not prepended: bench/triton_kernels.py must
# not shadow the kernels package for the rest of the session.
sys.path.append(str(BENCH_DIR))

import hf_baseline  # noqa: E402
import serving  # noqa: E402
from serving_data import RequestSetSpec, make_requests, model_vocab_size  # noqa: E402

NUM_REQUESTS = 6


def check_summary(s: dict, expected_output_tokens: int) -> None:
    assert s["completed"] == NUM_REQUESTS and s["failed"] == 0, s["errors"]
    assert s["total_output_tokens"] == expected_output_tokens
    assert s["output_throughput"] > 0 and s["request_throughput"] > 0
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        d = s[name]
        assert 0 <= d["p50"] <= d["p90"] <= d["p99"], (name, d)
    assert s["ttft_ms"]["p99"] <= s["e2el_ms"]["p99"]
    assert s["ttft_ms"]["mean"] <= s["e2el_ms"]["mean"]
    assert s["e2el_ms"]["p99"] <= s["duration_s"] * 1e3 + 1e-6


def test_serving_bench_reports_exact_tokens_and_ordered_latencies(
    tiny_model: Path, tmp_path: Path
) -> None:
    out = tmp_path / "serving.json"
    argv = [
        "--model", str(tiny_model), "--num-requests", str(NUM_REQUESTS),
        "--input-len", "24", "--input-len-range", "0.5", "--output-len", "8",
        "--output-len-range", "0.5", "--shared-prefix-len", "4", "--max-concurrency", "4",
        "--sweep-rates", "40,inf", "--sweep-concurrency", "1,6", "--threads", "1", "--repeats", "2",
        "--compare-hf", "--hf-batch-sizes", "1,4", "--hf-single-limit", "3",
        "--no-progress", "--out", str(out),
    ]
    report = serving.run(argv)
    requests = make_requests(
        RequestSetSpec(NUM_REQUESTS, 24, 8, 0.5, 0.5, shared_prefix_len=4),
        model_vocab_size(tiny_model), round_=1,
    )
    expected = sum(r.output_len for r in requests)
    assert len({r.prompt_ids[:4] for r in requests}) == 1
    assert all(5 <= t for r in requests for t in r.prompt_ids)
    points = [p for group in report["results"].values() for p in group]
    assert len(points) == 5
    for point in points:
        check_summary(point["summary"], expected)
        assert len(point["output_throughput_runs"]) == 2
    on_disk = json.loads(out.read_text())
    assert on_disk["results"]["rate_sweep"][1]["request_rate"] == "inf"
    assert [Path(p).is_file() for p in on_disk["plots"]] == [True, True]
    rows = on_disk["compare_hf"]["rows"]
    assert [r["requests"] for r in rows] == [NUM_REQUESTS, 3, NUM_REQUESTS]
    assert rows[0]["pagewire_ratio"] == 1.0 and rows[2]["output_tokens"] == expected


def test_openai_client_counts_every_chunks_tokens_from_the_running_usage(
    tiny_model: Path, tmp_path: Path
) -> None:
    """``--openai-url``: the same requests over pagewire's HTTP API (as against vLLM), every
    request's tokens counted exactly from each chunk's continuous usage; a burst, so chunks
    can carry several tokens when the router's reader falls behind."""
    import asyncio

    from pagewire.launcher import free_port, start_stack

    port = free_port()
    stack = asyncio.run(start_stack(str(tiny_model), worker_args=["--threads", "1"],
                                    router_args=["--http-port", str(port)], log_dir=tmp_path))
    try:
        report = serving.run([
            "--openai-url", f"http://127.0.0.1:{port}", "--model", str(tiny_model),
            "--num-requests", str(NUM_REQUESTS), "--input-len", "24", "--input-len-range", "0.5",
            "--output-len", "8", "--output-len-range", "0.5", "--no-progress",
            "--out", str(tmp_path / "openai.json"),
        ])
    finally:
        stack.stop()
    requests = make_requests(RequestSetSpec(NUM_REQUESTS, 24, 8, 0.5, 0.5),
                             model_vocab_size(tiny_model), round_=1)
    [point] = report["results"]["main"]
    check_summary(point["summary"], sum(r.output_len for r in requests))
    assert point["summary"]["total_input_tokens"] == sum(r.input_len for r in requests)


def test_hf_baseline_counts_requested_tokens(tiny_model: Path) -> None:
    spec = RequestSetSpec(2, 12, 6, 0.5, 0.5)
    requests = make_requests(spec, model_vocab_size(tiny_model))
    runs = hf_baseline.run_baseline(tiny_model, requests, [1, 2], threads=1, progress=False)
    assert [r.mode for r in runs] == ["hf_single", "hf_batch2"]
    want = sum(r.output_len for r in requests)
    for run in runs:
        assert run.output_tokens == want and run.output_throughput > 0
    assert runs[1].generated_tokens == 2 * max(r.output_len for r in requests)


def test_each_round_keeps_lengths_and_prefix_but_not_prompts() -> None:
    spec = RequestSetSpec(5, 40, 8, 0.5, 0.5, shared_prefix_len=16, seed=1)
    a, b = make_requests(spec, 1024, round_=1), make_requests(spec, 1024, round_=2)
    assert [(r.input_len, r.output_len) for r in a] == [(r.input_len, r.output_len) for r in b]
    assert all(x.prompt_ids[:16] == y.prompt_ids[:16] for x, y in zip(a, b, strict=True))
    assert all(x.prompt_ids[16:] != y.prompt_ids[16:] for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("rate", [float("inf"), 5.0])
def test_arrivals_are_seeded_and_start_at_zero(rate: float) -> None:
    from serving_data import arrival_offsets

    a = arrival_offsets(8, rate, seed=3)
    assert a == arrival_offsets(8, rate, seed=3)
    assert a[0] == 0.0 and a == sorted(a)


def test_image_workload_reports_prefix_hits_on_the_rerun(llava_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "images.json"
    report = serving.run([
        "--model", str(llava_model), "--num-requests", "4", "--input-len", "12",
        "--input-len-range", "0.5", "--output-len", "6", "--output-len-range", "0",
        "--images-per-request", "2", "--image-size", "64x40", "--image-prefix-hits",
        "--threads", "1", "--no-progress", "--out", str(out),
    ])
    cold, hit = report["results"]["main"][0]["summary"], report["results"]["image_prefix_hit"][0]["summary"]
    for s in (cold, hit):
        assert s["completed"] == 4 and s["failed"] == 0, s["errors"]
        assert s["total_output_tokens"] == 24
        assert s["total_input_tokens"] > 4 * 2 * 36  # usage counts the placeholders
    assert cold["total_cached_tokens"] < hit["total_cached_tokens"]
    assert hit["total_cached_tokens"] >= hit["total_input_tokens"] - 4 * 16
