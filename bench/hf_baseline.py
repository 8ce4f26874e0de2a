"""The transformers baseline: ``generate`` on the same request set, one request or a static batch.

    python bench/hf_baseline.py --model DIR --batch-sizes 1,8,32 --num-requests 64

This is what serving without a serving engine looks like: greedy ``generate`` in float32 on the
CPU, with ``min_new_tokens = max_new_tokens`` so EOS cannot end a request early. A static batch
is left-padded to its longest prompt (with an attention mask) and decodes until its longest
request is done; tokens past a request's own ``output_len`` are wasted work and are not counted,
so output tokens/s is "tokens the requests asked for, per second" for every mode, pagewire's
included. Batches take requests in their given order (no length sorting): arrival order.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from serving_data import BenchRequest, RequestSetSpec, make_requests, model_vocab_size
from tqdm import tqdm
from transformers import AutoModelForCausalLM, PreTrainedModel

PAD_ID = 2  # the test model's <pad>; any id works, the attention mask hides it


@dataclass
class HfRun:
    """One baseline mode over (a prefix of) the request set."""

    mode: str
    batch_size: int
    requests: int
    output_tokens: int
    generated_tokens: int
    padded_input_tokens: int
    wall_s: float
    # Output tokens/s of every repeat of this mode; the run itself is the median one.
    throughput_runs: list[float] = field(default_factory=list)

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "output_throughput": self.output_throughput}


def load_model(model_dir: str | Path, threads: int, dtype: str = "float32") -> PreTrainedModel:
    """Load in ``dtype`` (float32 by default, what the worker runs on a CPU) with ``threads``
    intra-op threads (the worker gets the same)."""
    if threads > 0:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    return model.eval()


def left_pad(batch: list[BenchRequest]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, every prompt right-aligned to the longest."""
    width = max(r.input_len for r in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        ids[i, width - r.input_len :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        mask[i, width - r.input_len :] = 1
    return ids, mask


@torch.inference_mode()
def generate_batch(model: PreTrainedModel, batch: list[BenchRequest]) -> int:
    """Run one static batch to its longest output; returns the tokens generated per row."""
    ids, mask = left_pad(batch)
    new = max(r.output_len for r in batch)
    out = model.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
        min_new_tokens=new, pad_token_id=PAD_ID,
    )
    produced = out.shape[1] - ids.shape[1]
    assert produced == new, f"generate produced {produced} tokens, asked for {new}"
    return produced


def run_mode(
    model: PreTrainedModel, requests: list[BenchRequest], batch_size: int, progress: bool = True
) -> HfRun:
    """Serve ``requests`` in consecutive static batches of ``batch_size``; time the whole set."""
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    generated = 0
    bar = tqdm(total=len(requests), desc=f"hf bs={batch_size}", unit="req",
               disable=not progress, leave=False)
    start = time.perf_counter()
    for batch in batches:
        generated += generate_batch(model, batch) * len(batch)
        bar.update(len(batch))
    wall = time.perf_counter() - start
    bar.close()
    return HfRun(
        mode="hf_single" if batch_size == 1 else f"hf_batch{batch_size}",
        batch_size=batch_size,
        requests=len(requests),
        output_tokens=sum(r.output_len for r in requests),
        generated_tokens=generated,
        padded_input_tokens=sum(len(b) * max(r.input_len for r in b) for b in batches),
        wall_s=wall,
    )


def warm_up(model: PreTrainedModel, requests: list[BenchRequest]) -> None:
    """One short batch so first-call costs (allocator, kernel selection) stay out of the timing."""
    generate_batch(model, [BenchRequest(r.prompt_ids[:16], 4) for r in requests[:2]])


def run_baseline(
    model_dir: str | Path,
    requests: list[BenchRequest],
    batch_sizes: list[int],
    threads: int,
    single_limit: int = 0,
    progress: bool = True,
    repeats: int = 1,
    dtype: str = "float32",
) -> list[HfRun]:
    """Every mode on the same requests, ``repeats`` times each, keeping the median run by tok/s.

    Batch size 1 may be capped to the first ``single_limit`` requests (it is by far the slowest).
    """
    model = load_model(model_dir, threads, dtype)
    warm_up(model, requests)
    runs = []
    for bs in batch_sizes:
        subset = requests[:single_limit] if bs == 1 and single_limit > 0 else requests
        tries = sorted((run_mode(model, subset, bs, progress) for _ in range(max(1, repeats))),
                       key=lambda r: r.output_throughput)
        median = tries[len(tries) // 2]
        median.throughput_runs = [r.output_throughput for r in tries]
        runs.append(median)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-sizes", default="1,8,32")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=272)
    p.add_argument("--input-len-range", type=float, default=0.88)
    p.add_argument("--output-len", type=int, default=80)
    p.add_argument("--output-len-range", type=float, default=0.6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--single-limit", type=int, default=0, help="cap batch-size-1 to N requests")
    p.add_argument("--repeats", type=int, default=1, help="runs per mode; the median is reported")
    p.add_argument("--out", default="bench_hf_baseline.json")
    args = p.parse_args()
    spec = RequestSetSpec(args.num_requests, args.input_len, args.output_len,
                          args.input_len_range, args.output_len_range, seed=args.seed)
    requests = make_requests(spec, model_vocab_size(args.model))
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    runs = run_baseline(args.model, requests, sizes, args.threads, args.single_limit,
                        repeats=args.repeats, dtype=args.dtype)
    for r in runs:
        print(f"{r.mode:<12} {r.requests:>4} req {r.output_tokens:>6} tok {r.wall_s:>8.2f} s "
              f"{r.output_throughput:>8.1f} tok/s")
    Path(args.out).write_text(json.dumps([r.to_json() for r in runs], indent=2))


if __name__ == "__main__":
    main()
