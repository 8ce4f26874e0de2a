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

import numpy as np

from pagewire.v1 import common_pb2

HASH_BYTES = 16


def image_input(pixels: np.ndarray, offset: int, length: int) -> common_pb2.ImageInput:
    """The message for one preprocessed image ([C, H, W]) whose placeholders start at
    ``offset``."""
    data = np.ascontiguousarray(pixels, dtype="<f4")
    shape = [int(d) for d in data.shape]
    h = hashlib.blake2b(np.asarray(shape, dtype="<i4").tobytes(), digest_size=HASH_BYTES)
    h.update(data.tobytes())
    return common_pb2.ImageInput(offset=offset, length=length, hash=h.digest(),
                                 pixel_values=data.tobytes(), shape=shape)


def pixels(image: common_pb2.ImageInput) -> np.ndarray:
    """The image's pixel values as a [C, H, W] float32 array (a view of the message's bytes)."""
    return np.frombuffer(image.pixel_values, dtype="<f4").reshape(tuple(image.shape))
