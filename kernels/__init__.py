"""Paged attention kernels: Triton for CUDA, torch for CPU, and a plain-torch reference.

The worker picks a backend once with :func:`get_backend` and calls its three functions; all
backends share the signatures of :mod:`kernels.reference`:

- ``triton``: the Triton kernels (:mod:`kernels.triton_ops`), the default on CUDA;
- ``cpu``: the default on CPU -- decode by the compiled kernel of :mod:`kernels.cpu_decode`
  (reads each cached K/V once; built on first use with the system C compiler), prefill chunks
  by :mod:`kernels.cpu_attention`; where the kernel cannot be built, exactly ``torch``;
- ``torch``: :mod:`kernels.cpu_attention` alone -- fused SDPA over K/V gathered token by token,
  pure torch, any device;
- ``reference``: :mod:`kernels.reference`, written to be obviously right, not fast; the oracle of
  every other backend's tests, selectable to rule a backend out when outputs look wrong.

Triton is imported only when the Triton backend is asked for, so CPU-only installs never need it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels import cpu_attention, cpu_decode, cpu_extend, reference
from kernels.reference import paged_decode_attention, paged_extend_attention, write_kv

__all__ = [
    "AttentionBackend",
    "BACKEND_NAMES",
    "default_backend_name",
    "get_backend",
    "paged_decode_attention",
    "paged_extend_attention",
    "write_kv",
]

BACKEND_NAMES = ("cpu", "torch", "triton", "reference")


@dataclass(frozen=True)
class AttentionBackend:
    """The three attention operations one backend provides (see kernels.reference for contracts)."""

    name: str
    write_kv: Callable[..., None]
    decode: Callable[..., torch.Tensor]
    extend: Callable[..., torch.Tensor]
    # Per-step layout work shared by every layer: plan_decode(block_tables, context_lens, k_cache)
    # and plan_extend(block_tables, cu_seqlens_q, context_lens, k_cache). A backend that has them
    # takes decode(..., plan=) and extend(..., plan=, new_kv=(k, v) of the chunks' own tokens).
    plan_decode: Callable[..., object] | None = None
    plan_extend: Callable[..., object] | None = None
    # write_kv for a slot mapping its caller knows holds no -1 (None: write_kv does for all).
    store_kv: Callable[..., None] | None = None


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name`` (one of BACKEND_NAMES); raises ValueError for any other name."""
    if name == "cpu" and cpu_decode.load() is not None:
        cpu_extend.load()  # built (once per machine) when the worker starts, not at its first prefill
        c = cpu_attention
        return AttentionBackend("cpu", c.write_kv, _cpu_decode, c.paged_extend_attention,
                                None, c.plan_extend, cpu_decode.store_kv)
    if name in ("torch", "cpu"):
        c = cpu_attention
        return AttentionBackend("torch", c.write_kv, c.paged_decode_attention,
                                c.paged_extend_attention, c.plan_decode, c.plan_extend, c.store_kv)
    if name == "reference":
        return AttentionBackend("reference", reference.write_kv, reference.paged_decode_attention,
                                reference.paged_extend_attention)
    if name == "triton":
        from kernels import triton_ops  # imports triton; fails clearly if it is not installed

        return AttentionBackend(
            "triton", triton_ops.write_kv, triton_ops.paged_decode_attention,
            triton_ops.paged_extend_attention,
        )
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def _cpu_decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, scale: float, window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """The compiled decode where it takes the call (dtype, head counts), else the torch path."""
    args = (q, k_cache, v_cache, block_tables, context_lens, scale)
    if cpu_decode.supports(q, k_cache):
        return cpu_decode.paged_decode_attention(*args, window, softcap)
    return cpu_attention.paged_decode_attention(*args, window=window, softcap=softcap)


def default_backend_name(device: torch.device) -> str:
    """"triton" on a CUDA device when triton is importable, "torch" on other accelerators, else
    "cpu"."""
    kind = torch.device(device).type
    if kind == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "cpu" if kind == "cpu" else "torch"
