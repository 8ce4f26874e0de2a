"""One decoder config for every family pagewire serves, read from a Hugging Face ``config.json``.

Llama is the base; each family is a row of :data:`FAMILIES` saying what it does differently
(biases, q/k norms, Gemma's norms and scalings, which layers slide, experts). The reader consumes
only the keys its family is known to use and checks their values; :mod:`refusal` refuses the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from worker_svc.models.refusal import Unsupported, check_keys, require
from worker_svc.models.rope import RopeSpec, rope_specs

COMMON_KEYS = frozenset({
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "rms_norm_eps", "tie_word_embeddings", "rope_theta",
    "rope_scaling", "rope_parameters", "partial_rotary_factor", "hidden_act",
})
_QWEN_WINDOW = frozenset({"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"})
_GEMMA2 = frozenset({"attention_bias", "hidden_activation", "query_pre_attn_scalar",
                     "attn_logit_softcapping", "final_logit_softcapping", "sliding_window",
                     "layer_types"})
_MOE = frozenset({"num_local_experts", "num_experts", "num_experts_per_tok"})


@dataclass(frozen=True)
class Family:
    """What one architecture changes in the Llama decoder."""

    keys: frozenset[str]  # config keys its reader uses beyond COMMON_KEYS
    bias: str = "none"  # "none"; "qkv" (Qwen2: always); "config" (attention_bias: q, k, v and o)
    qk_norm: bool = False  # RMSNorm of each query and key head before rope (Qwen3, Gemma 3)
    gemma: int = 0  # 1: (1 + w) norms, GeGLU, sqrt(hidden) embeddings; 2, 3: also sandwich norms
    windows: str = "none"  # "all": sliding_window on every layer; "layer_types": per layer
    moe: str = ""  # "mixtral" (always renormalised top-k) or "qwen3_moe" (norm_topk_prob)
    mrope: bool = False  # 3-D (temporal, height, width) rotary positions (Qwen2.5-VL's decoder)


FAMILIES: dict[str, Family] = {
    "LlamaForCausalLM": Family(frozenset({"attention_bias", "mlp_bias"}), bias="config"),
    "MistralForCausalLM": Family(frozenset({"sliding_window"}), windows="all"),
    "Qwen2ForCausalLM": Family(_QWEN_WINDOW, bias="qkv", windows="layer_types"),
    "Qwen2_5_VLTextModel": Family(_QWEN_WINDOW, bias="qkv", windows="layer_types", mrope=True),
    "Qwen3ForCausalLM": Family(_QWEN_WINDOW | {"attention_bias"}, bias="config", qk_norm=True,
                               windows="layer_types"),
    # Gemma reads hidden_act; some configs also carry hidden_activation, which it ignores.
    "GemmaForCausalLM": Family(frozenset({"attention_bias", "hidden_activation"}), bias="config",
                               gemma=1),
    "Gemma2ForCausalLM": Family(_GEMMA2, bias="config", gemma=2, windows="layer_types"),
    "Gemma3ForCausalLM": Family(_GEMMA2 | {"sliding_window_pattern", "_sliding_window_pattern",
                                           "rope_local_base_freq"},
                                bias="config", qk_norm=True, gemma=3, windows="layer_types"),
    "Phi3ForCausalLM": Family(frozenset({"sliding_window", "original_max_position_embeddings"}),
                              windows="all"),
    "MixtralForCausalLM": Family(_MOE | {"sliding_window"}, windows="all", moe="mixtral"),
    "Qwen3MoeForCausalLM": Family(
        _MOE | {"attention_bias", "sliding_window", "use_sliding_window", "max_window_layers",
                "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers"},
        bias="config", qk_norm=True, windows="all", moe="qwen3_moe"),
}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


@dataclass(frozen=True)
class MoeConfig:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # divide the top-k probabilities by their sum
    layers: tuple[bool, ...]  # which layers are sparse (the others keep a dense MLP)


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    gemma: int = 0
    activation: str = "silu"
    attn_scale: float = 0.0  # 0: head_dim ** -0.5
    attn_softcap: float | None = None
    final_softcap: float | None = None
    layer_types: tuple[str, ...] = ()  # "full_attention" / "sliding_attention" per layer
    sliding_window: int | None = None
    rope: dict[str, RopeSpec] | None = None  # by layer type
    moe: MoeConfig | None = None
    # M-RoPE: how many of the rotary frequencies (head_dim / 2) take the temporal, height and
    # width position, in that order (rope.mrope_rows). None: one position per token.
    mrope_section: tuple[int, ...] | None = None

    def window(self, layer: int) -> int | None:
        """Keys a query of ``layer`` sees: itself and the ``window - 1`` before it; None: all."""
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Read a config.json of a supported architecture; refuse anything it cannot honour."""
        arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        fam = FAMILIES.get(arch)
        if fam is None:
            raise Unsupported("architectures", arch, f"supported: {', '.join(sorted(FAMILIES))}")
        check_keys(hf, COMMON_KEYS | fam.keys)
        heads = hf["num_attention_heads"]
        layers = hf["num_hidden_layers"]
        types, window = _layer_types(hf, fam, layers)
        bias = fam.bias == "qkv" or (fam.bias == "config" and bool(hf.get("attention_bias")))
        gemma2 = fam.gemma >= 2
        act_key = "hidden_activation" if gemma2 else "hidden_act"
        act = hf.get(act_key) or ("gelu_pytorch_tanh" if fam.gemma else "silu")
        if fam.gemma == 1 and act == "gelu":
            act = "gelu_pytorch_tanh"  # transformers reads Gemma's legacy "gelu" as the tanh form
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", fam.gemma > 0)),
            qkv_bias=bias,
            o_bias=bias and fam.bias == "config",
            mlp_bias=bool(hf.get("mlp_bias")) if "mlp_bias" in fam.keys else False,
            qk_norm=fam.qk_norm,
            gemma=fam.gemma,
            activation=ACTIVATIONS[require(act_key, act, tuple(ACTIVATIONS))],
            attn_scale=hf.get("query_pre_attn_scalar", 256) ** -0.5 if gemma2 else head_dim**-0.5,
            attn_softcap=hf.get("attn_logit_softcapping") if gemma2 else None,
            final_softcap=hf.get("final_logit_softcapping") if gemma2 else None,
            layer_types=types,
            sliding_window=window,
            rope=rope_specs(hf, set(types)),
            moe=_moe(hf, fam, layers),
            mrope_section=_mrope_section(hf, fam, head_dim),
        )


