"""Decode batches' products against a weight packed by oneDNN, read in place.

- AVX-512 CPUs without AMX, float32 (1 to 128 rows) and bfloat16 (AVX-512 BF16, 1 to 256 rows),
  ``csrc/rows.c``: oneDNN's own product reaches 57-78 % of the cores' bfloat16 rate at decode
  batch sizes and reads a float32 weight at 17-25 GB/s up to 8 rows, and it splits each product
  statically between the threads, so a core a neighbour takes for a moment stalls the whole
  product. These kernels are 1.02-1.6x faster alone (at parity from 128 rows) and hand their
  tasks out dynamically (docs/BENCHMARKS.md).
- AVX2 CPUs, float32, 1 to 3 rows (``csrc/small_rows.c``): decode batches that small read the
  weight at the rate the cores stream memory, where oneDNN's product reads it at about half that.

Both read oneDNN's packed buffer, so the weight has one copy: :func:`blocked` checks, once per
weight at start-up, that the buffer is in the layout the kernel expects (blocks of 64 output
columns, each [Kp][64] in float32 — what oneDNN chooses on AVX2 and AVX-512 CPUs — or
[Kp / 2][64][2] in bfloat16, k-pairs side by side, on an AVX-512 BF16 CPU without AMX), and
returns where it is; a weight in any other layout (an AMX CPU's) keeps oneDNN's product at every
row count. ``PAGEWIRE_CPU_SMALL_ROWS=0`` turns the kernels off.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import c_library

SWITCH = "PAGEWIRE_CPU_SMALL_ROWS"
BLOCK = 64  # output columns per packed block
_ARGS = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
         ctypes.c_int]


@dataclass(frozen=True)
class Kernel:
    """A C product over a packed weight for ``min_rows`` to ``max_rows`` rows: ``run(x, x_stride,
    rows, weight, N, K, Kp, bias, out, out_stride, threads)`` returns 1 when done, 0 when the call
    is not its to make."""

    run: Callable[..., int]
    min_rows: int
    max_rows: int


_AVX2 = [*c_library.BASE_FLAGS, "-mprefer-vector-width=256"]
# (source, function, flags, rows it takes), in order of preference; those that answer on this CPU
# are used, the first that takes a product's rows computes it. One float32 row streams ~10 %
# faster through small_rows' 256-bit passes than rows.c's (measured on a Zen 4); AVX2's float32
# kernel stops at 3 rows, where oneDNN's product is as fast (measured on an AVX2 CPU). The AVX-512
# ones stop where oneDNN's product gets ahead of them on a quiet machine (Zen 4: float32 0.95 at
# 256 rows, bfloat16 0.98 at 512; docs/BENCHMARKS.md): longer prefill chunks are oneDNN's.
_CANDIDATES = {
    torch.float32: [("small_rows.c", "small_rows_f32", _AVX2, 1, 1),
                    ("rows.c", "rows_f32", c_library.BASE_FLAGS, 1, 128),
                    ("small_rows.c", "small_rows_f32", _AVX2, 1, 3)],
    torch.bfloat16: [("rows.c", "rows_bf16", c_library.BASE_FLAGS, 1, 256)],
}


def _answers(run: Callable[..., int], dtype: torch.dtype) -> bool:
    """Whether ``run`` computes a product of one row here (a build without its instructions
    answers 0)."""
    x = torch.ones(1, 2, dtype=dtype)
    weight = torch.ones(BLOCK * 2, dtype=dtype)
    out = torch.zeros(1, BLOCK, dtype=dtype)
    done = run(x.data_ptr(), 2, 1, weight.data_ptr(), BLOCK, 2, 2, None, out.data_ptr(), BLOCK, 1)
    return bool(done) and bool((out == 2).all())


@functools.cache
def kernels(dtype: torch.dtype) -> tuple[Kernel, ...]:
    """This CPU's kernels for ``dtype``, built if needed, in order of preference."""
    found = []
    for source, name, flags, min_rows, max_rows in _CANDIDATES.get(dtype, []):
        lib = c_library.load(source, flags, SWITCH)
        if lib is None:
            continue
        run = getattr(lib, name)
        run.restype, run.argtypes = ctypes.c_int, _ARGS
        if _answers(run, dtype):
            found.append(Kernel(run, min_rows, max_rows))
    return tuple(found)


