"""Projections on the CPU: plain ``F.linear`` against weights pre-packed once for oneDNN
(``worker_svc/models/packed_linear.py``: decode batches through kernels/cpu_linear.py's C kernels
where this CPU has one, and oneDNN's own product over the same packed weight beside it), in
bfloat16 (with float32 ``F.linear`` for scale) or float32.

    python bench/cpu_linear.py                       # the small test model's and Qwen2.5-0.5B's shapes
    python bench/cpu_linear.py --threads 2 --rows 1,8,64,256
    python bench/cpu_linear.py --step-batches 1,16      # also whole decode steps of the small model
    python bench/cpu_linear.py --dtype float32 --threads 2 --rows 1,2,4,8,16,32,64,256,2048

Each cell is the fastest of ``--repeats`` timed calls (after a warm-up), the variants of a cell
timed in alternation: the minimum is what the kernel costs when nothing else takes the core,
which a shared machine's medians do not show. ``--step-batches`` adds whole worker decode steps
(``ModelRunner.execute``) of the small test model at 256-token contexts, plain and packed (and,
in bfloat16, float32 for scale), fastest of 64 each. Prints tables, writes JSON and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from worker_svc.models.packed_linear import PackedLinear

ONEDNN = torch.ops.mkldnn._linear_pointwise.default  # oneDNN's product over a packed weight

# (name, in_features, out_features): q/k/v fused, o, gate/up fused, down
SHAPES = {
    "small": [("qkv", 512, 1024), ("o", 512, 512), ("gate_up", 512, 2816), ("down", 1408, 512)],
    "qwen2.5-0.5b": [("qkv", 896, 1152), ("o", 896, 896), ("gate_up", 896, 9728),
                     ("down", 4864, 896)],
}


def fastest(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(k: int, n: int, rows: int, repeats: int, dtype: torch.dtype) -> dict[str, float]:
    plain = nn.Linear(k, n, bias=False).to(dtype)
    packed = PackedLinear(plain)
    x = torch.randn(rows, k, dtype=dtype)
    tol = 2.0**-7 if dtype == torch.bfloat16 else 1e-5  # the C kernels sum long rows in their order
    assert torch.allclose(packed(x), plain(x), rtol=tol, atol=tol)
    variants = {"plain": lambda: F.linear(x, plain.weight), "packed": lambda: packed(x),
                "onednn": lambda: ONEDNN(x, packed.weight, None, "none", [], "")}
    if dtype == torch.bfloat16:
        w32, x32 = plain.weight.float(), x.float()
        variants["fp32"] = lambda: F.linear(x32, w32)
    times: dict[str, float] = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats // 10):  # alternate in rounds of 10 calls
        for name, fn in variants.items():
            times[name] = min(times[name], fastest(fn, 10))
    return {name: t * 1e6 for name, t in times.items()}


def step_variants(dtype: str) -> dict[str, dict]:
    scale = {"fp32": {"dtype": "float32"}} if dtype == "bfloat16" else {}
    return {**scale, "plain": {"dtype": dtype, "packed_weights": False}, "packed": {"dtype": dtype}}


def decode_steps(batches: list[int], threads: int, dtype: str) -> list[dict]:
    """Fastest whole decode step per variant and batch (the variants alternate in rounds of 8)."""
    from pagewire.config import WorkerConfig
    from pagewire.testmodel import ensure_model
    from pagewire.v1 import common_pb2, worker_pb2
    from worker_svc.server import build_runner

    model = ensure_model(Path(tempfile.gettempdir()) / "pagewire-small-seed0", seed=0, size="small")
    runners = {name: build_runner(WorkerConfig(model=str(model), num_blocks=64 * max(batches) + 64,
                                               threads=threads, **kw))[0]
               for name, kw in step_variants(dtype).items()}
    out = []
    for batch in batches:
        last: dict[str, list[int]] = {}
        for name, r in runners.items():  # prefill 256 tokens per sequence, 17 blocks each
            r.reset()
            step = worker_pb2.Step(step_id=1)
            for i in range(batch):
                step.seqs.add(seq_id=i + 1, token_ids=list(range(3, 259)), sample=True, new=True,
                              block_ids=list(range(i * 40, i * 40 + 40)),
                              sampling=common_pb2.SamplingParams(temperature=0.0))
            last[name] = list(r.execute(step).token_ids)
        best = dict.fromkeys(runners, float("inf"))
        step_id = 1
        for _ in range(8):
            for name, r in runners.items():
                for _ in range(8):
                    step_id += 1
                    step = worker_pb2.Step(step_id=step_id)
                    for i, tok in enumerate(last[name]):
                        step.seqs.add(seq_id=i + 1, token_ids=[tok], sample=True)
                    t0 = time.perf_counter()
                    last[name] = list(r.execute(step).token_ids)
                    best[name] = min(best[name], time.perf_counter() - t0)
        row = {"batch": batch, **{n: t * 1e3 for n, t in best.items()}}
        print(f"decode step | batch {batch} | " + " | ".join(f"{n} {t:.2f} ms" for n, t in row.items()
                                                              if n != "batch")
              + f" | plain/packed {row['plain'] / row['packed']:.2f}", flush=True)
        out.append(row)
    return out


def plot(rows: list[dict], out: Path, dtype: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for shape in sorted({r["shape"] for r in rows}):
        sel = [r for r in rows if r["shape"] == shape]
        by_rows: dict[int, list[float]] = {}
        for r in sel:
            by_rows.setdefault(r["rows"], []).append(r["plain"] / r["packed"])
        xs = sorted(by_rows)
        ax.plot(xs, [sum(by_rows[m]) / len(by_rows[m]) for m in xs], marker="o", label=shape)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("rows (tokens in the step)")
    ax.set_ylabel("plain / packed time (mean over projections)")
    ax.set_title(f"{dtype} projections: packed speed-up")
    ax.legend()
    fig.tight_layout()
    path = out.with_suffix(".png")
    fig.savefig(path, dpi=120)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="small,qwen2.5-0.5b")
    p.add_argument("--rows", default="1,8,64,256")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=100)
    p.add_argument("--step-batches", default="", help="also whole decode steps at these batches")
    p.add_argument("--out", default="bench_cpu_linear.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    results = []
    print(f"shape | proj | rows | {args.dtype}: plain us | packed us | oneDNN over the packed us"
          + (" | fp32 us" if args.dtype == "bfloat16" else "") + " | plain/packed | oneDNN/packed")
    for shape in args.shapes.split(","):
        for proj, k, n in SHAPES[shape]:
            for rows in map(int, args.rows.split(",")):
                t = measure(k, n, rows, args.repeats, dtype)
                row = {"shape": shape, "proj": proj, "k": k, "n": n, "rows": rows, **t}
                results.append(row)
                print(f"{shape} | {proj} | {rows} | " + " | ".join(f"{v:.1f}" for v in t.values())
                      + f" | {t['plain'] / t['packed']:.2f} | {t['onednn'] / t['packed']:.2f}",
                      flush=True)
    steps = decode_steps([int(b) for b in args.step_batches.split(",")], args.threads,
                         args.dtype) if args.step_batches else []
    out = Path(args.out)
    out.write_text(json.dumps({"args": vars(args), "torch": torch.__version__, "rows": results,
                               "decode_steps": steps}, indent=2))
    print(f"json: {out}\nplot: {plot(results, out, args.dtype)}")


if __name__ == "__main__":
    main()
