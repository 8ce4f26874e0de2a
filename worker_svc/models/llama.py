"""Llama-family decoder (Llama 2/3, Mistral, Qwen2) over a paged KV cache.

Written in the gpt-fast manner: a config dataclass, attention, feed-forward, blocks. The forward
pass takes one flattened batch of tokens (decodes first, then prefill chunks) and an
:class:`AttentionMetadata` that says where each token's K/V goes and what each sequence attends
to; the attention itself is a backend from ``kernels`` (torch reference on CPU, Triton on CUDA).
Weight names map from the Hugging Face checkpoint in :func:`load_weights`, next to the model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kernels import AttentionBackend, elementwise


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        heads = hf["num_attention_heads"]
        rope_theta = hf.get("rope_theta")
        rope_scaling = hf.get("rope_scaling")
        if rope_theta is None:  # transformers >= 5 nests these under rope_parameters
            params = hf.get("rope_parameters") or {}
            rope_theta = params.get("rope_theta", 10000.0)
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=hf.get("model_type") == "qwen2" or bool(hf.get("attention_bias", False)),
        )


@dataclass
class AttentionMetadata:
    """Where this step's tokens go and what they attend to; shared by every layer.

    Tokens are ordered: ``num_decode`` single-token sequences first, then the prefill chunks.
    """

    slot_mapping: Tensor  # [T] int64, -1 = do not store
    block_tables: Tensor  # [B, max_blocks] int32
    context_lens: Tensor  # [B] int32, tokens in cache incl. this step's
    cu_seqlens_q: Tensor  # [B_prefill + 1] int32, offsets of prefill chunks (from 0)
    num_decode: int  # sequences (= tokens) at the front that decode one token
    backend: AttentionBackend
    decode_plan: object | None = None  # the backend's per-step layout, made by plan()
    extend_plan: object | None = None

    def plan(self, k_cache: Tensor) -> None:
        """Let the backend lay the step out once for all layers (a no-op for backends without)."""
        b, nd = self.backend, self.num_decode
        if b.plan_decode is not None and nd:
            self.decode_plan = b.plan_decode(self.block_tables[:nd], self.context_lens[:nd], k_cache)
        if b.plan_extend is not None and self.context_lens.shape[0] > nd:
            self.extend_plan = b.plan_extend(
                self.block_tables[nd:], self.cu_seqlens_q, self.context_lens[nd:], k_cache
            )

    def decode(self, q: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float) -> Tensor:
        """Attention of the single-token sequences at the front of the batch."""
        nd = self.num_decode
        args = (q, k_cache, v_cache, self.block_tables[:nd], self.context_lens[:nd], scale)
        if self.decode_plan is None:
            return self.backend.decode(*args)
        return self.backend.decode(*args, plan=self.decode_plan)

    def extend(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float
    ) -> Tensor:
        """Attention of the prefill chunks; ``k``/``v`` are the chunks' own, already cached."""
        nd = self.num_decode
        args = (q, k_cache, v_cache, self.block_tables[nd:], self.cu_seqlens_q,
                self.context_lens[nd:], scale)
        if self.extend_plan is None:
            return self.backend.extend(*args)
        return self.backend.extend(*args, plan=self.extend_plan, new_kv=(k, v))


def _llama3_inv_freq(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1 frequency remapping: keep high frequencies, stretch low ones smoothly."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled)


def rope_cache(cfg: LlamaConfig, max_len: int) -> Tensor:
    """cos/sin table [max_len, head_dim] (cos in the first half, sin in the second), fp32."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, scaling)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind != "default":
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).float()


def apply_rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate-half RoPE (the Hugging Face Llama convention) in place. x [T, H, D]; cos/sin [T, 1, D/2].
    One Triton kernel on CUDA (kernels.elementwise)."""
    elementwise.rope_(x, cos, sin)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return elementwise.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        )
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.scale = self.head_dim**-0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata
    ) -> Tensor:
        T = x.shape[0]
        qkv = self.qkv_proj(x).view(T, self.n_heads + 2 * self.n_kv, self.head_dim)
        apply_rope_(qkv[:, : self.n_heads + self.n_kv], cos, sin)
        q, k, v = qkv.split([self.n_heads, self.n_kv, self.n_kv], dim=1)
        k_cache, v_cache = kv
        meta.backend.write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        nd = meta.num_decode
        parts = []
        if nd:
            parts.append(meta.decode(q[:nd], k_cache, v_cache, self.scale))
        if T > nd:
            parts.append(meta.extend(q[nd:], k[nd:], v[nd:], k_cache, v_cache, self.scale))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o_proj(out.reshape(T, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(elementwise.silu_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, kv: tuple[Tensor, Tensor], meta: AttentionMetadata
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("rope", rope_cache(cfg, max_len), persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata,
    ) -> Tensor:
        """Final hidden states [T, hidden] of every input token."""
        x = self.embed_tokens(input_ids)
        if kv_caches:
            meta.plan(kv_caches[0][0])
        # In the model's dtype, as Hugging Face rotates: RoPE runs in place on the projections.
        cos, sin = self.rope[positions].to(x.dtype).unsqueeze(1).chunk(2, dim=-1)
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x = layer(x, cos, sin, kv, meta)
        return self.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()


# Hugging Face checkpoint names -> (our parameter, shard index within a fused parameter).
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _fused_slice(model: LlamaForCausalLM, fused: str, shard: int) -> tuple[int, int]:
    cfg = model.cfg
    if fused == "gate_up_proj":
        return shard * cfg.intermediate_size, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    return [(0, q), (q, kv), (q + kv, kv)][shard]


def load_weights(model: LlamaForCausalLM, weights: Iterable[tuple[str, Tensor]]) -> None:
    """Copy checkpoint tensors into the model, fusing q/k/v and gate/up; fail on anything missing."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        if "rotary_emb.inv_freq" in hf_name:
            continue
        name = hf_name.removeprefix("model.")
        parts = name.split(".")
        target = parts[-2] if len(parts) >= 2 else ""
        if target in _FUSED:
            fused, shard = _FUSED[target]
            name = ".".join([*parts[:-2], fused, parts[-1]])
            start, size = _fused_slice(model, fused, shard)
            params[name].data.narrow(0, start, size).copy_(tensor)
            loaded.add(f"{name}#{shard}")
            continue
        if name not in params:
            raise KeyError(f"unexpected weight {hf_name!r} in checkpoint")
        params[name].data.copy_(tensor)
        loaded.add(name)
    if model.cfg.tie_word_embeddings and "lm_head.weight" not in loaded:
        model.lm_head.weight = model.embed_tokens.weight
        loaded.add("lm_head.weight")
    expected = set()
    for name in params:
        base = name.rsplit(".", 2)
        if len(base) == 3 and base[1] in ("qkv_proj", "gate_up_proj"):
            shards = 3 if base[1] == "qkv_proj" else 2
            expected.update(f"{name}#{i}" for i in range(shards))
        else:
            expected.add(name)
    if model.cfg.tie_word_embeddings:
        expected.add("lm_head.weight")
    missing = expected - loaded
    if missing:
        raise KeyError(f"checkpoint lacks weights: {sorted(missing)[:8]}")
