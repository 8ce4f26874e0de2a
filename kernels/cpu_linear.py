"""Decode batches' products against a weight packed by oneDNN, read in place.

- float32, one to three rows (``csrc/small_rows.c``): decode batches that small read the weight
  from memory at the rate the cores can stream it, where oneDNN's own product reads it at about
  half that (measured on an AVX2 CPU).
- bfloat16, one to 64 rows, on CPUs with AVX-512 BF16 (``csrc/rows_bf16.c``): 1.05-1.8x
  oneDNN's product alone, and its tasks are handed out dynamically where oneDNN splits a product
  statically, so a core a neighbour takes for a moment no longer stalls the whole product
  (docs/BENCHMARKS.md).

Both read oneDNN's packed buffer, so the weight has one copy: :func:`blocked` checks, once per
weight at start-up, that the buffer is in the layout the kernel expects (blocks of 64 output
columns, each [Kp][64] in float32 — what oneDNN chooses on an AVX2 CPU — or [K / 2][64][2] in
bfloat16, k-pairs side by side, on an AVX-512 BF16 CPU without AMX), and returns where it is; a
weight in any other layout keeps oneDNN's product at every row count.
``PAGEWIRE_CPU_SMALL_ROWS=0`` turns both kernels off.
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import c_library
from kernels.row_buckets import EXACT_UP_TO

FLAGS = [*c_library.BASE_FLAGS, "-mprefer-vector-width=256"]
SWITCH = "PAGEWIRE_CPU_SMALL_ROWS"
# Rows each kernel takes: float32, oneDNN's product is as fast from 4 rows (measured on an AVX2
# CPU); bfloat16, every decode batch's count (prefill steps' rows are oneDNN's, blocked for them).
MAX_ROWS = {torch.float32: 3, torch.bfloat16: EXACT_UP_TO}
BLOCK = 64  # output columns per packed block
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


@functools.cache
def load() -> ctypes.CDLL | None:
    """The float32 kernel."""
    lib = c_library.load("small_rows.c", FLAGS, SWITCH)
    if lib is None:
        return None
    lib.small_rows_f32.restype = ctypes.c_int
    lib.small_rows_f32.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _I64, _PTR, _PTR, _I64,
                                   ctypes.c_int]
    return lib


@functools.cache
def load_bf16() -> ctypes.CDLL | None:
    """The bfloat16 kernel, where this CPU has AVX-512 BF16 (its build answers 0 elsewhere)."""
    lib = c_library.load("rows_bf16.c", c_library.BASE_FLAGS, SWITCH)
    if lib is None:
        return None
    lib.rows_bf16.restype = ctypes.c_int
    lib.rows_bf16.argtypes = [_PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int]
    probe = torch.ones(1, 2, dtype=torch.bfloat16)
    out = torch.zeros(1, BLOCK, dtype=torch.bfloat16)
    weight = torch.ones(BLOCK * 2, dtype=torch.bfloat16)
    if not lib.rows_bf16(probe.data_ptr(), 2, 1, weight.data_ptr(), BLOCK, 2, None,
                         out.data_ptr(), BLOCK, 1) or not bool((out == 2).all()):
        return None
    return lib


def _library(dtype: torch.dtype) -> ctypes.CDLL | None:
    if dtype == torch.float32:
        return load()
    return load_bf16() if dtype == torch.bfloat16 else None


@dataclass(frozen=True)
class BlockedWeight:
    """Where a packed weight's blocks are: valid while its packed tensor lives."""

    address: int
    out_features: int
    in_features: int
    padded_in: int  # Kp: rows of each block
    dtype: torch.dtype = torch.float32


def _expected_layout(plain: Tensor, padded_in: int) -> Tensor:
    """``plain`` [N, K] as the kernel reads it: [blocks][Kp][64] in float32, [blocks][Kp / 2][64][2]
    in bfloat16, padding zero."""
    n, k = plain.shape
    blocks = -(-n // BLOCK)
    full = torch.zeros(blocks * BLOCK, padded_in, dtype=plain.dtype)
    full[:n, :k] = plain
    if plain.dtype == torch.float32:
        return full.view(blocks, BLOCK, padded_in).transpose(1, 2).contiguous()
    return full.view(blocks, BLOCK, padded_in // 2, 2).permute(0, 2, 1, 3).contiguous()


def blocked(plain: Tensor, packed: Tensor) -> BlockedWeight | None:
    """The packed buffer of ``plain`` [N, K] if it holds exactly the kernel's layout for its dtype,
    padding zero (bfloat16: none, K even); None otherwise (another layout or dtype, no kernel)."""
    if _library(plain.dtype) is None:
        return None
    try:
        address = int(torch.ops.mkldnn.data_ptr(packed))
        nbytes = int(torch.ops.mkldnn._nbytes(packed))
    except (AttributeError, RuntimeError):
        return None
    n, k = plain.shape
    size = plain.element_size()
    padded_in, rest = divmod(nbytes // size, -(-n // BLOCK) * BLOCK)
    if rest or nbytes % size or padded_in < k:
        return None
    if plain.dtype == torch.bfloat16 and (padded_in != k or k % 2):
        return None  # the kernel reads k-pairs of the rows as they are: no padding to read
    expected = _expected_layout(plain, padded_in)
    raw = (ctypes.c_uint8 * nbytes).from_address(address)
    found = torch.frombuffer(raw, dtype=torch.uint8).view(plain.dtype).view_as(expected)
    if not torch.equal(found, expected):
        return None
    return BlockedWeight(address, n, k, padded_in, plain.dtype)


def product(x: Tensor, w: BlockedWeight, bias: Tensor | None) -> Tensor | None:
    """x [rows, K] (the weight's dtype, rows <= MAX_ROWS of it, unit column stride) times the
    weight, plus bias (same dtype, contiguous); None where the call is not the kernel's (the caller
    runs oneDNN's)."""
    rows = x.shape[0]
    if not (0 < rows <= MAX_ROWS[w.dtype] and x.dtype == w.dtype and x.stride(1) == 1):
        return None
    if bias is not None and (bias.dtype != w.dtype or not bias.is_contiguous()):
        return None
    lib = _library(w.dtype)
    if lib is None:
        return None
    out = torch.empty(rows, w.out_features, dtype=w.dtype)
    b = None if bias is None else bias.data_ptr()
    threads = torch.get_num_threads()
    if w.dtype == torch.float32:
        done = lib.small_rows_f32(x.data_ptr(), x.stride(0), rows, w.address, w.out_features,
                                  w.in_features, w.padded_in, b, out.data_ptr(), w.out_features,
                                  threads)
    else:
        done = lib.rows_bf16(x.data_ptr(), x.stride(0), rows, w.address, w.out_features,
                             w.in_features, b, out.data_ptr(), w.out_features, threads)
    return out if done else None
