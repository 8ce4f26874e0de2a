"""What the control plane costs per streamed token: router, scheduler and Redis CPU over HTTP.

    python bench/router_cost.py [--streams 64] [--output-len 128] [--step-ms 25] [--rounds 5]
                                [--model DIR] [--out router_cost.json]

Starts a private redis-server, a null worker (the worker's gRPC service without a model: every
step holds ``--step-ms``, then samples tokens inside the model's vocabulary), a scheduler and a
router with the model's tokenizer, then streams rounds of ``--streams`` OpenAI completions at
once (text prompts of ``--input-len`` tokens, ``--output-len`` tokens each, ignore_eos) from an
aiohttp client in this process, as ``vllm bench serve`` does. For each round: output tokens/s and
the CPU-milliseconds per output token of every process (``/proc``). With no model compute on
the machine, the router's and scheduler's own per-token cost is measured without the noise of a
worker sharing their cores; ``--step-ms 0`` instead runs the control plane flat out (the most
tokens/s one router and scheduler can stream).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import time
from pathlib import Path

import aiohttp
from vs_vllm import ensure_model
from vs_vllm_cpu import cpu_seconds

from pagewire.launcher import Stack, free_port
from pagewire.redis_server import start_redis

ROLES = ("router", "scheduler", "redis", "worker", "client")


def prompts(model: str, n: int, length: int, seed: int) -> list[str]:
    """Text of ``length`` random tokens each (vLLM's random dataset: decoded random ids)."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model)
    rng = random.Random(seed)
    return [tok.decode([rng.randrange(16, tok.vocab_size) for _ in range(length)])
            for _ in range(n)]


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, int]:
    """One streamed completion: (SSE chunks, completion tokens its usage chunk reports)."""
    chunks, tokens = 0, 0
    async with session.post(url, json=body) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunks += 1
            if b'"usage"' in line:  # the last chunk (stream_options.include_usage)
                tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    return chunks, tokens


async def one_round(url: str, model: str, texts: list[str], output_len: int,
                    pids: dict[str, int]) -> dict:
    bodies = [{"model": model, "prompt": t, "max_tokens": output_len, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True, "temperature": 0.0}
              for t in texts]
    c0 = {role: cpu_seconds(pid) for role, pid in pids.items()}
    t0 = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        streams = await asyncio.gather(*(one_stream(session, url, b) for b in bodies))
    wall = time.perf_counter() - t0
    tokens = sum(n for _, n in streams)
    if tokens != len(texts) * output_len:  # every stream runs to its length (ignore_eos)
        raise RuntimeError(f"{tokens} tokens streamed, {len(texts) * output_len} asked for")
    row = {"tokens": tokens, "chunks": sum(c for c, _ in streams), "wall_s": wall,
           "tokens_per_s": tokens / wall}
    for role, pid in pids.items():
        row[f"{role}_cpu_ms_per_token"] = (cpu_seconds(pid) - c0[role]) * 1e3 / tokens
    return row


async def main_async(args: argparse.Namespace) -> list[dict]:
    model = ensure_model(args.model)
    config = json.loads((Path(model) / "config.json").read_text())
    texts = prompts(model, args.streams, args.input_len, seed=0)
    rs = start_redis()
    stack = Stack(model=model, redis_url=rs.url)
    try:
        wport = free_port()
        worker = await stack.start_service("worker", "worker_svc.null_worker", [
            "--port", str(wport), "--worker-id", "null-0", "--num-blocks", "100000",
            "--model-name", Path(model).name, "--vocab-size", str(config["vocab_size"]),
            "--step-ms", str(args.step_ms), "--max-model-len", "4096"], wport)
        sched = await stack.start_scheduler([worker], ["--log-level", "WARNING"])
        http_port = free_port()
        await stack.start_router(sched, extra=["--http-port", str(http_port), "--log-level",
                                               "WARNING"])
        pids = {"router": stack.service("router").process.pid, "scheduler": sched.process.pid,
                "redis": rs.pid, "worker": worker.process.pid, "client": os.getpid()}
        url = f"http://127.0.0.1:{http_port}/v1/completions"
        await one_round(url, Path(model).name, texts[:4], 8, pids)  # warm-up
        rows = []
        for i in range(args.rounds):
            rows.append(await one_round(url, Path(model).name, texts, args.output_len, pids))
            print(f"round {i}: " + _line(rows[-1]), flush=True)
        return rows
    finally:
        stack.stop()
        rs.stop()


def _line(row: dict) -> str:
    return f"{row['tokens_per_s']:8.0f} tok/s  " + "  ".join(
        f"{role} {row[f'{role}_cpu_ms_per_token'] * 1e3:6.1f}" for role in ROLES)


def summary(rows: list[dict]) -> dict:
    keys = ["tokens_per_s", *(f"{role}_cpu_ms_per_token" for role in ROLES)]
    return {k: {"median": statistics.median(r[k] for r in rows),
                "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)} for k in keys}


def run(argv: list[str] | None = None) -> dict:
    """Parse ``argv``, run the rounds, print the table, write and return the report."""
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model directory (default: the small test model)")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=25.0)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="router_cost.json")
    args = p.parse_args(argv)
    rows = asyncio.run(main_async(args))
    s = summary(rows)
    print("\nmedian (range) over rounds; CPU in microseconds per output token")
    print(f"{'tok/s':>22}: {s['tokens_per_s']['median']:.0f} "
          f"({s['tokens_per_s']['min']:.0f}-{s['tokens_per_s']['max']:.0f})")
    for role in ROLES:
        v = s[f"{role}_cpu_ms_per_token"]
        print(f"{role + ' us/token':>22}: {v['median'] * 1e3:.1f} "
              f"({v['min'] * 1e3:.1f}-{v['max'] * 1e3:.1f})")
    report = {"args": vars(args), "rounds": rows, "summary": s}
    Path(args.out).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    run()
