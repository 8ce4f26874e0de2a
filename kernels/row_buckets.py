"""The row counts the CPU's bfloat16 products run at, and activations allocated to fit them.

oneDNN builds (and JIT-compiles) a primitive for every distinct row count of a product, 1-5 ms
per projection shape; the token counts of chunked-prefill steps rarely repeat, so every such
step paid it (docs/BENCHMARKS.md). A product of more than 64 rows therefore runs at a bucketed
count, one of 16 per doubling (at most 1/16 more rows), so the cache of primitives stays warm.

The extra rows must come from somewhere. The ops that feed the products (RMSNorm, SiLU-and-multiply,
extend attention) allocate their output with the bucketed count of rows and return the first
``rows`` of it: the product then runs over the whole buffer in place, the extra rows being
whatever memory holds (a product's output row depends only on its own input row, and the extra
output rows are dropped). Any other input is copied into a padded buffer.
"""

from __future__ import annotations

import torch
from torch import Tensor

EXACT_UP_TO = 64  # decode batches: few distinct counts, each run as it is


def bucket_rows(rows: int) -> int:
    """The row count a product of ``rows`` rows runs at."""
    if rows <= EXACT_UP_TO:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


def empty_rows(rows: int, *shape: int, dtype: torch.dtype, device: torch.device | None = None
               ) -> Tensor:
    """An uninitialised ``[rows, *shape]`` whose storage holds ``bucket_rows(rows)`` rows."""
    if rows <= EXACT_UP_TO:  # no view on top: the decode path calls this a few times per layer
        return torch.empty((rows, *shape), dtype=dtype, device=device)
    return torch.empty((bucket_rows(rows), *shape), dtype=dtype, device=device)[:rows]


def padded(x: Tensor, rows: int) -> Tensor:
    """2-D ``x`` extended to ``rows`` rows: a view of its own storage when that holds them (see
    :func:`empty_rows`), else a copy with zero rows added."""
    n, cols = x.shape
    storage_rows = (x.untyped_storage().nbytes() // x.element_size() - x.storage_offset()) // cols
    if x.is_contiguous() and storage_rows >= rows:
        return x.as_strided((rows, cols), (cols, 1))
    return torch.cat([x, x.new_zeros(rows - n, cols)])
