"""The decoder every supported family shares, over a paged KV cache.

Written in the gpt-fast manner: attention, feed-forward, blocks, the model; what a family does
differently is a field of :class:`ModelConfig` (see ``config.FAMILIES``), not a copy of this file.
The forward pass takes one flattened batch of tokens (decodes first, then prefill chunks) and an
:class:`AttentionMetadata` that says where each token's K/V goes and what each sequence attends
to; the attention itself is a backend from ``kernels``, told per layer its sliding window and
score soft-capping. Checkpoint names map to these parameters in ``weights.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kernels import AttentionBackend
from kernels.cpu_decode_layers import LayerStack
from worker_svc.models.config import ModelConfig
from worker_svc.models.layers import MLP, RMSNorm, softcap
from worker_svc.models.moe import SparseMoeBlock
from worker_svc.models.rope import apply_rope_, check_max_len, mrope_rows, rope_cache


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
    every_slot_stored: bool = False  # slot_mapping holds no -1 (the runner checked, on the host)

    def write_kv(self, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor) -> None:
        """Store this layer's new K/V at the step's slots."""
        b = self.backend
        store = b.store_kv if self.every_slot_stored and b.store_kv is not None else b.write_kv
        store(k, v, k_cache, v_cache, self.slot_mapping)

    def plan(self, k_cache: Tensor) -> None:
        """Let the backend lay the step out once for all layers (a no-op for backends without)."""
        b, nd = self.backend, self.num_decode
        if b.plan_decode is not None and nd:
            self.decode_plan = b.plan_decode(self.block_tables[:nd], self.context_lens[:nd], k_cache)
        if b.plan_extend is not None and self.context_lens.shape[0] > nd:
            self.extend_plan = b.plan_extend(
                self.block_tables[nd:], self.cu_seqlens_q, self.context_lens[nd:], k_cache
            )

    def decode(
        self, q: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float,
        window: int | None = None, softcap: float | None = None,
    ) -> Tensor:
        """Attention of the single-token sequences at the front of the batch. ``window``: the
        layer's sliding window (None: the whole context); ``softcap``: its score soft-capping."""
        nd = self.num_decode
        args = (q, k_cache, v_cache, self.block_tables[:nd], self.context_lens[:nd], scale)
        kw = _layer_kwargs(window, softcap)
        if self.decode_plan is None:
            return self.backend.decode(*args, **kw)
        return self.backend.decode(*args, plan=self.decode_plan, **kw)

    def extend(
        self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, scale: float,
        window: int | None = None, softcap: float | None = None,
    ) -> Tensor:
        """Attention of the prefill chunks; ``k``/``v`` are the chunks' own, already cached."""
        nd = self.num_decode
        args = (q, k_cache, v_cache, self.block_tables[nd:], self.cu_seqlens_q,
                self.context_lens[nd:], scale)
        kw = _layer_kwargs(window, softcap)
        if self.extend_plan is None:
            return self.backend.extend(*args, **kw)
        return self.backend.extend(*args, plan=self.extend_plan, new_kv=(k, v), **kw)


def _layer_kwargs(window: int | None, softcap: float | None) -> dict[str, float]:
    """The per-layer attention arguments that are set: a layer without them calls the backend
    exactly as before they existed."""
    kw: dict[str, float] = {}
    if window is not None:
        kw["window"] = window
    if softcap is not None:
        kw["softcap"] = softcap
    return kw


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        self.q_size, self.kv_size = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.scale = cfg.attn_scale or self.head_dim**-0.5
        self.window, self.softcap = cfg.window(layer), cfg.attn_softcap
        self.rope_key = cfg.layer_types[layer]
        self.qk_norm = cfg.qk_norm  # a plain flag: hasattr on a Module misses through __getattr__
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, gemma=cfg.gemma > 0)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, gemma=cfg.gemma > 0)

    def forward(
        self, x: Tensor, rope: dict[str, tuple[Tensor, Tensor]], kv: tuple[Tensor, Tensor],
        meta: AttentionMetadata,
    ) -> Tensor:
        T, H = x.shape[0], self.n_heads
        qkv = self.qkv_proj(x).view(T, H + 2 * self.n_kv, self.head_dim)
        if self.qk_norm:  # per-head norms before rope (Qwen3, Gemma 3)
            self.q_norm.heads_(qkv[:, :H])
            self.k_norm.heads_(qkv[:, H : H + self.n_kv])
        apply_rope_(qkv[:, : H + self.n_kv], *rope[self.rope_key])
        q, k, v = qkv.split([H, self.n_kv, self.n_kv], dim=1)
        k_cache, v_cache = kv
        meta.write_kv(k, v, k_cache, v_cache)
        nd, layer_args = meta.num_decode, (self.scale, self.window, self.softcap)
        parts = []
        if nd:
            parts.append(meta.decode(q[:nd], k_cache, v_cache, *layer_args))
        if T > nd:
            parts.append(meta.extend(q[nd:], k[nd:], v[nd:], k_cache, v_cache, *layer_args))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        return self.o_proj(out.reshape(T, self.q_size))


