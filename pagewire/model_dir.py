"""What router and worker both read from a model directory's ``config.json``.

A vision-language checkpoint (LLaVA, Qwen2.5-VL) nests its decoder's config under ``text_config``; the
vocabulary, context length and decoder shape are read there, and the image side from the top.
"""

from __future__ import annotations

from typing import Any

VISION_ARCHITECTURES = frozenset({"LlavaForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"})
# A nested text_config may carry only model_type; the decoder family it names.
TEXT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen2_5_vl_text": "Qwen2_5_VLTextModel",  # the Qwen2 decoder with M-RoPE
}


def architecture(hf: dict[str, Any]) -> str:
    return (hf.get("architectures") or ["LlamaForCausalLM"])[0]


def is_vision(hf: dict[str, Any]) -> bool:
    """The model takes images (its config has an image side pagewire serves)."""
    return architecture(hf) in VISION_ARCHITECTURES


# Decoder keys a nested text_config may leave to its config class's defaults (llava-hf's
# checkpoints give little more than vocab_size): filled in as transformers fills them.
DEFAULTED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
             "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
             "max_position_embeddings", "hidden_act")
_ROPE_KEYS = ("rope_theta", "rope_scaling", "rope_parameters")


def text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's config: ``hf`` itself, or a vision model's ``text_config`` with its
    architecture named, the keys it leaves to defaults filled in by transformers' config class
    of its ``model_type``, and embeddings tied when either level ties them (as transformers
    ties LLaVA's)."""
    if not is_vision(hf):
        return hf
    text = dict(hf["text_config"]) if "text_config" in hf else flat_text_config(hf)
    kind = text.get("model_type", "llama")
    if not text.get("architectures") or is_vision(text):  # transformers 5 may copy the VLM's
        text["architectures"] = [TEXT_ARCHITECTURES.get(kind, kind)]
    missing = [k for k in DEFAULTED if k not in text]
    rope = not any(k in text for k in _ROPE_KEYS)
    if missing or rope:
        from transformers import AutoConfig

        given = {k: v for k, v in text.items() if k not in ("model_type", "architectures")}
        full = AutoConfig.for_model(kind, **given)
        for key in missing + (["rope_parameters"] if rope else []):
            value = getattr(full, key, None)
            if value is not None:
                text[key] = value
    text["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings")
                                       or text.get("tie_word_embeddings"))
    return text


# Qwen2.5-VL's hub config.json is flat: the decoder's keys sit beside vision_config, and
# transformers (Qwen2_5_VLConfig) moves these into its text config.
FLAT_TEXT_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "use_sliding_window", "sliding_window", "max_window_layers",
    "layer_types", "attention_dropout", "rope_parameters", "rope_scaling", "rope_theta",
    "bos_token_id", "eos_token_id", "pad_token_id",
})


def flat_text_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The decoder's keys of a flat Qwen2.5-VL config.json, as its nested text_config."""
    if architecture(hf) != "Qwen2_5_VLForConditionalGeneration":
        raise ValueError(f"config.json of {architecture(hf)} has no text_config")
    text = {k: v for k, v in hf.items() if k in FLAT_TEXT_KEYS}
    text["model_type"] = "qwen2_5_vl_text"
    return text
