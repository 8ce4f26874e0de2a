"""Test models of every served family: random weights saved by transformers itself, the test tokenizer.

The Llama test model (:mod:`pagewire.testmodel`) writes its files by hand; the other families
have too many naming conventions for that (fused Phi-3 projections, per-expert MoE names,
Gemma's extra norms), so transformers builds the model from a small config and saves it, which
also makes the directory exactly what a user would download. The weights are then replaced by
the same name-keyed random streams the Llama model uses, with the same tuned gains (sharp
argmaxes, so greedy tokens are a strict oracle), and a few families' extra parameters (norm
weights, biases, routers) get visible random values, so a parameter read wrongly shows up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from pagewire.testmodel import (
    EMBED_STD,
    LM_HEAD_GAIN,
    MLP_GAIN,
    O_GAIN,
    QK_GAIN,
    SIZES,
    V_GAIN,
    _normal,
    generation_config,
)
from pagewire.testmodel_tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    train_tokenizer,
    write_json,
    write_tokenizer_files,
)

# --arch -> (model_type, what the family adds to the shape).
ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": 64}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"sliding_window": 64, "query_pre_attn_scalar": 24}),
    "gemma3": ("gemma3_text", {"sliding_window": 64, "query_pre_attn_scalar": 48,
                               "sliding_window_pattern": 2}),
    "phi3": ("phi3", {"original_max_position_embeddings": 4096}),
    "mixtral": ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen3_moe": ("qwen3_moe", {"num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 96, "norm_topk_prob": True}),
}
ROUTER_GAIN = 4.0  # spread router logits: near-tied experts would make top-k a coin toss


def arch_config(arch: str, size: str = "tiny", **overrides: Any):  # -> PretrainedConfig
    """The transformers config of family ``arch`` at test size ``size`` (plus ``overrides``)."""
    from transformers import AutoConfig

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {sorted(ARCHS)}")
    model_type, extra = ARCHS[arch]
    s = SIZES[size]
    kw: dict[str, Any] = dict(
        vocab_size=s.vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
        num_hidden_layers=s.num_hidden_layers, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim,
        max_position_embeddings=s.max_position_embeddings, rms_norm_eps=1e-5,
        bos_token_id=SPECIAL_TOKENS.index(BOS), eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(PAD), tie_word_embeddings=arch.startswith("gemma"),
    )
    if arch == "phi3":
        del kw["head_dim"]  # Phi-3 derives it from hidden_size / heads
    kw.update(extra)
    kw.update(overrides)
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.architectures = [type(cfg).__name__.replace("TextConfig", "ForCausalLM")
                         .replace("Config", "ForCausalLM")]
    return cfg


def _gain(name: str, shape: tuple[int, ...], gemma: bool) -> float | None:
    """std of parameter ``name``; None for the 1-d ones _fill treats apart."""
    fan_in = shape[-1]
    if "embed_tokens" in name:
        return EMBED_STD / (fan_in**0.5 if gemma else 1.0)  # Gemma scales embeddings by sqrt(H)
    if name.endswith("lm_head.weight"):
        return LM_HEAD_GAIN / fan_in**0.5
    if len(shape) == 1:
        return None
    if name.endswith((".gate.weight", "router.weight")):
        return ROUTER_GAIN / fan_in**0.5
    for key, gain in (("q_proj", QK_GAIN), ("k_proj", QK_GAIN), ("qkv_proj", QK_GAIN),
                      ("v_proj", V_GAIN), ("o_proj", O_GAIN)):
        if key in name:
            return gain / fan_in**0.5
    return MLP_GAIN / fan_in**0.5


@torch.no_grad()
def fill_weights(model: torch.nn.Module, seed: int, gemma: bool) -> None:
    """Replace every parameter with the name-keyed random stream of its tuned gain."""
    for name, p in model.named_parameters():
        std = _gain(name, tuple(p.shape), gemma)
        if std is not None:
            p.copy_(_normal(seed, name, tuple(p.shape), std).view(p.shape))
        elif name.endswith("norm.weight"):  # Gemma stores (weight - 1)
            p.copy_(_normal(seed, name, (1, p.numel()), 0.1).view(-1) + (0.0 if gemma else 1.0))
        else:  # biases
            p.copy_(_normal(seed, name, (1, p.numel()), 0.1).view(-1))


def make_arch_model(out_dir: str | Path, arch: str, seed: int = 0, size: str = "tiny",
                    **overrides: Any) -> Path:
    """Write a random-weight model of family ``arch`` with the test tokenizer into ``out_dir``."""
    from transformers import AutoModelForCausalLM

    cfg = arch_config(arch, size, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    fill_weights(model, seed, gemma=arch.startswith("gemma"))
    out = Path(out_dir)
    model.save_pretrained(out)
    write_tokenizer_files(train_tokenizer(cfg.vocab_size), out, cfg.max_position_embeddings)
    write_json(out / "generation_config.json", generation_config())
    return out
