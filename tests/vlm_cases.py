"""The vision-language test models' oracle (LLaVA, Qwen2.5-VL): images, chat prompts through transformers' own processor, and
transformers' greedy generation on them.

Everything here is transformers' doing (AutoProcessor expands ``<image>`` and preprocesses, the
model generates), so a test that compares pagewire's output with it checks pagewire's own image
path against the reference implementation, never against itself.
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pagewire.images import image_input
from pagewire.v1 import common_pb2

# (height, width): different sizes and aspect ratios, all resized and cropped by the processor.
SIZES = ((40, 64), (100, 30), (48, 48), (200, 120), (17, 23))


def image(seed: int, size: tuple[int, int] | None = None) -> Image.Image:
    """A deterministic RGB noise-and-gradient picture."""
    h, w = size or SIZES[seed % len(SIZES)]
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ramp = (np.arange(w)[None, :, None] * (seed + 1) * 7 % 256).astype(np.uint8)
    return Image.fromarray(base // 2 + ramp // 2)


def png(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


def messages(text: str, n_images: int) -> list[dict]:
    """One user turn: ``n_images`` image parts, then the text."""
    parts: list[dict] = [{"type": "image"} for _ in range(n_images)]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@functools.cache
def processor(path: Path):  # -> LlavaProcessor | PaddleOCRVLProcessor (Qwen2.5-VL's, images only)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


@functools.cache
def hf_model(path: Path):  # -> LlavaForConditionalGeneration | Qwen2_5_VLForConditionalGeneration
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()


def hf_inputs(path: Path, text: str, images: list[Image.Image]) -> dict:
    """transformers' processor output for a chat of ``images`` then ``text``."""
    proc = processor(path)
    prompt = proc.apply_chat_template(messages(text, len(images)), add_generation_prompt=True,
                                      tokenize=False)
    # The template writes BOS itself, so the rendered chat is encoded without special tokens.
    return proc(text=prompt, images=images or None, return_tensors="pt",
                add_special_tokens=False)


def image_inputs(path: Path, inputs: dict) -> list[common_pb2.ImageInput]:
    """The ImageInputs of a processor output: each image's pixels and placeholder run (and,
    for Qwen2.5-VL, its patch grid)."""
    ids = inputs["input_ids"][0].tolist()
    cfg = hf_model(path).config
    token = cfg.image_token_id
    if cfg.model_type == "llava":  # LLaVA: fixed size; adjacent images make one run
        per_image = cfg.image_seq_length
        at = [i for i, t in enumerate(ids) if t == token][::per_image]
        return [image_input(np.asarray(inputs["pixel_values"][j]), start, per_image)
                for j, start in enumerate(at)]
    # Qwen2.5-VL: each image is its own run (between vision_start and vision_end).
    starts = [i for i, t in enumerate(ids) if t == token and (i == 0 or ids[i - 1] != token)]
    merge = cfg.vision_config.spatial_merge_size
    out, row = [], 0
    grids = np.asarray(inputs["image_grid_thw"]).tolist() if starts else []
    for start, grid in zip(starts, grids, strict=True):
        n = grid[0] * grid[1] * grid[2]
        out.append(image_input(np.asarray(inputs["pixel_values"][row : row + n]), start,
                               n // merge**2, tuple(grid)))
        row += n
    return out


def hf_generate(path: Path, inputs: dict, n: int) -> list[int]:
    """transformers' greedy tokens, exactly ``n`` of them."""
    with torch.inference_mode():
        out = hf_model(path).generate(**inputs, max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, eos_token_id=None, pad_token_id=2)
    return out[0, inputs["input_ids"].shape[1]:].tolist()
