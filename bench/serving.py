"""Serving benchmark, in the manner of vLLM's ``benchmark_serving``: latency and throughput of a
pagewire deployment under a synthetic load, optionally side by side with transformers.

    python bench/serving.py                                   # 64 mixed-length requests, burst
    python bench/serving.py --addr 127.0.0.1:50051 --request-rate 4 --max-concurrency 16
    python bench/serving.py --sweep-rates 1,2,4,inf --sweep-concurrency 1,4,16,64
    python bench/serving.py --compare-hf                      # pagewire vs transformers generate
    python bench/serving.py --images-per-request 2 --image-size 640x480 --image-prefix-hits

Requests are random token-id prompts (seeded; ``--input-len`` ± ``--input-len-range`` ratio, an
optional common ``--shared-prefix-len`` prefix), greedy with ``ignore_eos`` so each one generates
exactly its ``output_len`` tokens. Arrivals are Poisson at ``--request-rate`` (inf: all at once)
with at most ``--max-concurrency`` in flight. Reports request throughput, output tokens/s, and
TTFT / TPOT / ITL / E2E latency (mean, p50, p90, p99; definitions in ``serving_metrics.py``).
With ``--repeats N`` each point runs N times and the run with the median output tokens/s is
reported. Writes JSON (``--out``) and, for sweeps, PNG plots next to it.

``--images-per-request N`` turns the workload into image chats (a vision-language model; default
the small LLaVA test model): N random PNGs of ``--image-size`` per request, new pixels per
request and run, then the prompt's ids as words; input token counts come from each response's
usage (placeholders included). ``--image-prefix-hits`` then sends the main run's requests again,
so every image is a prefix-cache hit, and reports that run as ``image_prefix_hit``.

Without ``--addr`` the script starts its own stack (Redis, worker, scheduler, router as separate
processes) on ``--model`` (default: the small test model, built on first use). The worker gets
``--threads`` torch threads, the same number the transformers baseline uses.

``--openai-url http://HOST:PORT`` drives any OpenAI-compatible server instead (pagewire's HTTP API,
vLLM): streamed ``/v1/completions`` of the same token-id prompts, each chunk's tokens counted from
vLLM's ``continuous_usage_stats`` (``serving_client``); ``--model`` then only names the model
directory whose vocabulary the prompts are drawn from. ``bench/vs_vllm.py`` runs it against both
servers as a second opinion beside ``vllm bench serve``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import shlex
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import serving_compare
import serving_plots
from serving_client import OpenAITarget, Target, run_requests, warm_up
from serving_data import (
    BenchRequest,
    RequestSetSpec,
    RequestSource,
    arrival_offsets,
    model_vocab_size,
)
from serving_metrics import format_summary, summarize

DEFAULT_MODEL = Path.home() / ".cache/pagewire/models/small-seed0"
DEFAULT_VLM = Path.home() / ".cache/pagewire/models/llava-small-seed0"
BLOCK_SIZE = 16  # the worker's default --block-size; used only to size --num-blocks
IMAGE_TOKENS_BOUND = 600  # placeholders per image, at most (LLaVA-1.5: 576); sizes --num-blocks


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--addr", default="", help="router address; empty: start a local stack")
    p.add_argument("--openai-url", default="",
                   help="an OpenAI-compatible server's base URL (no /v1) to drive instead of gRPC")
    p.add_argument("--served-model-name", default="",
                   help="with --openai-url: the model name (default: the server's first model)")
    p.add_argument("--model", default="", help=f"model dir (default {DEFAULT_MODEL}, built if missing)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=272, help="mean prompt length in tokens")
    p.add_argument("--input-len-range", type=float, default=0.88,
                   help="prompt lengths uniform in [len*(1-r), len*(1+r)] (default: 32-512)")
    p.add_argument("--output-len", type=int, default=80, help="mean output length in tokens")
    p.add_argument("--output-len-range", type=float, default=0.6,
                   help="as --input-len-range (default: 32-128); 0 for fixed lengths")
    p.add_argument("--shared-prefix-len", type=int, default=0, help="common prefix on every prompt")
    p.add_argument("--images-per-request", type=int, default=0, help="image chats with N images")
    p.add_argument("--image-size", default="336x336", help="WxH of each random image")
    p.add_argument("--image-prefix-hits", action="store_true",
                   help="rerun the main run's image requests: every image a prefix-cache hit")
    p.add_argument("--request-rate", type=float, default=math.inf, help="req/s, Poisson; inf: burst")
    p.add_argument("--max-concurrency", type=int, default=0, help="most requests in flight; 0: no cap")
    p.add_argument("--sweep-rates", default="", help="e.g. 1,2,4,inf: latency vs rate plot")
    p.add_argument("--sweep-concurrency", default="", help="e.g. 1,4,16,64: throughput plot")
    p.add_argument("--repeats", type=int, default=1, help="runs per point; the median is reported")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads for the worker and for transformers (default: all cores)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights and KV cache, for the worker and for transformers alike")
    p.add_argument("--num-blocks", type=int, default=0,
                   help="worker KV blocks; 0: enough for every request at once (no preemption)")
    p.add_argument("--worker-args", default="", help="extra worker flags, one shell-quoted string")
    p.add_argument("--scheduler-args", default="", help="extra scheduler flags, e.g. '--max-num-seqs 64'")
    p.add_argument("--router-args", default="", help="extra router flags, e.g. '--image-cache-bytes 0'")
    p.add_argument("--log-dir", default="", help="service logs of the local stack")
    p.add_argument("--compare-hf", action="store_true", help="also run transformers generate")
    p.add_argument("--hf-batch-sizes", default="1,8,32")
    p.add_argument("--hf-single-limit", type=int, default=0,
                   help="run HF batch size 1 on only the first N requests (tok/s over that subset)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--out", default="bench_serving.json")
    return p


def request_spec(args: argparse.Namespace) -> RequestSetSpec:
    return RequestSetSpec(args.num_requests, args.input_len, args.output_len, args.input_len_range,
                          args.output_len_range, args.shared_prefix_len, args.seed)


def worker_args(args: argparse.Namespace, requests: list[BenchRequest]) -> list[str]:
    """Threads and a KV pool that holds every request's full sequence, unless told otherwise."""
    image_tokens = args.images_per_request * IMAGE_TOKENS_BOUND
    blocks = args.num_blocks or sum(
        math.ceil((r.input_len + r.output_len + image_tokens) / BLOCK_SIZE) for r in requests
    ) + 64
    return ["--threads", str(args.threads), "--num-blocks", str(blocks), "--dtype", args.dtype,
            *shlex.split(args.worker_args)]


