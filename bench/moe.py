"""MoE feed-forward on the CPU: pagewire's grouped experts against transformers' own MoE block.

    python bench/moe.py --tokens 1,16,64 --out moe.json

One sparse layer of Qwen3-MoE shape (``--experts`` experts, top ``--top-k``, renormalised),
the same random weights in both: transformers' ``Qwen3MoeSparseMoeBlock`` (the oracle; its
expert loop indexes tokens per expert) and ``worker_svc.models.moe.SparseMoeBlock`` (routing,
then :func:`kernels.moe.grouped_moe`). The two alternate, round after round, so a noisy machine
slows them alike; the median round gives tokens/s per batch size. Outputs are checked equal
(fp32, 1e-5 relative) before anything is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

from worker_svc.models.config import ModelConfig, MoeConfig
from worker_svc.models.moe import SparseMoeBlock


def blocks(args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """transformers' block with random weights, and ours holding the same ones."""
    hf_cfg = Qwen3MoeConfig(hidden_size=args.hidden, moe_intermediate_size=args.inter,
                            num_experts=args.experts, num_experts_per_tok=args.top_k,
                            norm_topk_prob=True)
    torch.manual_seed(0)
    hf = Qwen3MoeSparseMoeBlock(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    cfg = ModelConfig(vocab_size=1, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=1, num_attention_heads=1, num_key_value_heads=1,
                      head_dim=args.hidden, rms_norm_eps=1e-6, max_position_embeddings=1,
                      tie_word_embeddings=False, layer_types=("full_attention",),
                      moe=MoeConfig(args.experts, args.top_k, args.inter, True, (True,)))
    ours = SparseMoeBlock(cfg).eval()
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.w_gate_up.copy_(hf.experts.gate_up_proj)
        ours.w_down.copy_(hf.experts.down_proj)
    return hf, ours


def timed(fn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="1,16,64")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default="moe.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    hf, ours = blocks(args)
    hf_fn = lambda x: hf(x[None])[0]  # noqa: E731  (transformers takes [batch, seq, hidden])
    rows = []
    with torch.inference_mode():
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, args.hidden)
            want, got = hf_fn(x), ours(x)
            err = float((got - want).norm() / want.norm())
            assert err < 1e-5, f"outputs differ at {n} tokens: {err:.2e}"
            times: dict[str, list[float]] = {"transformers": [], "pagewire": []}
            for _ in range(args.rounds):
                times["transformers"].append(timed(hf_fn, x))
                times["pagewire"].append(timed(ours, x))
            med = {k: statistics.median(v) for k, v in times.items()}
            rows.append({"tokens": n, "rel_err": err,
                         **{f"{k}_tok_s": n / v for k, v in med.items()},
                         "speedup": med["transformers"] / med["pagewire"]})
    print(f"{'tokens':>6} {'transformers tok/s':>19} {'pagewire tok/s':>15} {'speedup':>8}")
    for r in rows:
        print(f"{r['tokens']:>6} {r['transformers_tok_s']:>19.0f} {r['pagewire_tok_s']:>15.0f} "
              f"{r['speedup']:>7.2f}x")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
