"""Images as they travel between services: preprocessed pixels, content hash, placeholder run.

The router preprocesses each image with the model's own image processor and sends the pixel
values (not the uploaded file): the worker stays an executor with no image decoders, every
worker sees exactly the tensor transformers would, and the content hash is of those pixels, so
the same picture sent as PNG or as JPEG of equal pixels is one cache entry. The cost is size: a
float32 [3, 336, 336] image (LLaVA-1.5) is 1.35 MB, bounded by the model's config rather than by
what a client uploads; the tiny test model's [3, 48, 48] is 27 KB.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from pagewire.v1 import common_pb2

HASH_BYTES = 16


@dataclass(frozen=True)
class PreparedImage:
    """One preprocessed image, ready to be placed in any prompt: float32 pixels (little-endian,
    C order) of ``shape`` and their content hash. The router keeps these (router.image_cache)
    so a repeated image is neither preprocessed nor hashed again."""

    pixel_bytes: bytes
    shape: tuple[int, ...]
    content_hash: bytes
    grid: tuple[int, ...] = ()  # Qwen2.5-VL's patch grid (t, h, w); () for fixed-size models

    @property
    def nbytes(self) -> int:
        return len(self.pixel_bytes) + len(self.content_hash)


def prepare(pixels: np.ndarray, grid: tuple[int, ...] = ()) -> PreparedImage:
    """``pixels`` ([C, H, W], or Qwen2.5-VL's [patches, values] on ``grid``) as sent, with the
    content hash of shape, grid and pixel values."""
    data = np.ascontiguousarray(pixels, dtype="<f4")
    shape = tuple(int(d) for d in data.shape)
    grid = tuple(int(g) for g in grid)
    h = hashlib.blake2b(np.asarray(shape, dtype="<i4").tobytes(), digest_size=HASH_BYTES)
    if grid:  # after the shape, so a LLaVA image hashes as before grids existed
        h.update(b"grid" + np.asarray(grid, dtype="<i4").tobytes())
    raw = data.tobytes()
    h.update(raw)
    return PreparedImage(raw, shape, h.digest(), grid)


def placed(image: PreparedImage, offset: int, length: int) -> common_pb2.ImageInput:
    """The message for ``image`` whose placeholders start at ``offset``."""
    return common_pb2.ImageInput(offset=offset, length=length, hash=image.content_hash,
                                 pixel_values=image.pixel_bytes, shape=image.shape,
                                 grid_thw=image.grid)


def image_input(pixels: np.ndarray, offset: int, length: int, grid: tuple[int, ...] = ()
                ) -> common_pb2.ImageInput:
    """The message for one preprocessed image ([C, H, W], or patches on ``grid``) whose
    placeholders start at ``offset``."""
    return placed(prepare(pixels, grid), offset, length)


def pixels(image: common_pb2.ImageInput) -> np.ndarray:
    """The image's pixel values as a float32 array of its shape (a view of the message's bytes)."""
    return np.frombuffer(image.pixel_values, dtype="<f4").reshape(tuple(image.shape))
