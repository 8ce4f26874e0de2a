"""Checkpoint tensors into the decoder's parameters, and random weights for ``--load-format dummy``.

The decoder fuses what it multiplies together: q/k/v into ``qkv_proj``, gate/up into
``gate_up_proj``, and each MoE layer's experts into stacked ``w_gate_up [E, 2I, H]`` and
``w_down [E, H, I]``. Checkpoints come split (Llama, Qwen, Gemma, Mixtral's ``w1/w3/w2``,
Qwen3-MoE's per-expert projections) or already fused (Phi-3's ``qkv_proj``/``gate_up_proj``,
transformers 5's stacked ``experts.gate_up_proj``); every tensor lands in a slice of one
parameter, and loading fails if any slice is left unwritten or any tensor has nowhere to go.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from worker_svc.models.config import ModelConfig

# Split checkpoint name -> (fused parameter, shard index).
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}
# Per-expert names (Mixtral's, then Qwen3-MoE's) -> (stacked parameter, half of it or None).
_EXPERT = {"w1": ("w_gate_up", 0), "w3": ("w_gate_up", 1), "w2": ("w_down", None),
           "gate_proj": ("w_gate_up", 0), "up_proj": ("w_gate_up", 1), "down_proj": ("w_down", None)}
_EXPERT_NAME = re.compile(r"^(.*)\.experts\.(\d+)\.(\w+)\.weight$")
_STACKED = {"experts.gate_up_proj": "w_gate_up", "experts.down_proj": "w_down"}


def _shards(name: str, cfg: ModelConfig) -> int:
    """How many separately loaded pieces parameter ``name`` may come in."""
    parts = name.split(".")
    leaf = parts[-2] if parts[-1] in ("weight", "bias") else parts[-1]
    experts = cfg.moe.num_experts if cfg.moe else 0
    return {"qkv_proj": 3, "gate_up_proj": 2, "w_gate_up": 2 * experts, "w_down": experts}.get(leaf, 1)


def _fused_slice(cfg: ModelConfig, fused: str, shard: int) -> tuple[int, int]:
    if fused == "gate_up_proj":
        return shard * cfg.intermediate_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [(0, q), (q, kv), (q + kv, kv)][shard]


def _target(
    name: str, params: dict[str, nn.Parameter], cfg: ModelConfig
) -> tuple[str, Tensor | None, str]:
    """(our parameter, the slice of it to write or None for all of it, a shard id)."""
    name = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
    m = _EXPERT_NAME.match(name)
    if m and m.group(3) in _EXPERT:
        stacked, half = _EXPERT[m.group(3)]
        param, e = params[f"{m.group(1)}.{stacked}"], int(m.group(2))
        if half is None:
            return f"{m.group(1)}.{stacked}", param.data[e], f"{e}"
        size = param.shape[1] // 2
        return f"{m.group(1)}.{stacked}", param.data[e].narrow(0, half * size, size), f"{e}.{half}"
    for suffix, stacked in _STACKED.items():
        if name.endswith(suffix):
            return name.removesuffix(suffix) + stacked, None, "*"
    parts = name.split(".")
    if len(parts) >= 2 and parts[-2] in _FUSED:
        fused, shard = _FUSED[parts[-2]]
        name = ".".join([*parts[:-2], fused, parts[-1]])
        if name in params:
            start, size = _fused_slice(cfg, fused, shard)
            return name, params[name].data.narrow(0, start, size), str(shard)
    return name, None, "*"


def load_weights(model: nn.Module, weights: Iterable[tuple[str, Tensor]]) -> None:
    """Copy checkpoint tensors into the model; fail on anything missing or unexpected."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    params = dict(model.named_parameters())
    loaded: dict[str, set[str]] = {}
    for hf_name, tensor in weights:
        if "rotary_emb.inv_freq" in hf_name:
            continue
        name, dest, shard = _target(hf_name, params, cfg)
        if name not in params:
            raise KeyError(f"unexpected weight {hf_name!r} in checkpoint")
        dest = params[name].data if dest is None else dest
        if dest.shape != tensor.shape:
            raise ValueError(f"weight {hf_name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dest.shape)}")
        dest.copy_(tensor)
        loaded.setdefault(name, set()).add(shard)
    if cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.embed_tokens.weight
        loaded["lm_head.weight"] = {"*"}
    missing = [n for n in params if not _complete(loaded.get(n, set()), _shards(n, cfg))]
    if missing:
        raise KeyError(f"checkpoint lacks weights: {sorted(missing)[:8]}")


def _complete(shards: set[str], expected: int) -> bool:
    return "*" in shards or len(shards) == expected


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights, one fill per tensor on its device. Matrices are N(0, 1/fan_in), norms 1
    (Gemma's, stored as offsets from 1: 0) and biases 0: each projection keeps its input's scale,
    so the residual stream grows only like sqrt(layers) and activations and logits stay
    O(1)-O(10), finite in fp16 and bf16. Stacked experts are N(0, 1/fan_in) per expert."""
    cfg: ModelConfig = model.cfg  # type: ignore[assignment]
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() >= 2:
            param.normal_(0.0, param.shape[-1] ** -0.5, generator=gen)
        elif name.endswith("norm.weight"):
            param.fill_(0.0 if cfg.gemma else 1.0)
        else:
            param.zero_()
