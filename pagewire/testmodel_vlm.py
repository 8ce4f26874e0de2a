"""A vision-language test model: LLaVA (CLIP vision tower, MLP projector, the Llama test decoder).

Built by transformers from a small config and saved with its processor files (a PIL-backed CLIP
image processor, the test tokenizer with an ``<image>`` special token, a chat template that
renders image parts as ``<image>``), so ``AutoProcessor`` and ``AutoModelForImageTextToText``
load the directory exactly as a user's download. Weights are the name-keyed random streams of
the text test models; the vision side gets gains that keep every layer's activations O(1) and
make the projected image features as large as token embeddings, so an image changes the greedy
continuation (a server that dropped or misplaced image features would not go unnoticed).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pagewire.testmodel import SIZES, _normal, generation_config
from pagewire.testmodel_arch import _gain, arch_config
from pagewire.testmodel_tokenizer import (
    chatml_template,
    train_tokenizer,
    write_json,
    write_tokenizer_files,
)

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 48  # pixels per side after resize and crop
PATCH_SIZE = 8  # so an image is (48 / 8) ** 2 = 36 placeholder tokens: more than one KV block
VISION_GAIN = 1.0

VLM_CHAT_TEMPLATE = chatml_template("<image>")


def llava_config(size: str = "tiny"):  # -> LlavaConfig
    """LLaVA-1.5's layout at test size: CLIP features of the second-to-last layer without CLS."""
    from transformers import CLIPVisionConfig, LlavaConfig

    text = arch_config("llama", size)
    vision = CLIPVisionConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=64, hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
    )
    cfg = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=len(_specials()) - 1,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg


def _specials() -> tuple[str, ...]:
    from pagewire.testmodel_tokenizer import SPECIAL_TOKENS

    return (*SPECIAL_TOKENS, IMAGE_TOKEN)


def _vision_std(name: str, shape: tuple[int, ...]) -> float | None:
    """std of a vision-tower or projector parameter; None for norms and biases."""
    if name.endswith("class_embedding"):
        return 1.0
    if "position_embedding" in name:
        return 0.5
    if len(shape) == 1:
        return None
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return VISION_GAIN / fan_in**0.5


@torch.no_grad()
def fill_vlm_weights(model: torch.nn.Module, seed: int, vision_std, is_vision, is_norm) -> None:
    """Name-keyed random weights: the text decoder as the text test models, the vision side by
    ``vision_std(name, shape)``; norms 1 + noise and biases noise, so a parameter read wrongly
    shows. ``is_vision(name)`` / ``is_norm(name)`` say which parameters are which."""
    for name, p in model.named_parameters():
        shape = tuple(p.shape)
        flat = (1, p.numel())
        std = vision_std(name, shape) if is_vision(name) else _gain(name, shape, gemma=False)
        if std is not None:
            p.copy_(_normal(seed, name, flat if len(shape) != 2 else shape, std).view(p.shape))
        elif is_norm(name) and name.endswith("weight"):
            p.copy_(_normal(seed, name, flat, 0.1).view(-1) + 1.0)
        else:
            p.copy_(_normal(seed, name, flat, 0.1).view(-1))


def fill_llava_weights(model: torch.nn.Module, seed: int) -> None:
    fill_vlm_weights(model, seed, _vision_std,
                     lambda n: "vision_tower" in n or "multi_modal_projector" in n,
                     lambda n: "norm" in n)


def save_vlm(model: torch.nn.Module, out_dir: str | Path, size: str,
             extra_tokens: tuple[str, ...], chat_template: str) -> Path:
    """Save ``model`` with the corpus tokenizer (plus the family's image tokens), its chat
    template and the generation config; the processor is the caller's to add."""
    out = Path(out_dir)
    model.save_pretrained(out)
    shape = SIZES[size]
    write_tokenizer_files(train_tokenizer(shape.vocab_size, extra_tokens), out,
                          shape.max_position_embeddings, extra_tokens, chat_template)
    write_json(out / "generation_config.json", generation_config())
    return out


def make_llava_model(out_dir: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random-weight LLaVA with its processor files into ``out_dir``."""
    from transformers import (
        AutoTokenizer,
        CLIPImageProcessorPil,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(size)).to(torch.float32)
    fill_llava_weights(model, seed)
    out = save_vlm(model, out_dir, size, (IMAGE_TOKEN,), VLM_CHAT_TEMPLATE)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
    )
    processor = LlavaProcessor(
        image_processor=images, tokenizer=AutoTokenizer.from_pretrained(out),
        patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=VLM_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out
