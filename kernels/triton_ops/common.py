"""Small helpers shared by the Triton wrappers: shape checks, device facts, score soft-capping."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def softcap_log2(s, scale_log2, softcap):
    """Raw q.k products to soft-capped scores in the log2 domain the kernels' softmax uses:
    ``log2(e) * softcap * tanh(s * scale / softcap)``; tanh as ``1 - 2 / (exp(2x) + 1)``, which
    saturates cleanly at both ends (tanh has no portable tl builtin)."""
    x = s * (scale_log2 / 1.4426950408889634) / softcap
    return (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)) * softcap * 1.4426950408889634


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton tile extents must be powers of two)."""
    return 1 << max(0, (n - 1).bit_length())


def last_dim_contiguous(x: Tensor) -> Tensor:
    """The kernels assume unit stride along head_dim; views such as q/k/v slices of a fused
    projection already have it, so a copy happens only for unusual inputs."""
    return x if x.stride(-1) == 1 else x.contiguous()


def check_head_dim(head_dim: int) -> None:
    """Head dims must be a power of two in 16..256: tile extents and tl.dot's minimum of 16."""
    if head_dim < 16 or head_dim > 256 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two in 16..256, got {head_dim}")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (tests on machines without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in on CPU (interpreter)."""
    if device.type != "cuda":
        return 4
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
