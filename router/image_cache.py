"""Preprocessed images by the hash of their encoded bytes, so a repeated image is not decoded,
preprocessed or hashed again.

A chat that resends the same picture (every turn of a conversation about an image, a benchmark's
prefix-hit run) would otherwise pay Pillow's decode and the image processor on every request --
on the 2-core development machine ~19 ms per 640x480 PNG, most of the router's part of an image
prefix hit's time to first token. The key is the SHA-256 of the encoded bytes: the same bytes
always give the same pixels (preprocessing is deterministic for a given model directory, which a
router never changes), and being collision-resistant no client can make its bytes stand for
another's image (~0.6 ms per MB, hardware-accelerated on x86). Different bytes that decode to
equal pixels are two entries with one content hash, so they still share KV blocks. Only images
that were accepted are kept: a refused one (not an image, too many pixels) is refused again.

Bounded by ``--image-cache-bytes`` (pixel bytes held), least recently used first out; 0 turns
it off. Shared by the threads that preprocess, so a lock guards it.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

from pagewire.images import PreparedImage

KEY_BYTES = 32


def key_of(data: bytes) -> bytes:
    """The cache key of an encoded image."""
    return hashlib.sha256(data).digest()


class ImageCache:
    """LRU map from encoded-image key to :class:`~pagewire.images.PreparedImage`, at most ``max_bytes`` of pixels."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[bytes, PreparedImage] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes) -> PreparedImage | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: bytes, value: PreparedImage) -> None:
        """Keep ``value``, evicting the least recently used entries to stay within the bound;
        a value larger than the whole bound is not kept."""
        size = _size(value)
        if size > self.max_bytes:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= _size(old)
            self._entries[key] = value
            self.bytes += size
            while self.bytes > self.max_bytes:
                _, out = self._entries.popitem(last=False)
                self.bytes -= _size(out)
            assert self.bytes >= 0


def _size(value: PreparedImage) -> int:
    return len(value.pixel_bytes) + KEY_BYTES + len(value.content_hash)
