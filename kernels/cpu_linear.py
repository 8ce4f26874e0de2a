"""Products of one to three rows against a float32 weight packed by oneDNN
(``csrc/small_rows.c``): decode batches that small read the weight from memory at the rate the
cores can stream it, where oneDNN's own product reads it at about half that (docs/BENCHMARKS.md).

The kernel reads oneDNN's packed buffer in place, so the weight has one copy: :func:`blocked`
checks, once per weight at start-up, that the buffer is in the layout the kernel expects (blocks
of 64 output columns, each [Kp][64]; what oneDNN chooses for float32 on an AVX2 CPU), and
returns where it is; a weight in any other layout keeps oneDNN's product at every row count.
``PAGEWIRE_CPU_SMALL_ROWS=0`` turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import c_library

FLAGS = [*c_library.BASE_FLAGS, "-mprefer-vector-width=256"]
MAX_ROWS = 3  # at 4 rows oneDNN's product is as fast (measured on an AVX2 CPU)
BLOCK = 64  # output columns per packed block


@functools.cache
def load() -> ctypes.CDLL | None:
    lib = c_library.load("small_rows.c", FLAGS, "PAGEWIRE_CPU_SMALL_ROWS")
    if lib is None:
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.small_rows_f32.restype = ctypes.c_int
    lib.small_rows_f32.argtypes = [ptr, i64, i64, ptr, i64, i64, i64, ptr, ptr, i64, ctypes.c_int]
    return lib


@dataclass(frozen=True)
class BlockedWeight:
    """Where a packed float32 weight's blocks are: valid while its packed tensor lives."""

    address: int
    out_features: int
    in_features: int
    padded_in: int  # Kp: rows of each block


def blocked(plain: Tensor, packed: Tensor) -> BlockedWeight | None:
    """The packed buffer of ``plain`` [N, K] (float32) if it holds exactly the blocked layout,
    padding zero; None otherwise (another layout, another dtype, no kernel)."""
    if plain.dtype != torch.float32 or load() is None:
        return None
    try:
        address = int(torch.ops.mkldnn.data_ptr(packed))
        nbytes = int(torch.ops.mkldnn._nbytes(packed))
    except (AttributeError, RuntimeError):
        return None
    n, k = plain.shape
    blocks = -(-n // BLOCK)
    padded_in, rest = divmod(nbytes // 4, blocks * BLOCK)
    if rest or nbytes % 4 or padded_in < k:
        return None
    expected = torch.zeros(blocks * BLOCK, padded_in)
    expected[:n, :k] = plain
    expected = expected.view(blocks, BLOCK, padded_in).transpose(1, 2).contiguous()
    raw = (ctypes.c_float * (nbytes // 4)).from_address(address)
    if not torch.equal(torch.frombuffer(raw, dtype=torch.float32).view_as(expected), expected):
        return None
    return BlockedWeight(address, n, k, padded_in)


def product(x: Tensor, w: BlockedWeight, bias: Tensor | None) -> Tensor | None:
    """x [rows, K] (float32, rows <= MAX_ROWS, unit column stride) times the weight, plus bias;
    None where the call is not the kernel's (the caller runs oneDNN's)."""
    rows = x.shape[0]
    if not (0 < rows <= MAX_ROWS and x.dtype == torch.float32 and x.stride(1) == 1):
        return None
    lib = load()
    out = torch.empty(rows, w.out_features)
    done = lib is not None and lib.small_rows_f32(
        x.data_ptr(), x.stride(0), rows, w.address, w.out_features, w.in_features, w.padded_in,
        None if bias is None else bias.data_ptr(), out.data_ptr(), w.out_features,
        torch.get_num_threads())
    return out if done else None
