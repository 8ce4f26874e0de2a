"""What router and worker both read from a model directory's ``config.json``.

A vision-language checkpoint (LLaVA) nests its decoder's config under ``text_config``; the
vocabulary, context length and decoder shape are read there, and the image side from the top.
"""

from __future__ import annotations

from typing import Any

VISION_ARCHITECTURES = frozenset({"LlavaForConditionalGeneration"})
# A nested text_config may carry only model_type; the decoder family it names.
TEXT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
}


def architecture(hf: dict[str, Any]) -> str:
    return (hf.get("architectures") or ["LlamaForCausalLM"])[0]


def is_vision(hf: dict[str, Any]) -> bool:
    """The model takes images (its config has an image side pagewire serves)."""
    return architecture(hf) in VISION_ARCHITECTURES


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config: ``hf`` itself, or a vision model's ``text_config`` with its
    architecture named."""
    if not is_vision(hf):
        return hf
    text = dict(hf["text_config"])
    if not text.get("architectures"):
        kind = text.get("model_type", "llama")
        text["architectures"] = [TEXT_ARCHITECTURES.get(kind, kind)]
    return text
