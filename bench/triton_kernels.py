"""Benchmark the Triton paged attention kernels on a CUDA GPU (Llama-3-8B attention shapes).

Decode is memory-bound, so it is judged by achieved bandwidth of the KV read against the device's
copy bandwidth, measured in the same run (a large device-to-device copy; bytes read + bytes written
over time), and by its time relative to torch SDPA over the same KV stored contiguously. Extend is
compute-bound, so it is judged in TFLOP/s against SDPA with a causal mask.

    python3 bench/triton_kernels.py --out bench_kernels.json [--quick] [--sweep]

Conventions: decode KV bytes = batch * context * kv_heads * head_dim * 2 (K and V) * dtype bytes
(q/out ignored); extend FLOPs = 4 * head_dim * q_heads * (attended query-key pairs), causal pairs
counted exactly. Times are medians over 60 calls with L2 emptied before each (see _time_ms);
decode is timed as a CUDA graph replay (kernel time) and eagerly (plus Python launch overhead).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this file's folder comes first on sys.path and its own name would shadow the
# `kernels` package; the repository root goes there instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or ".") == _HERE:
    sys.path[0] = os.path.dirname(_HERE)

import argparse  # noqa: E402
import datetime  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402

from kernels import triton_ops  # noqa: E402
from kernels.triton_ops import decode as decode_mod  # noqa: E402
from kernels.triton_ops import extend as extend_mod  # noqa: E402

Q_HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128  # Llama-3-8B
SCALE = HEAD_DIM**-0.5


def _time_ms(fn, graph: bool = True, reps: int = 60) -> float:
    """Median GPU time of one call of ``fn``, with L2 emptied before each call.

    L2 is emptied by *reading* 256 MiB: zeroing a buffer (what do_bench does) leaves ~50 MB of dirty
    lines whose write-back then lands inside the timed call, ~17 us on H100, which swamps small
    decode shapes. ``graph=True`` replays ``fn`` captured in a CUDA graph: the kernels' own time
    without Python launch overhead (how graph-captured decode steps run). ``graph=False`` calls
    ``fn`` from Python each time (eager serving; small shapes then measure launch overhead).
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(side)
    run = fn
    if graph:
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            fn()
        run = cuda_graph.replay
    flush = torch.ones(64 << 20, dtype=torch.int32, device="cuda")
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for start, end in events:
        flush.sum()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return float(times[len(times) // 2])


def copy_bandwidth_gbps(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy of a 2 GiB buffer, called eagerly; counts bytes read plus written.

    Eager on purpose: captured in a CUDA graph the same copy becomes a memcpy node that ran at
    only ~2.4 TB/s on H100 (copy engine), against ~3.0 TB/s eagerly.
    """
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), graph=False, reps=20)
    return 2 * nbytes / ms / 1e6


def _paged_kv(batch: int, ctx: int, block_size: int, dtype: torch.dtype):
    """A paged cache holding exactly ``batch`` sequences of ``ctx`` tokens in shuffled blocks,
    and the same K/V as contiguous [B, KV_HEADS, ctx, HEAD_DIM] tensors for SDPA."""
    per_seq = math.ceil(ctx / block_size)
    num_blocks = batch * per_seq
    shape = (num_blocks, block_size, KV_HEADS, HEAD_DIM)
    k_cache = torch.randn(shape, device="cuda", dtype=dtype)
    v_cache = torch.randn(shape, device="cuda", dtype=dtype)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, per_seq)
    lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")

    def contiguous(cache: torch.Tensor) -> torch.Tensor:
        dense = cache[tables.long()].view(batch, per_seq * block_size, KV_HEADS, HEAD_DIM)
        return dense[:, :ctx].transpose(1, 2).contiguous()

    return k_cache, v_cache, tables, lens, contiguous(k_cache), contiguous(v_cache)


def bench_decode(batch: int, ctx: int, block_size: int, dtype: torch.dtype, copy_bw: float,
                 num_splits: int | None = None) -> dict:
    k_cache, v_cache, tables, lens, k_dense, v_dense = _paged_kv(batch, ctx, block_size, dtype)
    q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    group = Q_HEADS // KV_HEADS

    def triton_fn():
        return triton_ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, SCALE,
                                                 num_splits=num_splits)

    # Decode's query heads of one KV head form a [group, D] block with no mask between them, so
    # SDPA can take them as `group` query rows: KV read once, no GQA expansion.
    q_sdpa = q.view(batch, KV_HEADS, group, HEAD_DIM)

    def sdpa_fn():
        return F.scaled_dot_product_attention(q_sdpa, k_dense, v_dense, scale=SCALE)

    err = float((triton_fn().float() - sdpa_fn().reshape(q.shape).float()).norm()
                / sdpa_fn().float().norm())
    t_eager, s_eager = _time_ms(triton_fn, graph=False), _time_ms(sdpa_fn, graph=False)
    t_ms, s_ms = _time_ms(triton_fn), _time_ms(sdpa_fn)
    kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
    splits = num_splits or decode_mod.choose_num_splits(batch, KV_HEADS, tables.shape[1] * block_size,
                                                        q.device)
    gbps = kv_bytes / t_ms / 1e6
    return {"batch": batch, "context": ctx, "block_size": block_size, "splits": splits,
            "triton_ms": t_ms, "sdpa_ms": s_ms, "kv_GBps": gbps, "pct_copy_bw": 100 * gbps / copy_bw,
            "sdpa_GBps": kv_bytes / s_ms / 1e6, "triton_over_sdpa": t_ms / s_ms,
            "bound_ms": kv_bytes / copy_bw / 1e6, "over_bound": t_ms / (kv_bytes / copy_bw / 1e6),
            "rel_err_vs_sdpa": err, "triton_eager_ms": t_eager, "sdpa_eager_ms": s_eager}


def bench_extend(batch: int, q_len: int, prefix: int, block_size: int, dtype: torch.dtype) -> dict:
    from torch.nn.attention.bias import causal_lower_right

    ctx = prefix + q_len
    k_cache, v_cache, tables, lens, k_dense, v_dense = _paged_kv(batch, ctx, block_size, dtype)
    q = torch.randn(batch * q_len, Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    cu = torch.arange(0, batch + 1, device="cuda", dtype=torch.int32) * q_len
    group = Q_HEADS // KV_HEADS

    def triton_fn():
        return triton_ops.paged_extend_attention(q, k_cache, v_cache, tables, cu, lens, SCALE,
                                                 max_q_len=q_len)

    q_sdpa = q.view(batch, q_len, Q_HEADS, HEAD_DIM).transpose(1, 2)
    k_full = k_dense.repeat_interleave(group, dim=1)
    v_full = v_dense.repeat_interleave(group, dim=1)
    mask = causal_lower_right(q_len, ctx)

    def sdpa_fn():
        return F.scaled_dot_product_attention(q_sdpa, k_full, v_full, attn_mask=mask, scale=SCALE)

    ref = sdpa_fn().transpose(1, 2).reshape(q.shape).float()
    err = float((triton_fn().float() - ref).norm() / ref.norm())
    t_ms, s_ms = _time_ms(triton_fn, graph=False), _time_ms(sdpa_fn, graph=False)
    pairs = q_len * prefix + q_len * (q_len + 1) // 2
    flops = 4 * HEAD_DIM * Q_HEADS * pairs * batch
    return {"batch": batch, "q_len": q_len, "prefix": prefix, "block_size": block_size,
            "triton_ms": t_ms, "sdpa_ms": s_ms, "triton_TFLOPs": flops / t_ms / 1e9,
            "sdpa_TFLOPs": flops / s_ms / 1e9, "triton_over_sdpa": t_ms / s_ms,
            "rel_err_vs_sdpa": err}


def split_check(dtype: torch.dtype, block_size: int) -> list[dict]:
    """Graph-replay time of decode forced to 1..32 splits on short contexts (at least 64 tokens a
    split): the evidence for decode.MIN_TOKENS_PER_SPLIT."""
    rows = []
    for batch, ctx in [(1, 512), (8, 512), (1, 1024), (8, 1024), (1, 2048), (8, 2048)]:
        k_cache, v_cache, tables, lens, _, _ = _paged_kv(batch, ctx, block_size, dtype)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        for splits in [s for s in (1, 2, 4, 8, 16, 32) if s <= ctx // 64]:
            ms = _time_ms(functools.partial(triton_ops.paged_decode_attention, q, k_cache, v_cache,
                                            tables, lens, SCALE, num_splits=splits))
            rows.append({"batch": batch, "context": ctx, "splits": splits, "triton_ms": ms})
    return rows


def sweep_decode(dtype: torch.dtype, block_size: int, copy_bw: float) -> list[dict]:
    """Time launch configs x split counts on the goal shapes (Triton only, one allocation per
    shape); prints every variant so the heuristics in kernels/triton_ops/decode.py can be set."""
    rows = []
    original = decode_mod._launch_config
    sms = decode_mod.num_sms(torch.device("cuda"))
    for batch, ctx in [(1, 32768), (1, 8192), (8, 2048), (8, 8192), (16, 4096), (128, 512)]:
        k_cache, v_cache, tables, lens, _, _ = _paged_kv(batch, ctx, block_size, dtype)
        q = torch.randn(batch, Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
        kv_bytes = batch * ctx * KV_HEADS * HEAD_DIM * 2 * k_cache.element_size()
        programs = batch * KV_HEADS
        base = decode_mod.choose_num_splits(batch, KV_HEADS, ctx, q.device)
        candidates = {1, base, sms // programs, 2 * sms // programs, 3 * sms // programs}
        for splits in sorted(c for c in candidates if 1 <= c <= ctx // 128):
            for block_n, warps, stages in [(64, 4, 3), (64, 4, 4), (128, 4, 2), (128, 4, 3)]:
                cfg = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}
                decode_mod._launch_config = lambda *_a, c=cfg: c
                try:
                    ms = _time_ms(functools.partial(
                        triton_ops.paged_decode_attention, q, k_cache, v_cache, tables, lens,
                        SCALE, num_splits=splits))
                except Exception as exc:  # noqa: BLE001 - a config may not compile
                    print("failed", cfg, type(exc).__name__)
                    continue
                finally:
                    decode_mod._launch_config = original
                pct = 100 * kv_bytes / ms / 1e6 / copy_bw
                rows.append({"batch": batch, "context": ctx, "splits": splits, **cfg, "ms": ms,
                             "pct_copy_bw": pct})
                print(f"sweep B={batch:4d} L={ctx:6d} splits={splits:3d} {cfg} {ms:.4f} ms "
                      f"{pct:.1f}%")
    return rows


def sweep_extend(dtype: torch.dtype, block_size: int) -> list[dict]:
    """Time extend tile shapes on a 4 x 2048-token batch, with and without a 4k cached prefix."""
    rows = []
    original = extend_mod._launch_config
    for cfg in [{"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
                {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 4},
                {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 2},
                {"BLOCK_M": 64, "BLOCK_N": 32, "num_warps": 4, "num_stages": 3},
                {"BLOCK_M": 128, "BLOCK_N": 32, "num_warps": 8, "num_stages": 3}]:
        extend_mod._launch_config = lambda *_a, c=cfg: c
        try:
            for prefix in (0, 4096):
                r = bench_extend(4, 2048, prefix, block_size, dtype)
                rows.append({**cfg, **r})
                print(f"sweep extend prefix={prefix} {cfg} {r['triton_ms']:.3f} ms "
                      f"{r['triton_TFLOPs']:.1f} TFLOP/s")
        except Exception as exc:  # noqa: BLE001 - a config may not fit in shared memory
            print("failed", cfg, type(exc).__name__)
        finally:
            extend_mod._launch_config = original
    return rows


def print_tables(result: dict) -> None:
    print(f"\ndevice: {result['device']}  copy bandwidth: {result['copy_GBps']:.0f} GB/s "
          f"(read+write)  dtype {result['dtype']}  block_size {result['block_size']}")
    print("\nDecode (32 q heads, 8 kv heads, head_dim 128)")
    print(f"{'batch':>5} {'context':>7} {'splits':>6} {'triton ms':>10} {'GB/s':>7} {'% copy':>6} "
          f"{'sdpa ms':>9} {'tri/sdpa':>8} {'x bound':>7} {'eager ms':>9} {'sdpa eager':>10} "
          f"{'rel err':>8}")
    for r in result["decode"]:
        print(f"{r['batch']:>5} {r['context']:>7} {r['splits']:>6} {r['triton_ms']:>10.4f} "
              f"{r['kv_GBps']:>7.0f} {r['pct_copy_bw']:>6.1f} {r['sdpa_ms']:>9.4f} "
              f"{r['triton_over_sdpa']:>8.3f} {r['over_bound']:>7.2f} {r['triton_eager_ms']:>9.4f} "
              f"{r['sdpa_eager_ms']:>10.4f} {r['rel_err_vs_sdpa']:>8.1e}")
    if result.get("decode_split_check"):
        print("\nDecode forced split counts (graph replay ms)")
        for r in result["decode_split_check"]:
            print(f"{r['batch']:>5} {r['context']:>7} {r['splits']:>6} {r['triton_ms']:>10.4f}")
    print("\nExtend (causal chunk over a paged prefix)")
    print(f"{'batch':>5} {'q_len':>6} {'prefix':>6} {'triton ms':>10} {'TFLOP/s':>8} "
          f"{'sdpa TFLOP/s':>12} {'tri/sdpa':>8} {'rel err':>8}")
    for r in result["extend"]:
        print(f"{r['batch']:>5} {r['q_len']:>6} {r['prefix']:>6} {r['triton_ms']:>10.3f} "
              f"{r['triton_TFLOPs']:>8.1f} {r['sdpa_TFLOPs']:>12.1f} {r['triton_over_sdpa']:>8.3f} "
              f"{r['rel_err_vs_sdpa']:>8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_kernels.json", help="JSON results path")
    parser.add_argument("--quick", action="store_true", help="a few shapes only (smoke test)")
    parser.add_argument("--sweep", action="store_true", help="only sweep launch configs (tuning)")
    parser.add_argument("--block-size", type=int, default=16)
    args = parser.parse_args()
    assert torch.cuda.is_available(), "bench/triton_kernels.py needs a CUDA GPU"
    dtype = torch.bfloat16
    copy_bw = copy_bandwidth_gbps()
    if args.sweep:  # tuning run: sweeps only
        sweep = {"copy_GBps": copy_bw, "decode": sweep_decode(dtype, args.block_size, copy_bw),
                 "extend": sweep_extend(dtype, args.block_size)}
        with open(args.out, "w") as f:
            json.dump(sweep, f, indent=1)
        return
    batches, contexts = ([1, 32], [2048, 32768]) if args.quick else ([1, 8, 32, 128],
                                                                    [512, 2048, 8192, 32768])
    result = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
        "dtype": "bfloat16", "block_size": args.block_size, "copy_GBps": copy_bw,
        "decode": [bench_decode(b, c, args.block_size, dtype, copy_bw)
                   for b in batches for c in contexts],
        "decode_split_check": [] if args.quick else split_check(dtype, args.block_size),
        "extend": [bench_extend(b, q, p, args.block_size, dtype)
                   for (b, q) in ([(4, 2048)] if args.quick else [(4, 512), (4, 2048), (1, 8192)])
                   for p in (0, 4096)],
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print_tables(result)


if __name__ == "__main__":
    main()
