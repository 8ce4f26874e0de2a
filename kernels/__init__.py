"""Paged attention kernels: Triton for CUDA, plain torch for CPU (and as the tests' oracle).

The worker picks a backend once with :func:`get_backend` and calls its three functions; both backends
share the signatures of :mod:`kernels.reference`. Triton is imported only when the Triton backend is
asked for, so CPU-only installs never need it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

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

BACKEND_NAMES = ("torch", "triton")


@dataclass(frozen=True)
class AttentionBackend:
    """The three attention operations one backend provides (see kernels.reference for contracts)."""

    name: str
    write_kv: Callable[..., None]
    decode: Callable[..., torch.Tensor]
    extend: Callable[..., torch.Tensor]


def get_backend(name: str) -> AttentionBackend:
    """The backend called ``name`` ("torch" or "triton"); raises ValueError for any other name."""
    if name == "torch":
        return AttentionBackend("torch", write_kv, paged_decode_attention, paged_extend_attention)
    if name == "triton":
        from kernels import triton_ops  # imports triton; fails clearly if it is not installed

        return AttentionBackend(
            "triton", triton_ops.write_kv, triton_ops.paged_decode_attention,
            triton_ops.paged_extend_attention,
        )
    raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(BACKEND_NAMES)}")


def default_backend_name(device: torch.device) -> str:
    """"triton" on a CUDA device when triton is importable, else "torch"."""
    if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") is not None:
        return "triton"
    return "torch"
