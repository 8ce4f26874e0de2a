"""Every config key that changes the math is either implemented (with a parity case) or refused.

``IMPLEMENTED`` names, per key the family readers use, the ``test_families`` case that holds it to
transformers; a key read but missing from the table fails here, so nothing is implemented
without a parity test. ``REFUSED`` lists configs that must not start, and the key the refusal
must name.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from test_families import CASES

from worker_svc.loader import read_model_dir
from worker_svc.models.config import COMMON_KEYS, FAMILIES, ModelConfig
from worker_svc.models.refusal import INERT, Unsupported

# key -> the test_families case that sets it (to a value that changes the output)
IMPLEMENTED = {
    "vocab_size": "llama", "hidden_size": "llama", "intermediate_size": "llama",
    "num_hidden_layers": "llama", "num_attention_heads": "llama",
    "num_key_value_heads": "llama", "head_dim": "qwen3", "rms_norm_eps": "llama",
    "tie_word_embeddings": "gemma", "rope_theta": "llama", "rope_scaling": "llama-llama3-rope",
    "rope_parameters": "qwen3-yarn", "partial_rotary_factor": "phi3-partial-rope-window",
    "hidden_act": "llama-gelu", "attention_bias": "llama-bias", "mlp_bias": "llama-bias",
    "sliding_window": "mistral-window", "use_sliding_window": "qwen3-window",
    "max_window_layers": "qwen3-window", "layer_types": "gemma2",
    "hidden_activation": "gemma2", "query_pre_attn_scalar": "gemma2",
    "attn_logit_softcapping": "gemma2", "final_logit_softcapping": "gemma2",
    "sliding_window_pattern": "gemma3-all-local", "_sliding_window_pattern": "gemma3",
    "rope_local_base_freq": "gemma3",
    "original_max_position_embeddings": "phi3-longrope",
    "num_local_experts": "mixtral", "num_experts": "qwen3_moe", "num_experts_per_tok": "mixtral",
    "moe_intermediate_size": "qwen3_moe", "norm_topk_prob": "qwen3_moe-unnormalised",
    "decoder_sparse_step": "qwen3_moe-sparse-step", "mlp_only_layers": "qwen3_moe-dense-layers",
}

LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
         "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 10000.0}

# (what the config changes, the key the refusal must name)
REFUSED: list[tuple[dict[str, Any], str]] = [
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "architectures"),
    ({"architectures": ["Qwen2MoeForCausalLM"]}, "architectures"),
    ({"architectures": ["DeepseekV3ForCausalLM"]}, "architectures"),
    ({"quantization_config": {"quant_method": "awq", "bits": 4}}, "quantization_config"),
    ({"architectures": ["CustomForCausalLM"], "auto_map": {"AutoModelForCausalLM": "m.X"}},
     "architectures"),  # repository code is never run
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"hidden_act": "relu"}, "hidden_act"),
    ({"hidden_act": "gelu_new"}, "hidden_act"),
    ({"rope_scaling": {"type": "mrope", "mrope_section": [8, 8]}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "proportional", "rope_theta": 1e4}},
     "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}, "max_position_embeddings": 64},
     "rope_scaling.rope_type"),  # served past max_position_embeddings (max len 128 below)
    ({"logits_scaling": 2.0}, "logits_scaling"),  # a key nobody taught pagewire
    ({"attn_logit_softcapping": 30.0}, "attn_logit_softcapping"),  # not a Llama key
    ({"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "sliding_window": 8,
      "layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types"),
]


def test_every_key_a_family_reads_has_a_parity_case() -> None:
    read = set(COMMON_KEYS).union(*(f.keys for f in FAMILIES.values()))
    assert read - set(IMPLEMENTED) == set(), "keys implemented without a parity test"
    for key, case in IMPLEMENTED.items():
        assert case in CASES, f"{key}: no test_families case {case!r}"
    assert not read & INERT, "a key is either read or inert, not both"


@pytest.mark.parametrize("change,key", REFUSED, ids=[k for _, k in REFUSED])
def test_a_key_pagewire_cannot_honour_refuses_start_up_naming_it(
    change: dict[str, Any], key: str, tmp_path
) -> None:
    from worker_svc.models.llama import DecoderForCausalLM

    hf = {**LLAMA, **change}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(Unsupported) as err:
        read_model_dir(tmp_path)
        DecoderForCausalLM(ModelConfig.from_hf(hf), max_len=128)  # length-dependent refusals
    assert err.value.key == key and key.split(".")[0] in str(err.value)


def test_repository_code_beside_a_known_architecture_is_ignored_as_transformers_does() -> None:
    ModelConfig.from_hf({**LLAMA, "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}})


def test_every_family_reads_its_own_saved_config(tmp_path) -> None:
    """What transformers writes for each family passes the key check (nothing it saves is
    unknown), so the refusals above are about the keys, not about the families."""
    from family_models import model_dir

    for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3",
                 "mixtral", "qwen3_moe"):
        ModelConfig.from_hf(json.loads((model_dir(arch) / "config.json").read_text()))
