"""The chained block hash: the name of a full KV block, shared by router and scheduler.

``h_i = H(h_{i-1} || tokens of block i)``, so a block's hash names its whole prefix: two requests
share block i only if they agree on every token up to the end of block i. The digest is 128-bit
BLAKE2b, wide enough that a collision is not a practical concern; the scheduler still compares
token ids on a cache hit, so even a collision cannot corrupt output.

Image placeholders are the same token id whatever the image, so a block that holds any
placeholder of an image also hashes that image's content hash (as vLLM mixes in ``mm_hash``):
the same text with another image never shares that block, and, the hash being chained, none
after it. Blocks without images hash exactly as before.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Protocol

DIGEST_BYTES = 16
ROOT = b"pagewire-block-v1"
TOKEN_BYTES = array("i").itemsize  # a token id is hashed as a native C int


class ImageSpan(Protocol):
    """An image's placeholder run (``common_pb2.ImageInput`` is one)."""

    offset: int
    length: int
    hash: bytes


def image_extra(images: Sequence[ImageSpan], start: int, end: int) -> bytes:
    """The content hashes of the images with a placeholder in tokens [start, end), in order."""
    return b"".join(im.hash for im in images if im.offset < end and im.offset + im.length > start)


def block_hash(parent: bytes | None, tokens: Sequence[int], extra: bytes = b"") -> bytes:
    """Hash of one full block given its parent's hash (None for the first block); ``extra``:
    its :func:`image_extra`."""
    return _chain(parent, array("i", tokens).tobytes(), extra)


def prompt_block_hashes(
    tokens: Sequence[int], block_size: int, images: Sequence[ImageSpan] = ()
) -> list[bytes]:
    """Hashes of every full block of ``tokens`` (a trailing partial block has none)."""
    # The prompt is packed once and sliced (a block per array was a third of the cost), giving
    # the same bytes block_hash() hashes.
    data = memoryview(array("i", tokens).tobytes())
    step = block_size * TOKEN_BYTES
    hashes: list[bytes] = []
    parent: bytes | None = None
    for start in range(0, len(data) - step + 1, step):
        extra = b""
        if images:
            first = start // TOKEN_BYTES
            extra = image_extra(images, first, first + block_size)
        parent = _chain(parent, data[start : start + step], extra)
        hashes.append(parent)
    return hashes


def _chain(parent: bytes | None, block: bytes | memoryview, extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent if parent is not None else ROOT, digest_size=DIGEST_BYTES)
    h.update(block)
    if extra:
        h.update(extra)
    return h.digest()
