"""The compiled bfloat16 prefill attention of the CPU (``csrc/extend_amx.c``, AMX tiles): built on
first use, loaded by ctypes (:mod:`kernels.c_library`).

One chunk's queries against its keys, causal and optionally windowed, with K/V handed over
token-major: kernels.cpu_attention calls it per chunk in place of the fused torch attention,
with either the chunk's own new K/V rows or its cache rows gathered. It reads the query where
the projection left it and writes the output rows in place, so no layout copies surround it.
``PAGEWIRE_CPU_EXTEND=0`` turns it off; :func:`takes` says whether a call fits (bfloat16, head
dim 64 or 128, a CPU whose kernel may use AMX), else the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from kernels import c_library

FLAGS = [*c_library.BASE_FLAGS, "-mprefer-vector-width=512"]
HEAD_DIMS = (64, 128)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernel library where it builds and the OS lets the process use AMX; else None."""
    lib = c_library.load("extend_amx.c", FLAGS, "PAGEWIRE_CPU_EXTEND")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.extend_amx_init.restype, lib.extend_amx_init.argtypes = ctypes.c_int, []
    lib.extend_attention_bf16.restype = ctypes.c_int
    lib.extend_attention_bf16.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, i64,
                                          i64, ctypes.c_float, ptr, i64, ctypes.c_int]
    return lib if lib.extend_amx_init() else None


def takes(q: Tensor, head_dim: int) -> bool:
    return (q.dtype == torch.bfloat16 and q.device.type == "cpu" and head_dim in HEAD_DIMS
            and load() is not None)


def _token_major(x: Tensor) -> bool:
    """Heads and dims contiguous within a token (tokens may be further apart)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def attend(q: Tensor, k: Tensor, v: Tensor, q_offset: int, window: int | None, scale: float,
           out: Tensor) -> bool:
    """``out`` [n, heads, dim] = attention of ``q`` [n, heads, dim] over ``k``/``v`` [len,
    kv_heads, dim] (equal token strides), query row i at key position ``q_offset + i``; False
    (nothing written) where the kernel does not take the call."""
    lib = load()
    if (lib is None or not all(_token_major(t) for t in (q, k, v, out))
            or k.stride(0) != v.stride(0) or k.dtype != q.dtype or v.dtype != q.dtype
            or k.data_ptr() % 4 or k.stride(0) % 2):  # K is read as bf16 pairs
        return False
    n, heads, dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    return bool(lib.extend_attention_bf16(
        q.data_ptr(), q.stride(0), n, k.data_ptr(), v.data_ptr(), k.stride(0), length, heads,
        kv_heads, dim, q_offset, window or 0, scale, out.data_ptr(), out.stride(0),
        torch.get_num_threads()))
