"""The chained block hash: the name of a full KV block, shared by router and scheduler.

``h_i = H(h_{i-1} || tokens of block i)``, so a block's hash names its whole prefix: two requests
share block i only if they agree on every token up to the end of block i. The digest is 128-bit
BLAKE2b, wide enough that a collision is not a practical concern; the scheduler still compares
token ids on a cache hit, so even a collision cannot corrupt output.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence

DIGEST_BYTES = 16
ROOT = b"pagewire-block-v1"
TOKEN_BYTES = array("i").itemsize  # a token id is hashed as a native C int


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Hash of one full block given its parent's hash (None for the first block)."""
    return _chain(parent, array("i", tokens).tobytes())


def prompt_block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of ``tokens`` (a trailing partial block has none)."""
    # The prompt is packed once and sliced (a block per array was a third of the cost), giving
    # the same bytes block_hash() hashes.
    data = memoryview(array("i", tokens).tobytes())
    step = block_size * TOKEN_BYTES
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(data) - step + 1, step):
        parent = _chain(parent, data[start : start + step])
        hashes.append(parent)
    return hashes


def _chain(parent: bytes | None, block: bytes | memoryview) -> bytes:
    h = hashlib.blake2b(parent if parent is not None else ROOT, digest_size=DIGEST_BYTES)
    h.update(block)
    return h.digest()