class DecoderLayer(nn.Module):
    """Pre-norm attention and feed-forward; Gemma 2/3 also norm each sublayer's output
    ("sandwich" norms) before it joins the residual stream.

    The residual stream is carried as ``(x, pending)``: the stream is ``x + pending``, and the
    sum is formed by the next norm's fused add (elementwise.add_rms_norm_), so every add of the
    stream shares its pass over the stream with a norm."""

    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        sparse = cfg.moe is not None and cfg.moe.layers[layer]
        self.mlp = SparseMoeBlock(cfg) if sparse else MLP(cfg)
        norm = [cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma > 0]
        self.input_layernorm = RMSNorm(*norm)
        self.post_attention_layernorm = RMSNorm(*norm)
        self.sandwich = cfg.gemma >= 2
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(*norm)
            self.post_feedforward_layernorm = RMSNorm(*norm)

    def forward(
        self, x: Tensor, pending: Tensor | None, rope: dict[str, tuple[Tensor, Tensor]],
        kv: tuple[Tensor, Tensor], meta: AttentionMetadata,
    ) -> tuple[Tensor, Tensor]:
        """``(x, pending)`` in, ``(x, pending)`` out; ``x`` is updated in place."""
        h = self.self_attn(self.input_layernorm.after_add(x, pending), rope, kv, meta)
        if not self.sandwich:
            return x, self.mlp(self.post_attention_layernorm.after_add(x, h))
        normed = self.pre_feedforward_layernorm.after_add(x, self.post_attention_layernorm(h))
        return x, self.post_feedforward_layernorm(self.mlp(normed))


class DecoderForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, gemma=cfg.gemma > 0)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # A vision-language model's image side (set by the loader): pixels to the rows that
        # replace image placeholders' token embeddings. None for a text model.
        self.vision: nn.Module | None = None
        # A CPU worker's decode steps through every layer in one C call (set by the worker once
        # the weights are packed and the caches allocated; worker_svc/models/decode_layers.py).
        self.layer_stack: LayerStack | None = None
        self.init_rope(max_len)

    def init_rope(self, max_len: int, device: torch.device | None = None) -> None:
        """(Re)build one cos/sin table per layer type (Gemma 3's local layers have their own
        base); refuses a length the rope type cannot serve exactly (see rope.check_max_len). On
        the meta device (the loader builds there, then calls this again on the real one) only
        the shape: torch's reference ops would import torch._dynamo (1.3 s of a worker's start)
        to compute nothing."""
        cfg = self.cfg
        assert cfg.rope is not None
        target = device or torch.get_default_device()
        for key, spec in cfg.rope.items():
            check_max_len(spec, max_len, cfg.max_position_embeddings)
            table = (torch.empty(max_len, spec.rotary_dim(cfg.head_dim), device=target)
                     if target.type == "meta" else
                     rope_cache(spec, cfg.head_dim, max_len, cfg.max_position_embeddings).to(target))
            self.register_buffer(f"rope_{key}", table, persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: Tensor,
        positions: Tensor,
        kv_caches: list[tuple[Tensor, Tensor]],
        meta: AttentionMetadata,
        embeds: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Final hidden states [T, hidden] of every input token. ``positions``: [T], or [3, T]
        (temporal, height, width) for an M-RoPE model's step with image tokens. ``embeds`` (token indices,
        rows): input embeddings that replace those tokens' (image features at placeholders)."""
        x = self.embed_tokens(input_ids)
        if self.cfg.gemma:  # by sqrt(hidden) rounded to the model's dtype, as transformers does
            x = x * float(torch.tensor(self.cfg.hidden_size**0.5, dtype=x.dtype))
        if embeds is not None:  # image features are not scaled (transformers scales token rows)
            x[embeds[0]] = embeds[1].to(x.dtype)
        if kv_caches:
            meta.plan(kv_caches[0][0])
        # In the model's dtype, as Hugging Face rotates: RoPE runs in place on the projections.
        rope = {}
        for key in self.cfg.rope or {}:
            table = getattr(self, f"rope_{key}")
            rows = table[positions] if positions.dim() == 1 else mrope_rows(
                table, positions, self.cfg.mrope_section or ())
            rope[key] = rows.to(x.dtype).unsqueeze(1).chunk(2, dim=-1)
        stack, T = self.layer_stack, x.shape[0]
        if (stack is not None and embeds is None and positions.dim() == 1 and meta.num_decode == T
                and meta.every_slot_stored and stack.takes(T, kv_caches[0][0])):
            pending = stack.run(x, [rope[key] for key in stack.rope_keys], meta.slot_mapping,
                                meta.block_tables, meta.context_lens)
            return self.norm.after_add(x, pending)
        pending = None
        for layer, kv in zip(self.layers, kv_caches, strict=True):
            x, pending = layer(x, pending, rope, kv, meta)
        return self.norm.after_add(x, pending)

    @torch.inference_mode()
    def logits(self, hidden: Tensor) -> Tensor:
        return softcap(self.lm_head(hidden).float(), self.cfg.final_softcap)


# The runner names the model by its first family.
LlamaForCausalLM = DecoderForCausalLM
