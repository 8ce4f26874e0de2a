"""Projection weights pre-packed for oneDNN on the CPU, in bfloat16 and float32.

A bfloat16 ``F.linear`` on the CPU hands oneDNN a plain row-major weight, which it re-lays into
the AMX tile layout on every call: at decode batch sizes that reorder costs about as much as the
product itself, so bfloat16 decoding was no faster than float32 (measured, docs/BENCHMARKS.md).
Packing each projection once at start-up, as vLLM's CPU backend and torch.compile's freezing pass
do, removes it; the products are the same oneDNN kernels with fp32 accumulation, so the results
equal the unpacked ones. A float32 ``F.linear`` goes to MKL's sgemm, which is slow at a few rows
(2 rows cost twice 1 row); oneDNN's product over a packed float32 weight is 1.4-3.4x faster over a
layer's projections at 2-64 rows, equal at 1 and 256, 10 % slower at 2,048 (measured on an AVX2
CPU, docs/BENCHMARKS.md): keeping both layouts would double the weights' memory, and decode steps
are most of a server's. It sums in another order
than MKL, so float32 results differ from plain ``F.linear`` by rounding, not more (strict fp32:
no reduced-precision math mode). The packed tensor replaces the plain weight (no second copy is
kept), except where the embedding shares it (tied ``lm_head``): that one stays plain. Decode
batches' products read the packed buffer through kernels/cpu_linear.py instead where it has a
kernel for this CPU and layout (AVX-512 without AMX: float32 up to 128 rows, bfloat16 up to 256,
tasks handed out dynamically where oneDNN splits a product statically; AVX2: float32, 1-3 rows,
at the rate the cores stream memory, where oneDNN's product reads it at about half that), and so
do short prefill chunks of up to as many rows.

Where oneDNN has no bfloat16 kernels (AVX2-only CPUs), a bfloat16 ``F.linear`` runs a reference
loop whose time grows with every row (measured on an AMD EPYC: 2,048 rows of a 512 x 2,816
projection 308 ms, float32 33 ms); there :class:`WidenedLinear` computes products of more than a
few rows in float32 instead.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kernels import cpu_linear
from kernels.row_buckets import EXACT_UP_TO, bucket_rows, padded

# oneDNN keeps the products it has built in one process-wide cache, 1,024 entries by default, read
# once at its first product. Each row count of each projection shape takes two (the product and
# the matmul inside it): the small test model's 5 shapes x 144 row counts of steps of up to
# 2,048 tokens need 1,440, and at the default a warm-up (or a long-running server) evicted the
# decode batches' products to rebuild them mid-step (measured with oneDNN's verbose log). Set
# when this module is imported, before any weight is packed; an explicit setting wins.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

_LINEAR = torch.ops.mkldnn._linear_pointwise.default


def can_pack(device: torch.device, dtype: torch.dtype) -> bool:
    """float32, or bfloat16 where oneDNN has bfloat16 kernels (AVX-512 BF16 or AMX), on a CPU."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    return dtype == torch.float32 or (dtype == torch.bfloat16
                                      and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()))


def widens(device: torch.device, dtype: torch.dtype) -> bool:
    """bfloat16 on a CPU whose oneDNN has no bfloat16 kernels."""
    return device.type == "cpu" and dtype == torch.bfloat16 and not can_pack(device, dtype)


WIDEN_FROM_ROWS = 8  # below, the bfloat16 product reads half the bytes and is as fast or faster


class WidenedLinear(nn.Module):
    """A bfloat16 ``nn.Linear`` that runs products of :data:`WIDEN_FROM_ROWS` rows or more in
    float32: inputs and weight widened (exactly), summed in float32 as a bfloat16 product is,
    the output rounded to bfloat16 once. The weight stays bfloat16 (its widened copy lives for
    one call), so the model keeps bfloat16's memory. On an AMD EPYC (AVX2): 1.8-9x faster than the
    bfloat16 product from 16 rows on, 2-4x slower at one row (docs/BENCHMARKS.md)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.weight = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() < WIDEN_FROM_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x.float(), self.weight.float(), bias).to(self.dtype)


class PackedLinear(nn.Module):
    """``nn.Linear``'s forward over a weight packed once by oneDNN."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        # decode batches' products read this same buffer through kernels/cpu_linear.py where
        # that has a kernel for this CPU and layout
        self.blocked = cpu_linear.blocked(linear.weight.detach(), self.weight)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2 and x.shape[0] <= EXACT_UP_TO:  # a decode batch: one call, nothing around it
            if self.blocked is not None:
                out = cpu_linear.product(x, self.blocked, self.bias)
                if out is not None:
                    return out
            return _LINEAR(x, self.weight, self.bias, "none", [], "")
        flat = x.reshape(-1, self.in_features)
        rows = flat.shape[0]
        out = None if self.blocked is None else cpu_linear.product(flat, self.blocked, self.bias)
        if out is None:
            run_rows = bucket_rows(rows)  # kernels/row_buckets.py: why, and where the rows come from
            if run_rows != rows:
                flat = padded(flat, run_rows)
            out = _LINEAR(flat, self.weight, self.bias, "none", [], "")[:rows]
        return out.view(*x.shape[:-1], self.out_features)


def pack_linears(model: nn.Module, kind: type[nn.Module] = PackedLinear) -> int:
    """Swap every ``nn.Linear`` of ``model`` whose weight it owns for a ``kind`` (a
    :class:`PackedLinear` or :class:`WidenedLinear`); return how many were swapped."""
    shared = {id(p) for name, p in model.named_parameters() if "embed" in name}
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and id(child.weight) not in shared
    ]
    for parent, name, child in swaps:
        setattr(parent, name, kind(child))
    return len(swaps)


def warm(model: nn.Module, max_rows: int, budget_s: float) -> list[int]:
    """Run each distinct packed projection of ``model`` once at every row count a step of up to
    ``max_rows`` tokens runs it at (kernels/row_buckets.py), smallest first, until ``budget_s``
    seconds have passed; the row counts done.

    oneDNN builds a product the first time it sees its shape, ~2 ms each (measured: 144 row
    counts x 5 shapes of the small test model, 1.9 s first calls against 0.5 s again), and a
    fresh worker's first requests met all of them in their steps: served, each first request of
    a new size took 10-18 ms longer than the same size later, and none does after the warm-up
    (docs/BENCHMARKS.md). A product's arithmetic does not depend
    on when it was built, so stopping at the budget changes only how soon, never what, a step
    computes; on a large model, where one product's run outweighs its build, the budget ends the
    warm-up early."""
    shapes = {}
    for m in model.modules():
        if isinstance(m, PackedLinear):
            shapes.setdefault((m.in_features, m.out_features, m.bias is None), m)
    if not shapes:
        return []
    counts = sorted({bucket_rows(r) for r in range(1, max_rows + 1)})
    deadline, done = time.monotonic() + budget_s, []
    with torch.inference_mode():
        for rows in counts:
            if time.monotonic() >= deadline:
                break
            for m in shapes.values():
                m(torch.zeros(rows, m.in_features, dtype=m.dtype))
            done.append(rows)
    return done
