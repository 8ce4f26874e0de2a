"""The router's cache of preprocessed images: a hit is exactly a miss, and it stays bounded.

A repeated image (same encoded bytes) is not decoded or preprocessed again; what the prompt
carries must not change by a single byte, and the cache must never hold more than its bound.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import vlm_cases

from pagewire.config import RouterConfig
from pagewire.images import PreparedImage
from pagewire.v1 import generation_pb2
from router.errors import RequestError
from router.image_cache import KEY_BYTES, ImageCache, key_of
from router.model import ServedModel


def load(model: Path, cache_bytes: int) -> ServedModel:
    return ServedModel.load(RouterConfig(model=str(model), image_cache_bytes=cache_bytes))


def chat(*images: bytes) -> generation_pb2.GenerateRequest:
    parts = [generation_pb2.ContentPart(image=generation_pb2.ImagePart(data=d)) for d in images]
    parts.append(generation_pb2.ContentPart(text="what is it?"))
    return generation_pb2.GenerateRequest(chat=generation_pb2.Chat(messages=[
        generation_pb2.ChatMessage(role="user", parts=parts)]))


def prompt(model: ServedModel, request: generation_pb2.GenerateRequest):
    ids, images = asyncio.run(model.prompt(request, "prompt"))
    return ids, [im.SerializeToString(deterministic=True) for im in images]


def test_a_cache_hit_equals_a_miss_byte_for_byte(llava_model: Path) -> None:
    a, b = vlm_cases.png(vlm_cases.image(1)), vlm_cases.png(vlm_cases.image(2))
    cached, uncached = load(llava_model, 64 << 20), load(llava_model, 0)
    first = prompt(cached, chat(a, b))
    assert (cached.images.cache.hits, cached.images.cache.misses) == (0, 2)
    again = prompt(cached, chat(a, b))
    swapped = prompt(cached, chat(b, a))  # hits, at other offsets
    assert cached.images.cache.hits == 4 and len(cached.images.cache) == 2
    assert again == first == prompt(uncached, chat(a, b))
    assert swapped == prompt(uncached, chat(b, a))
    assert len(uncached.images.cache) == 0  # 0: off


def test_a_refused_image_is_not_kept_and_is_refused_again(llava_model: Path) -> None:
    model = load(llava_model, 64 << 20)
    png = vlm_cases.png(vlm_cases.image(1))
    for _ in range(2):
        with pytest.raises(RequestError, match=r"^messages\[0\]\.content\[0\]: the image is trunc"):
            prompt(model, chat(png[:-40]))
    assert len(model.images.cache) == 0


def entry(n: int, fill: int) -> PreparedImage:
    return PreparedImage(bytes([fill]) * n, (n // 4,), bytes([fill]) * 16)


def test_least_recently_used_entries_leave_first_within_the_bound() -> None:
    size = 100 + 16 + KEY_BYTES  # one entry's cost
    cache = ImageCache(3 * size)
    keys = [key_of(bytes([i])) for i in range(5)]
    for i in range(3):
        cache.put(keys[i], entry(100, i))
    assert cache.get(keys[0]) == entry(100, 0)  # now the most recently used
    cache.put(keys[3], entry(100, 3))
    assert cache.get(keys[1]) is None  # the least recently used went
    assert [cache.get(k) is not None for k in keys[:4]] == [True, False, True, True]
    assert cache.bytes == 3 * size <= cache.max_bytes and len(cache) == 3
    cache.put(keys[4], entry(1000, 4))  # larger than the whole bound: not kept, nothing evicted
    assert cache.get(keys[4]) is None and len(cache) == 3
    cache.put(keys[0], entry(100, 9))  # replacing an entry does not count it twice
    assert cache.get(keys[0]) == entry(100, 9) and cache.bytes == 3 * size


def test_the_key_is_of_the_exact_bytes() -> None:
    assert key_of(b"abc") == key_of(b"abc") != key_of(b"abd")
    assert len(key_of(b"")) == KEY_BYTES