def _mrope_section(hf: dict[str, Any], fam: Family, head_dim: int) -> tuple[int, ...] | None:
    """The M-RoPE split of a family that has it (transformers' default when the config names
    none); refused where it would not cover the rotary frequencies exactly, or elsewhere."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if not fam.mrope:
        kind = params.get("rope_type", params.get("type")) if isinstance(params, dict) else None
        if kind == "mrope":
            raise Unsupported("rope_scaling.rope_type", kind,
                              "multimodal rotary positions are served for Qwen2.5-VL only")
        if section is not None:
            raise Unsupported("rope_parameters.mrope_section", section,
                              "multimodal rotary positions are served for Qwen2.5-VL only")
        return None
    if params.get("mrope_interleaved"):
        raise Unsupported("rope_parameters.mrope_interleaved", True,
                          "only Qwen2.5-VL's sectioned M-RoPE is served")
    section = tuple(int(s) for s in (section or (16, 24, 24)))
    if len(section) != 3 or sum(section) != head_dim // 2:
        raise Unsupported("rope_parameters.mrope_section", list(section),
                          f"needs 3 parts summing to head_dim / 2 = {head_dim // 2}")
    return section


def _layer_types(hf: dict[str, Any], fam: Family, layers: int) -> tuple[tuple[str, ...], int | None]:
    """Each layer's attention type and the window of the sliding ones, as transformers sets them."""
    window = hf.get("sliding_window")
    if "use_sliding_window" in fam.keys and not hf.get("use_sliding_window", False):
        window = None  # Qwen configs carry a window they do not use
    if fam.windows == "none" or not window:
        return ("full_attention",) * layers, None
    if fam.windows == "all":
        return ("sliding_attention",) * layers, int(window)
    types = hf.get("layer_types")
    if types is None:
        if fam.gemma == 2:
            types = ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)]
        elif fam.gemma == 3:
            n = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
            types = ["sliding_attention" if (i + 1) % n else "full_attention" for i in range(layers)]
        else:
            first = hf.get("max_window_layers", layers)
            types = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    for t in types:
        require("layer_types", t, ("full_attention", "sliding_attention"))
    if len(types) != layers:
        raise Unsupported("layer_types", types, f"needs one entry per layer ({layers})")
    return tuple(types), int(window)


def _moe(hf: dict[str, Any], fam: Family, layers: int) -> MoeConfig | None:
    if not fam.moe:
        return None
    experts = hf.get("num_local_experts") or hf.get("num_experts") or 0
    if fam.moe == "mixtral":
        return MoeConfig(experts, hf["num_experts_per_tok"], hf["intermediate_size"], True,
                         (True,) * layers)
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = set(hf.get("mlp_only_layers") or [])
    sparse = tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers))
    return MoeConfig(experts, hf["num_experts_per_tok"], hf["moe_intermediate_size"],
                     bool(hf.get("norm_topk_prob", False)), sparse)
