"""Triton implementations of the paged attention operations (same contracts as kernels.reference).

Importing this package imports triton; ``kernels.get_backend("triton")`` does so only on request.
"""

from kernels.triton_ops.decode import paged_decode_attention
from kernels.triton_ops.extend import paged_extend_attention
from kernels.triton_ops.write_kv import write_kv

__all__ = ["paged_decode_attention", "paged_extend_attention", "write_kv"]
