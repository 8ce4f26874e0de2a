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


def block_hash(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Hash of one full block given its parent's hash (None for the first block)."""
    h = hashlib.blake2b(digest_size=DIGEST_BYTES)
    h.update(parent if parent is not None else ROOT)
    h.update(array("i", tokens).tobytes())
    return h.digest()


def prompt_block_hashes(tokens: Sequence[int], block_size: int) -> list[bytes]:
    """Hashes of every full block of ``tokens`` (a trailing partial block has none)."""
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = block_hash(parent, tokens[start : start + block_size])
        hashes.append(parent)
    return hashes
