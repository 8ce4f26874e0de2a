"""CPU prefill attention of a burst of prompts: the compiled kernel (bfloat16 on AMX or AVX-512
BF16, float32 on AVX2), and torch's fused attention with query/key counts exact or rounded up to 16.

    python bench/cpu_extend.py --dtype bfloat16 --prompts 64 --min-len 32 --max-len 512

The extend attention of kernels.cpu_attention for ``--prompts`` prompts with no cached prefix,
lengths uniform in [min, max], every layer (``--layers`` calls per prompt, the chunk's own K/V
as the model passes them), three ways: kernels.cpu_extend (where it takes the dtype), torch's
``scaled_dot_product_attention`` with the counts exact, and with them rounded up to a multiple
of ``--rows``. Each round draws new lengths (as a server meets them: a length it has not run
before), and the variants alternate within a round on the same lengths, so per-shape set-up
costs count for all alike. Prints medians and ranges (and each variant's time over the exact
one's, per round), writes JSON and a plot.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kernels import cpu_attention, cpu_extend


def burst(lens: list[int], args: argparse.Namespace, dtype: torch.dtype) -> list[tuple]:
    """Per prompt: the query, its own K/V, one-sequence block table, cu_seqlens, context."""
    out = []
    for n in lens:
        q = torch.randn(n, args.heads, args.head_dim).to(dtype)
        kv = [torch.randn(n, args.kv_heads, args.head_dim).to(dtype) for _ in range(2)]
        out.append((q, kv, torch.tensor([n], dtype=torch.int32)))
    return out


def run(prompts: list[tuple], cache: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds for every prompt's attention in every layer."""
    blocks = torch.arange(cache.shape[0], dtype=torch.int32)[None]
    start = time.perf_counter()
    for q, kv, ctx in prompts:
        cu = torch.tensor([0, int(ctx)], dtype=torch.int32)
        plan = cpu_attention.plan_extend(blocks, cu, ctx, cache)
        for _ in range(args.layers):
            cpu_attention.paged_extend_attention(q, cache, cache, blocks, cu, ctx, 0.125,
                                                 plan=plan, new_kv=(kv[0], kv[1]))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--min-len", type=int, default=32)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="cpu_extend.json")
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    cache = torch.zeros(-(-(args.max_len + args.rows) // 16), 16, args.kv_heads, args.head_dim,
                        dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    takes, extend_rows = cpu_extend.takes, cpu_attention._extend_rows
    variants = {"exact": (1, False), f"rows of {args.rows}": (args.rows, False)}
    if takes(torch.empty(0, dtype=dtype), args.head_dim):
        variants["compiled"] = (1, True)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        lens = torch.randint(args.min_len, args.max_len + 1, (args.prompts,), generator=gen).tolist()
        prompts = burst(lens, args, dtype)
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            rows, compiled = variants[name]
            cpu_attention._extend_rows = lambda _dtype, rows=rows: rows
            cpu_extend.takes = takes if compiled else (lambda q, head_dim: False)
            times[name].append(run(prompts, cache, args) * 1e3)
    cpu_extend.takes, cpu_attention._extend_rows = takes, extend_rows
    exact = times["exact"]
    print(f"{args.prompts} prompts of {args.min_len}-{args.max_len} tokens, {args.layers} layers, "
          f"{args.dtype}, {args.rounds} rounds")
    print("variant | ms per burst (median [range]) | / exact")
    for name, ts in times.items():
        ratio = statistics.median(t / e for t, e in zip(ts, exact, strict=True))
        print(f"{name} | {statistics.median(ts):.1f} [{min(ts):.1f}-{max(ts):.1f}] | {ratio:.2f}")
    out = Path(args.out)
    out.write_text(json.dumps({"args": vars(args), "ms": times}, indent=1))
    plot(times, out, args)
    print(f"wrote {out} and {out.with_suffix('.png')}")


def plot(times: dict[str, list[float]], out: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ts in times.items():
        ax.plot(range(1, len(ts) + 1), ts, marker="o", label=name)
    ax.set_xlabel("round (new prompt lengths each)")
    ax.set_ylabel("ms per burst")
    ax.set_title(f"prefill attention, {args.prompts} prompts, {args.dtype}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
