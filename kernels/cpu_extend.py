"""The compiled prefill attention of the CPU: built on first use, loaded by ctypes
(:mod:`kernels.c_library`). bfloat16 on AMX tiles (``csrc/extend_amx.c``), else in AVX-512 BF16
dot products (``csrc/extend_avx512bf16.c``: Zen 4 and 5), float32 on AVX2 + FMA
(``csrc/extend_f32.c``; AVX-512 CPUs run it too). On a CPU with neither bfloat16 kernel,
bfloat16 is widened to the float32 one (a copy of the chunk's Q/K/V in float32, the output
rounded back): torch's bfloat16 attention there took twice the float32 kernel's time.

One chunk's queries against its keys, causal and optionally windowed, with K/V handed over
token-major: kernels.cpu_attention calls it per chunk in place of the fused torch attention,
with either the chunk's own new K/V rows or its cache rows gathered. It reads the query where
the projection left it and writes the output rows in place, so no layout copies surround it.
``PAGEWIRE_CPU_EXTEND=0`` turns them all off; :func:`takes` says whether a call fits (its dtype's
kernel built for this CPU, a head dim it takes), else the torch path runs.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from kernels import c_library

SWITCH = "PAGEWIRE_CPU_EXTEND"
HEAD_DIMS = (64, 128)  # bfloat16 (AMX tiles)
F32_HEAD_DIMS = tuple(range(16, 257, 16))  # float32, and bfloat16 on AVX-512 BF16


def _declare(fn: ctypes._CFuncPtr) -> None:
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.restype = ctypes.c_int
    fn.argtypes = [ptr, i64, i64, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, ctypes.c_float,
                   ptr, i64, ctypes.c_int]


@functools.cache
def load() -> ctypes.CDLL | None:
    """The bfloat16 kernel library where it builds and the OS lets the process use AMX; else None."""
    lib = c_library.load("extend_amx.c", [*c_library.BASE_FLAGS, "-mprefer-vector-width=512"],
                         SWITCH)
    if lib is None:
        return None
    lib.extend_amx_init.restype, lib.extend_amx_init.argtypes = ctypes.c_int, []
    _declare(lib.extend_attention_bf16)
    return lib if lib.extend_amx_init() else None


@functools.cache
def load_avx512bf16() -> ctypes.CDLL | None:
    """The bfloat16 kernel library where this CPU has AVX-512 BF16; else None. It takes the calls
    the AMX kernel does not: all of them without AMX, other head dims (80, 256, ...) with it."""
    lib = c_library.load("extend_avx512bf16.c", [*c_library.BASE_FLAGS, "-mprefer-vector-width=512"],
                         SWITCH)
    if lib is None:
        return None
    lib.extend_avx512bf16_available.restype = ctypes.c_int
    lib.extend_avx512bf16_available.argtypes = []
    _declare(lib.extend_attention_avx512bf16)
    return lib if lib.extend_avx512bf16_available() else None


@functools.cache
def load_f32() -> ctypes.CDLL | None:
    """The float32 kernel library where it builds for this CPU (AVX2 + FMA); else None."""
    lib = c_library.load("extend_f32.c", c_library.BASE_FLAGS, SWITCH)
    if lib is None:
        return None
    lib.extend_f32_available.restype, lib.extend_f32_available.argtypes = ctypes.c_int, []
    _declare(lib.extend_attention_f32)
    return lib if lib.extend_f32_available() else None


def _kernel(dtype: torch.dtype, head_dim: int) -> tuple[ctypes._CFuncPtr, bool] | None:
    """The kernel for ``dtype`` and whether it runs widened to float32; None: torch's path."""
    if dtype == torch.bfloat16 and head_dim in HEAD_DIMS and (lib := load()) is not None:
        return lib.extend_attention_bf16, False
    if dtype == torch.bfloat16 and head_dim in F32_HEAD_DIMS and (
            lib := load_avx512bf16()) is not None:
        return lib.extend_attention_avx512bf16, False
    if dtype in (torch.float32, torch.bfloat16) and head_dim in F32_HEAD_DIMS and (
            lib := load_f32()) is not None:
        return lib.extend_attention_f32, dtype != torch.float32
    return None


def takes(q: Tensor, head_dim: int) -> bool:
    return q.device.type == "cpu" and _kernel(q.dtype, head_dim) is not None


def _token_major(x: Tensor) -> bool:
    """Heads and dims contiguous within a token (tokens may be further apart)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def attend(q: Tensor, k: Tensor, v: Tensor, q_offset: int, window: int | None, scale: float,
           out: Tensor) -> bool:
    """``out`` [n, heads, dim] = attention of ``q`` [n, heads, dim] over ``k``/``v`` [len,
    kv_heads, dim] (equal token strides), query row i at key position ``q_offset + i``; False
    (nothing written) where the kernel does not take the call."""
    n, heads, dim = q.shape
    found = _kernel(q.dtype, dim)
    if (found is None or not all(_token_major(t) for t in (q, k, v, out))
            or k.stride(0) != v.stride(0) or k.dtype != q.dtype or v.dtype != q.dtype
            or out.dtype != q.dtype):
        return False
    kernel, widened = found
    if widened:  # contiguous float32 copies (token-major, K and V alike); the result rounded into out
        q32, k32, v32 = (t.to(torch.float32, memory_format=torch.contiguous_format)
                         for t in (q, k, v))
        wide = torch.empty(n, heads, dim)
        if not _attend_with(kernel, q32, k32, v32, q_offset, window, scale, wide):
            return False
        out.copy_(wide)
        return True
    if q.dtype == torch.bfloat16 and (k.data_ptr() % 4 or k.stride(0) % 2):
        return False  # bfloat16 K is read as pairs
    return _attend_with(kernel, q, k, v, q_offset, window, scale, out)


def _attend_with(kernel: ctypes._CFuncPtr, q: Tensor, k: Tensor, v: Tensor, q_offset: int,
                window: int | None, scale: float, out: Tensor) -> bool:
    n, heads, dim = q.shape
    length, kv_heads = k.shape[0], k.shape[1]
    return bool(kernel(
        q.data_ptr(), q.stride(0), n, k.data_ptr(), v.data_ptr(), k.stride(0), length, heads,
        kv_heads, dim, q_offset, window or 0, scale, out.data_ptr(), out.stride(0),
        torch.get_num_threads()))