async def openai_target(args: argparse.Namespace) -> OpenAITarget:
    """``--openai-url`` and its model: ``--served-model-name``, or the first ``/v1/models`` lists."""
    url = args.openai_url.rstrip("/")
    if args.served_model_name:
        return OpenAITarget(url, args.served_model_name)
    async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as resp:
        resp.raise_for_status()
        return OpenAITarget(url, (await resp.json())["data"][0]["id"])


@asynccontextmanager
async def server_target(args: argparse.Namespace, requests: list[BenchRequest]) -> AsyncIterator[Target]:
    """``--openai-url`` or ``--addr`` as given, or a local stack started for the benchmark and
    stopped after it."""
    if args.openai_url:
        yield await openai_target(args)
        return
    if args.addr:
        yield args.addr
        return
    from pagewire.launcher import start_stack

    stack = await start_stack(
        args.model, worker_args=worker_args(args, requests),
        scheduler_args=shlex.split(args.scheduler_args),
        router_args=shlex.split(args.router_args),
        log_dir=Path(args.log_dir) if args.log_dir else None,
    )
    try:
        yield stack.router
    finally:
        stack.stop()


async def bench_point(
    addr: Target, source: RequestSource, args: argparse.Namespace, rate: float, concurrency: int
) -> dict[str, object]:
    """One (rate, concurrency) point, ``--repeats`` times; keeps the median run by output tok/s.

    Every run gets a fresh round of prompts (same lengths), so no run reuses the prefix cache of
    an earlier one; only ``--shared-prefix-len`` tokens are shared, as intended.
    """
    runs = []
    for i in range(args.repeats):
        requests = source.draw()
        offsets = arrival_offsets(len(requests), rate, args.seed)
        label = f"rate={rate:g} conc={concurrency or 'inf'} run {i + 1}/{args.repeats}"
        result = await run_requests(addr, requests, offsets, concurrency, label, not args.no_progress)
        runs.append(summarize(result))
    ordered = sorted(runs, key=lambda s: s["output_throughput"])
    return {"request_rate": rate if math.isfinite(rate) else "inf", "max_concurrency": concurrency,
            "summary": ordered[len(ordered) // 2],
            "output_throughput_runs": [s["output_throughput"] for s in runs]}


async def run_points(
    args: argparse.Namespace, source: RequestSource, points: list[tuple[float, int]]
) -> list[dict[str, object]]:
    """Warm the server once (round 0's prompts), then run every point against the same router."""
    warm = source.round(0)
    async with server_target(args, warm) as addr:
        await warm_up(addr, warm)
        results = []
        for i, (rate, conc) in enumerate(points):
            res = await bench_point(addr, source, args, rate, conc)
            print(format_summary(f"rate {rate:g} req/s, max concurrency {conc or 'none'}",
                                 res["summary"]))
            results.append(res)
            if i == 0 and args.image_prefix_hits:
                results.append(await prefix_hit_point(addr, source, args, rate, conc))
        return results


async def prefix_hit_point(
    addr: Target, source: RequestSource, args: argparse.Namespace, rate: float, concurrency: int
) -> dict[str, object]:
    """The latest run's requests (same images, same text) again: prefix-cache hits."""
    assert source.last is not None
    offsets = arrival_offsets(len(source.last), rate, args.seed)
    result = await run_requests(addr, source.last, offsets, concurrency, "image prefix hits",
                                not args.no_progress)
    summary = summarize(result)
    print(format_summary("same requests again (image prefix hits)", summary))
    return {"request_rate": rate if math.isfinite(rate) else "inf",
            "max_concurrency": concurrency, "summary": summary}


def sweep_points(args: argparse.Namespace) -> dict[str, list[tuple[float, int]]]:
    """The named groups of (rate, concurrency) points this invocation runs."""
    groups = {"main": [(args.request_rate, args.max_concurrency)]}
    if args.sweep_rates:
        groups["rate_sweep"] = [(r, args.max_concurrency) for r in parse_floats(args.sweep_rates)]
    if args.sweep_concurrency:
        groups["concurrency_sweep"] = [(args.request_rate, c) for c in parse_ints(args.sweep_concurrency)]
    return groups


def write_plots(report: dict, out: Path) -> list[str]:
    """PNGs named after the JSON file, one per sweep that ran."""
    paths = []
    if "rate_sweep" in report["results"]:
        paths.append(serving_plots.plot_latency_vs_rate(
            report["results"]["rate_sweep"], out.with_name(out.stem + "_latency_vs_rate.png")))
    if "concurrency_sweep" in report["results"]:
        paths.append(serving_plots.plot_throughput_vs_concurrency(
            report["results"]["concurrency_sweep"],
            out.with_name(out.stem + "_throughput_vs_concurrency.png")))
    return [str(p) for p in paths]


def environment(args: argparse.Namespace) -> dict[str, object]:
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "host": platform.node(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": args.threads, "dtype": args.dtype}


async def main_async(args: argparse.Namespace) -> dict:
    if not args.model and args.images_per_request:
        args.model = str(DEFAULT_VLM)
        if not (DEFAULT_VLM / "config.json").exists():
            from pagewire.testmodel_vlm import make_llava_model

            make_llava_model(DEFAULT_VLM, seed=0, size="small")
    if not args.model:
        from pagewire.testmodel import ensure_model

        args.model = str(ensure_model(DEFAULT_MODEL, seed=0, size="small"))
    w, h = (int(x) for x in args.image_size.lower().split("x"))
    source = RequestSource(request_spec(args), model_vocab_size(args.model),
                           images_per_request=args.images_per_request, image_size=(w, h))
    requests = source.round(1)  # the first run's set
    groups = sweep_points(args)
    if args.image_prefix_hits:
        groups = {"main": groups["main"], "image_prefix_hit": groups["main"],
                  **{k: v for k, v in groups.items() if k != "main"}}
    flat = [pt for name, pts in groups.items() if name != "image_prefix_hit" for pt in pts]
    results = await run_points(args, source, flat)
    report: dict = {"config": {k: (str(v) if isinstance(v, float) and math.isinf(v) else v)
                               for k, v in vars(args).items()},
                    "environment": environment(args), "worker_args": worker_args(args, requests),
                    "results": {}}
    it = iter(results)
    for name, pts in groups.items():
        report["results"][name] = [next(it) for _ in pts]
    if args.compare_hf:
        report["compare_hf"] = serving_compare.compare(args, requests, report["results"]["main"][0])
    return report


def run(argv: list[str] | None = None) -> dict:
    """Parse flags, benchmark, write the JSON and plots; returns the report (the tests use it)."""
    args = build_parser().parse_args(argv)
    report = asyncio.run(main_async(args))
    out = Path(args.out)
    report["plots"] = write_plots(report, out)
    out.write_text(json.dumps(report, indent=2, default=str))
    for p in report["plots"]:
        print(f"plot: {p}")
    print(f"json: {out}")
    return report


def main() -> None:
    run()


if __name__ == "__main__":
    main()