def kernel(dtype: torch.dtype, rows: int) -> Callable[..., int] | None:
    """The kernel that computes a product of ``rows`` rows in ``dtype`` here (None: oneDNN's)."""
    return next((k.run for k in kernels(dtype) if k.min_rows <= rows <= k.max_rows), None)


def max_rows(dtype: torch.dtype) -> int:
    """The most rows a kernel here takes in ``dtype`` (0: none)."""
    return max((k.max_rows for k in kernels(dtype)), default=0)


@dataclass(frozen=True)
class BlockedWeight:
    """Where a packed weight's blocks are: valid while its packed tensor lives."""

    address: int
    out_features: int
    in_features: int
    padded_in: int  # Kp: rows of each block
    dtype: torch.dtype = torch.float32


def _holds(found: Tensor, plain: Tensor, padded_in: int) -> bool:
    """Whether ``found`` (the packed buffer, flat) holds ``plain`` [N, K] in the kernel's layout,
    [blocks][Kp][64] in float32, [blocks][Kp / 2][64][2] in bfloat16, padding zero. Compared
    through strided views of the buffer, without a copy of the weight: start-up reads it once."""
    n, k = plain.shape
    full, tail = divmod(n, BLOCK)
    blocks = full + (tail > 0)
    if plain.dtype == torch.float32:  # [block][column][k]
        grid = found.view(blocks, padded_in, BLOCK).transpose(1, 2)
        rows = plain.view(n, k)
    else:  # [block][column][k-pair][2]
        grid = found.view(blocks, padded_in // 2, BLOCK, 2).transpose(1, 2)
        rows = plain.view(n, k // 2, 2)
    width = rows.shape[1]  # k, or k-pairs
    return (torch.equal(grid[:full, :, :width], rows[: full * BLOCK].unflatten(0, (full, BLOCK)))
            and (not tail or torch.equal(grid[full, :tail, :width], rows[full * BLOCK :]))
            and not grid[:, :, width:].any() and not grid[full:, tail:].any())


def blocked(plain: Tensor, packed: Tensor) -> BlockedWeight | None:
    """The packed buffer of ``plain`` [N, K] if it holds exactly the kernel's layout for its dtype,
    padding zero (bfloat16: K even); None otherwise (another layout or dtype, no kernel)."""
    if not kernels(plain.dtype):
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
    if plain.dtype == torch.bfloat16 and (padded_in % 2 or k % 2):
        return None  # the kernel reads k-pairs of the rows as they are: none may run past one
    raw = (ctypes.c_uint8 * nbytes).from_address(address)
    if not _holds(torch.frombuffer(raw, dtype=torch.uint8).view(plain.dtype), plain, padded_in):
        return None
    return BlockedWeight(address, n, k, padded_in, plain.dtype)


def product(x: Tensor, w: BlockedWeight, bias: Tensor | None) -> Tensor | None:
    """x [rows, K] (the weight's dtype, rows up to the kernel's, unit column stride) times the
    weight, plus bias (same dtype, contiguous); None where the call is not the kernel's (the caller
    runs oneDNN's)."""
    rows = x.shape[0]
    run = kernel(w.dtype, rows)
    if run is None or x.dtype != w.dtype or x.stride(1) != 1:
        return None
    if bias is not None and (bias.dtype != w.dtype or not bias.is_contiguous()):
        return None
    out = torch.empty(rows, w.out_features, dtype=w.dtype)
    done = run(x.data_ptr(), x.stride(0), rows, w.address, w.out_features, w.in_features,
               w.padded_in, None if bias is None else bias.data_ptr(), out.data_ptr(),
               w.out_features, torch.get_num_threads())
    return out if done else None
