"""The compiled CPU paged decode (``csrc/paged_decode.c``): built on first use, loaded by ctypes
(:mod:`kernels.c_library`).

Decode attention on a CPU is bound by memory traffic; the C kernel reads each cached key and
value once, where the torch path gathers them into a copy first. ``PAGEWIRE_CPU_DECODE=0`` turns
it off.

:func:`load` returns None when there is no compiler or the build fails; callers then use the
torch path. The kernel handles fp32 and bf16 caches with fp32 or bf16 queries, up to 64 query
heads and head dims up to 256; :func:`supports` says whether a call fits.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import Tensor

from kernels import c_library, cpu_attention

# The reductions may reorder and products fuse into FMAs (they vectorise, in 512-bit registers;
# results stay within 1e-6 of the reference).
FLAGS = [*c_library.BASE_FLAGS, "-funroll-loops", "-fassociative-math", "-fno-signed-zeros",
         "-freciprocal-math", "-ffp-contract=fast", "-mprefer-vector-width=512"]
_SYMBOLS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None where it cannot be built."""
    lib = c_library.load("paged_decode.c", FLAGS, "PAGEWIRE_CPU_DECODE")
    if lib is None:
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for name in _SYMBOLS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ptr, i64, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, ptr,
                       ctypes.c_int, i64, f32, ctypes.c_int]
    lib.store_kv_rows.restype = None
    lib.store_kv_rows.argtypes = [ptr, ptr, i64, ptr, ptr, ptr, i64, i64, ctypes.c_int]
    return lib


def supports(q: Tensor, k_cache: Tensor) -> bool:
    """Whether the kernel takes this call (else the caller uses the torch path)."""
    heads, kv_heads, dim = q.shape[1], k_cache.shape[2], k_cache.shape[3]
    return (
        q.device.type == "cpu"
        and k_cache.dtype in _SYMBOLS
        and heads % kv_heads == 0
        and heads <= 64
        and dim <= 256
        and load() is not None
    )


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, window: int | None = None, softcap: float | None = None,
) -> Tensor:
    """Same contract as :func:`kernels.reference.paged_decode_attention` (check :func:`supports`).

    A float32 or bfloat16 query is read where it lies (the strided view of the fused q/k/v
    projection the model passes: only its heads need be contiguous) and the output is written
    in its dtype, so a layer's call is one kernel, no conversions around it."""
    lib = load()
    assert lib is not None
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches are allocated contiguous"
    native = q.dtype in (torch.float32, torch.bfloat16)
    qk = q if native else q.float()
    if qk.stride(2) != 1 or qk.stride(1) != dim:
        qk = qk.contiguous()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((batch, heads, dim), dtype=qk.dtype)
    if batch:
        getattr(lib, _SYMBOLS[k_cache.dtype])(
            qk.data_ptr(), qk.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            tables.stride(0), lens.data_ptr(), batch, heads, kv_heads, dim, block_size,
            scale, out.data_ptr(), torch.get_num_threads(),  # the worker's --threads
            window or 0, softcap or 0.0,
            # a bf16 query (and output); bf16 keys may then meet it in bf16 products
            int(qk.dtype == torch.bfloat16),
        )
    return out if native else out.to(q.dtype)


def store_kv(key: Tensor, value: Tensor, k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor
             ) -> None:
    """kernels.cpu_attention.store_kv's contract (no -1 slot) in one call for both caches, for
    rows whose heads are contiguous (the fused projection's views) in the caches' dtype; other
    layouts go to the torch version."""
    lib = load()
    rows, row = key.shape[0], key[0].numel() if key.shape[0] else 0
    if (lib is None or key.dtype != k_cache.dtype or value.dtype != v_cache.dtype
            or not (k_cache.is_contiguous() and v_cache.is_contiguous())
            or key.stride() != value.stride() or slot_mapping.dtype != torch.int64
            or not slot_mapping.is_contiguous() or not rows
            or key[0].stride()[-1] != 1 or key.stride(1) * key.shape[1] != row):
        cpu_attention.store_kv(key, value, k_cache, v_cache, slot_mapping)
        return
    size = key.element_size()
    lib.store_kv_rows(key.data_ptr(), value.data_ptr(), key.stride(0) * size, k_cache.data_ptr(),
                      v_cache.data_ptr(), slot_mapping.data_ptr(), rows, row * size,
                      torch.get_num_threads())
