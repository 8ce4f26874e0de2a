"""A second vision-language test model: Qwen2.5-VL (window-attention ViT, 2x2 patch merger, the
Qwen2 decoder with M-RoPE).

Built by transformers from a small config and saved with its processor files, so
``AutoProcessor`` and ``AutoModelForImageTextToText`` load the directory as a user's download.
The processor is ``Qwen2_5_VLProcessor`` with the PIL-backed ``Qwen2VLImageProcessorPil`` and
*no* video processor: ``processor_config.json`` then names none, so ``AutoProcessor`` never
builds Qwen's torchvision video processor (which torchvision-less installs cannot import).
``min_pixels``/``max_pixels`` are small so that an image becomes between 4 and 48 placeholder
tokens depending on its size (dynamic resolution is the point of this family). The tokenizer is
the corpus tokenizer of the other test models plus Qwen's vision specials; the chat template
renders an image part as ``<|vision_start|><|image_pad|><|vision_end|>``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pagewire.testmodel_arch import arch_config
from pagewire.testmodel_tokenizer import (
    SPECIAL_TOKENS,
    chatml_template,
    write_json,
)
from pagewire.testmodel_vlm import fill_vlm_weights, save_vlm

VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD = (
    "<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
EXTRA = (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)
PATCH_SIZE = 8
MERGE_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # resized sides are multiples of this: one placeholder each
MIN_PIXELS = 4 * FACTOR * FACTOR  # at least 4 placeholders
MAX_PIXELS = 48 * FACTOR * FACTOR  # at most 48
VISION_GAIN = 1.0

QWENVL_CHAT_TEMPLATE = chatml_template("<|vision_start|><|image_pad|><|vision_end|>")


def qwenvl_config(size: str = "tiny"):  # -> Qwen2_5_VLConfig
    """Qwen2.5-VL's layout at test size: 4 ViT blocks (1 and 3 full attention, 0 and 2 in
    windows of 2x2 merged patches), the tiny Qwen2 decoder with M-RoPE."""
    from transformers import Qwen2_5_VLConfig

    base = arch_config("qwen2", size).to_dict()
    text = {k: base[k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps",
        "bos_token_id", "eos_token_id", "pad_token_id")}
    assert base["head_dim"] == base["hidden_size"] // base["num_attention_heads"]
    text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0,
                               "mrope_section": mrope_section(base["head_dim"])}
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4,
                  patch_size=PATCH_SIZE, spatial_merge_size=MERGE_SIZE, temporal_patch_size=2,
                  window_size=2 * FACTOR, fullatt_block_indexes=[1, 3],
                  out_hidden_size=text["hidden_size"], hidden_act="silu")
    ids = {t: len(SPECIAL_TOKENS) + i for i, t in enumerate(EXTRA)}
    cfg = Qwen2_5_VLConfig(
        text_config=text, vision_config=vision, image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def mrope_section(head_dim: int) -> list[int]:
    """(t, h, w) shares of the rotary frequencies in Qwen2.5-VL's proportions (16, 24, 24 of
    64): (4, 6, 6) for the tiny decoder's head_dim 32."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def _vision_std(name: str, shape: tuple[int, ...]) -> float | None:
    """std of a vision parameter (None: norms and biases). The merger's last projection is as
    large as token embeddings, so the image's rows weigh as much as text in the decoder."""
    if len(shape) == 1:
        return None
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    gain = 3.0 if name.endswith("merger.mlp.2.weight") else VISION_GAIN
    return gain / fan_in**0.5


def fill_qwenvl_weights(model: torch.nn.Module, seed: int) -> None:
    fill_vlm_weights(model, seed, _vision_std, lambda n: ".visual." in f".{n}",
                     lambda n: "norm" in n or "ln_q" in n)


def make_qwenvl_model(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight Qwen2.5-VL with its processor files into ``out_dir``."""
    from transformers import (
        AutoTokenizer,
        PaddleOCRVLProcessor,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(qwenvl_config(size)).to(torch.float32)
    fill_qwenvl_weights(model, seed)
    out = save_vlm(model, out_dir, size, EXTRA, QWENVL_CHAT_TEMPLATE)
    # The tokenizer names its image token, which the processor reads (tokenizer.image_token).
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    tok_config["extra_special_tokens"] = {"image_token": IMAGE_PAD}
    write_json(out / "tokenizer_config.json", tok_config)
    images = Qwen2VLImageProcessorPil(
        patch_size=PATCH_SIZE, merge_size=MERGE_SIZE, temporal_patch_size=2,
        min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS,
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    )
    # Qwen2_5_VLProcessor needs a video processor, which needs torchvision. PaddleOCRVLProcessor
    # is the same processor for images (one image token -> grid_t*grid_h*grid_w / merge_size**2
    # of them, mm_token_type_ids for the M-RoPE positions) without the video half.
    processor = PaddleOCRVLProcessor(image_processor=images,
                                     tokenizer=AutoTokenizer.from_pretrained(out),
                                     chat_template=QWENVL_CHAT_TEMPLATE)
    processor.save_pretrained(out)
    return out
