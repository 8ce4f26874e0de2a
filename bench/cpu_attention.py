"""CPU paged decode attention: the reference, the torch path and the compiled C kernel, side by side.

    python bench/cpu_attention.py --batch 64 --min-context 100 --max-context 600 --out cpu_attention.json
    python bench/cpu_attention.py --dtype bfloat16 --min-context 256 --max-context 384

One decode step's attention over every layer (``--layers`` calls on the same batch, as the
model makes them, each over its own layer's cache unless ``--shared-cache``: a step reads every
layer's K/V from memory, not from a cache the last call left warm), for the shapes of the small
test model by default (8 query heads, 4 KV heads, head dim 64, block size 16), fp32 or bf16
caches (``--dtype``; the query in the same dtype, as the model passes it), contexts uniform in
[min, max] and each sequence's blocks scattered over a cache larger than the batch needs. The three backends alternate, round
after round, so a noisy machine slows them alike; the median round is reported, with the bytes
of K/V the step must read and the rate at which each backend got through them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from kernels import cpu_attention, cpu_decode, reference


def make_batch(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """The query, one layer's K and V caches, block tables and context lengths."""
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(args.min_context, args.max_context + 1, (args.batch,), generator=gen)
    blocks = (lens + args.block_size - 1) // args.block_size
    total = int(blocks.sum()) * 2  # half the pool unused: blocks land all over it
    shape = (total, args.block_size, args.kv_heads, args.head_dim)
    dtype = getattr(torch, args.dtype)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    order = torch.randperm(total, generator=gen).to(torch.int32)
    tables = torch.zeros(args.batch, int(blocks.max()), dtype=torch.int32)
    used = 0
    for b, n in enumerate(blocks.tolist()):
        tables[b, :n] = order[used : used + n]
        used += n
    q = torch.randn(args.batch, args.heads, args.head_dim, generator=gen).to(dtype)
    return q, k_cache, v_cache, tables, lens.to(torch.int32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--min-context", type=int, default=100)
    p.add_argument("--max-context", type=int, default=600)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--shared-cache", action="store_true", help="every layer reads one cache")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="cpu_attention.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    q, k_cache, v_cache, tables, lens = make_batch(args)
    layers = [(k_cache, v_cache)] * args.layers if args.shared_cache else [
        (k_cache.clone(), v_cache.clone()) for _ in range(args.layers)]
    scale = args.head_dim**-0.5
    plan = cpu_attention.plan_decode(tables, lens, k_cache)
    backends = {
        "reference": lambda k, v: reference.paged_decode_attention(q, k, v, tables, lens, scale),
        "torch (gather + SDPA)": lambda k, v: cpu_attention.paged_decode_attention(
            q, k, v, tables, lens, scale, plan=plan),
    }
    if cpu_decode.load() is not None:
        backends["C kernel"] = lambda k, v: cpu_decode.paged_decode_attention(q, k, v, tables, lens, scale)
    expected = reference.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale).float()
    times: dict[str, list[float]] = {name: [] for name in backends}
    tolerance = 1e-4 if args.dtype == "float32" else 1e-2
    for name, fn in backends.items():
        err = float((fn(k_cache, v_cache).float() - expected).norm() / expected.norm())
        assert err < tolerance, f"{name} disagrees with the reference: {err}"
    for _ in range(args.rounds):
        for name, fn in backends.items():
            start = time.perf_counter()
            for k, v in layers:
                fn(k, v)
            times[name].append((time.perf_counter() - start) * 1e3)
    kv_bytes = args.layers * 2 * int(lens.sum()) * args.kv_heads * args.head_dim * k_cache.element_size()
    base = statistics.median(times["reference"])
    rows = []
    print(f"\n{args.batch} sequences, contexts {args.min_context}-{args.max_context}, "
          f"{args.layers} layers, {args.dtype}, {kv_bytes / 1e6:.0f} MB of K/V per step, "
          f"{'one cache' if args.shared_cache else 'a cache per layer'}, {args.threads} threads\n")
    print("| backend | ms per step (median) | rounds | K/V read rate | vs reference |")
    print("|---|---:|---|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append({"backend": name, "median_ms": med, "rounds_ms": ts,
                     "kv_gb_per_s": kv_bytes / med / 1e6, "speedup_vs_reference": base / med})
        print(f"| {name} | {med:.1f} | " + ", ".join(f"{t:.0f}" for t in ts)
              + f" | {kv_bytes / med / 1e6:.1f} GB/s | {base / med:.2f}x |")
    Path(args.out).write_text(json.dumps({"args": vars(args), "kv_bytes": kv_bytes,
                                          "rows": rows}, indent=2))
    print(f"\njson: {args.out}")


if __name__ == "__main__":
    main()
