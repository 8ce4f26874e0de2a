"""Every rope type against transformers' own rotary embedding, from both config layouts.

transformers builds cos/sin from fp32 frequencies; pagewire from fp64 ones rounded once, so the
tables agree to fp32 rounding of the angle, which grows with the position (1.3e-4 at 4095).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

from worker_svc.models.refusal import Unsupported
from worker_svc.models.rope import check_max_len, rope_cache, rope_specs

HEAD_DIM, MAX_POS = 32, 4096
LONG = [1.0 + 0.25 * i for i in range(HEAD_DIM // 2)]
SHORT = [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)]
VARIANTS = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 512},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "yarn-mscale": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
                    "mscale": 0.707, "mscale_all_dim": 1.0, "beta_fast": 16, "truncate": False},
    "longrope": {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                 "original_max_position_embeddings": 1024},
}


def hf_table(name: str, params: dict, positions: torch.Tensor) -> torch.Tensor:
    """transformers' cos/sin at ``positions``, as one [n, D] (cos | sin, halves) table."""
    full = {"rope_theta": 50000.0, **params}
    kw = dict(hidden_size=128, num_attention_heads=4, head_dim=HEAD_DIM,
              max_position_embeddings=MAX_POS, rope_parameters=full)
    if name == "longrope":
        cfg = Phi3Config(**{k: v for k, v in kw.items() if k != "head_dim"},
                         original_max_position_embeddings=1024, pad_token_id=0)
        emb = Phi3RotaryEmbedding(cfg)
    else:
        emb = LlamaRotaryEmbedding(LlamaConfig(**kw))
    cos, sin = emb(torch.zeros(1, dtype=torch.float32), positions[None])
    half = HEAD_DIM // 2
    return torch.cat([cos[0, :, :half], sin[0, :, :half]], dim=-1)


def legacy_layout(params: dict) -> dict:
    """The same rope in transformers 4's layout: rope_theta beside a rope_scaling with 'type'."""
    scaling = {("type" if k == "rope_type" else k): v for k, v in params.items()}
    return {"rope_theta": 50000.0, "rope_scaling": None if params["rope_type"] == "default"
            else scaling, "original_max_position_embeddings": params.get(
                "original_max_position_embeddings")}


@pytest.mark.parametrize("layout", ["transformers5", "transformers4"])
@pytest.mark.parametrize("name", list(VARIANTS))
def test_rope_tables_match_transformers(name: str, layout: str) -> None:
    params = VARIANTS[name]
    hf = ({"rope_parameters": {"rope_theta": 50000.0, **params}} if layout == "transformers5"
          else legacy_layout(params))
    spec = rope_specs(hf, {"full_attention"})["full_attention"]
    served = 1024 if name == "longrope" else MAX_POS
    check_max_len(spec, served, MAX_POS)
    positions = torch.tensor([0, 1, 5, 100, 511, 1000, served - 1])
    ours = rope_cache(spec, HEAD_DIM, served, MAX_POS)[positions]
    torch.testing.assert_close(ours, hf_table(name.split("-")[0], params, positions),
                               atol=3e-4, rtol=0)


def test_yarn_and_longrope_scale_cos_and_sin_by_their_attention_factor() -> None:
    for name in ("yarn", "longrope"):
        spec = rope_specs({"rope_parameters": {"rope_theta": 1e4, **VARIANTS[name]}},
                          {"full_attention"})["full_attention"]
        table = rope_cache(spec, HEAD_DIM, 8, MAX_POS)
        assert float(table[0, 0]) > 1.05  # cos(0) times the factor


@pytest.mark.parametrize("name,threshold", [("dynamic", MAX_POS), ("longrope", 1024)])
def test_lengths_where_transformers_would_change_frequencies_are_refused(name, threshold) -> None:
    spec = rope_specs({"rope_parameters": {"rope_theta": 1e4, **VARIANTS[name]}},
                      {"full_attention"})["full_attention"]
    check_max_len(spec, threshold, MAX_POS)
    with pytest.raises(Unsupported, match=f"--max-model-len {threshold}"):
        check_max_len(spec, threshold + 1, MAX_POS)


def test_gemma3_local_layers_get_their_own_base_in_either_layout() -> None:
    new = rope_specs({"rope_parameters": {
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}},
        {"full_attention", "sliding_attention"})
    old = rope_specs({"rope_theta": 1e6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                      "rope_local_base_freq": 1e4}, {"full_attention", "sliding_attention"})
    for specs in (new, old):
        assert specs["full_attention"].theta == 1e6 and specs["full_attention"].kind == "linear"
        assert specs["sliding_attention"].theta == 1e4
        assert specs["sliding_attention"].kind == "default"
