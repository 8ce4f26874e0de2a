"""A chat's images turned into what the model reads: pixels and placeholder token runs.

The served model's own processor files decide everything here (its image processor, PIL
backend; its placeholder token; how many placeholders an image of a given size becomes: fixed
for LLaVA, grid_t * grid_h * grid_w / merge_size^2 for Qwen2.5-VL's dynamic resolution), so
the prompt is token for token what transformers' processor makes. Decoding and preprocessing
run off the event loop. A decoded image larger than ``--max-image-pixels`` is refused before
its pixels are read (a small file can decode to gigabytes). An image whose exact bytes were
seen before comes from the cache (router.image_cache): decoded, preprocessed and hashed once.
"""

from __future__ import annotations

import asyncio
import io
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pagewire.images import PreparedImage, placed, prepare
from pagewire.v1 import common_pb2, generation_pb2
from router.errors import RequestError
from router.image_cache import ImageCache, key_of
from router.image_sources import ImageLimits, image_bytes


class ModelImages:
    """The served model's image side, as the router needs it."""

    def __init__(self, model_dir: str | Path, limits: ImageLimits, cache_bytes: int = 0) -> None:
        from transformers import AutoProcessor

        proc = AutoProcessor.from_pretrained(model_dir)
        self.processor = proc.image_processor
        self.token_id: int = proc.image_token_id
        self.token: str = proc.image_token
        # Qwen2.5-VL (dynamic resolution): an image is a grid of patches, one placeholder per
        # merge x merge block of them. None: a fixed-size model (LLaVA).
        self.merge: int | None = getattr(self.processor, "merge_size", None)
        # Tokens whose inputs pagewire does not take (Qwen's video placeholder): refused.
        self.refused: dict[int, str] = {}
        if self.merge is not None:
            video = proc.tokenizer.convert_tokens_to_ids("<|video_pad|>")
            if isinstance(video, int) and video != proc.tokenizer.unk_token_id:
                self.refused[video] = "video inputs are not supported"
        else:
            self.patch_size: int = proc.patch_size
            # LLaVA: one row per patch, plus CLS unless the "default" strategy drops it.
            self.extra = proc.num_additional_image_tokens - (
                1 if proc.vision_feature_select_strategy == "default" else 0)
        self.limits = limits
        self.cache = ImageCache(cache_bytes)

    def placeholders(self, image: PreparedImage) -> int:
        """Placeholder tokens of one preprocessed image ([C, H, W], or patches on a grid)."""
        if image.grid:
            assert self.merge is not None
            t, h, w = image.grid
            return t * h * w // self.merge**2
        h, w = image.shape[-2:]
        return (h // self.patch_size) * (w // self.patch_size) + self.extra

    async def pixels(self, parts: Sequence[tuple[str, generation_pb2.ImagePart]]
                     ) -> list[PreparedImage]:
        """Each image part (``(field, part)``) fetched, decoded and preprocessed."""
        lim = self.limits
        if len(parts) > lim.max_images:
            raise RequestError.invalid(parts[lim.max_images][0], f"a request may carry at most "
                                       f"{lim.max_images} images (--max-images)")
        budget = lim.max_bytes
        files = []
        for field, part in parts:
            data = await image_bytes(part, field, lim, budget)
            budget -= len(data)
            files.append((field, data))
        return await asyncio.to_thread(self._preprocess, files)

    def _preprocess(self, files: list[tuple[str, bytes]]) -> list[PreparedImage]:
        out = []
        for field, data in files:
            key = key_of(data)
            image = self.cache.get(key)
            if image is None:
                image = self.preprocess(data, field)
                self.cache.put(key, image)
            out.append(image)
        return out

    def preprocess(self, data: bytes, field: str) -> PreparedImage:
        """One encoded image decoded and run through the model's image processor (no cache)."""
        img = decode(data, field, self.limits.max_pixels)
        out = self.processor(images=[img], return_tensors="np")
        if self.merge is None:
            return prepare(np.asarray(out["pixel_values"][0], dtype=np.float32))
        grid = tuple(int(g) for g in out["image_grid_thw"][0])  # one image: all its patches
        return prepare(np.asarray(out["pixel_values"], dtype=np.float32), grid)

    def refuse_unserved(self, ids: list[int], field: str) -> None:
        """INVALID_ARGUMENT naming ``field`` if ``ids`` hold a placeholder of an input pagewire
        does not take (Qwen's ``<|video_pad|>``: video)."""
        for token, why in self.refused.items():
            if token in ids:
                raise RequestError.invalid(field, f"contains the video placeholder; {why}")

    def expand(self, ids: list[int], pixels: list[PreparedImage]
               ) -> tuple[list[int], list[common_pb2.ImageInput]]:
        """``ids`` with each image's one placeholder token (as the chat template wrote it)
        repeated to the image's length, and each image's run."""
        self.refuse_unserved(ids, "messages")
        at = [i for i, t in enumerate(ids) if t == self.token_id]
        if len(at) != len(pixels):
            raise RequestError.invalid("messages", f"the text contains the image placeholder "
                                       f"{self.token!r} ({len(at) - len(pixels)} more than the "
                                       "image parts); send images as image parts")
        out: list[int] = []
        images = []
        prev = 0
        for i, px in zip(at, pixels, strict=True):
            out.extend(ids[prev:i])
            n = self.placeholders(px)
            images.append(placed(px, len(out), n))
            out.extend([self.token_id] * n)
            prev = i + 1
        out.extend(ids[prev:])
        return out, images


def decode(data: bytes, field: str, max_pixels: int) -> Image.Image:
    """The decoded image; INVALID_ARGUMENT naming ``field`` for anything Pillow cannot read
    whole, or over ``max_pixels``."""
    try:
        img = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise RequestError.invalid(field, "is not an image (Pillow cannot identify it)") from None
    w, h = img.size
    if w * h > max_pixels:
        raise RequestError.invalid(field, f"the image is {w}x{h} = {w * h} pixels; the limit is "
                                          f"{max_pixels} (--max-image-pixels)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning,
            Image.DecompressionBombError) as e:
        raise RequestError.invalid(field, f"the image is truncated or corrupt ({e})") from None
    return img
