"""Which decoders run a CPU decode step's layers in one C call (kernels/cpu_decode_layers.py).

The C loop runs a fixed layer: Llama's pre-norms, a fused q/k/v projection, rotate-half RoPE from
one table, paged attention (with the layer's window and soft-cap), the output projection, and a
SiLU-gated dense MLP, every projection a packed weight a product kernel reads, and Qwen3's per-head
q/k norms where a layer has them. Llama, Mistral, Phi-3, Qwen2 and Qwen3 decoders are that; a model
with any other layer (Gemma's norms and activations, mixture-of-experts, M-RoPE) keeps the Python layers for every step, as does a worker
whose attention backend is not the compiled CPU one (a ``--attention-backend`` the user picked
is honoured). The Python layers stay the definition: tests check the stack against them bit for
bit.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from kernels import AttentionBackend, cpu_decode, cpu_decode_layers
from kernels.cpu_decode_layers import LayerStack, LayerWeights, Projection
from worker_svc.models.layers import MLP, RMSNorm
from worker_svc.models.llama import DecoderForCausalLM, DecoderLayer
from worker_svc.models.packed_linear import PackedLinear

log = logging.getLogger("worker")


def _projection(linear: torch.nn.Module) -> Projection | None:
    if not isinstance(linear, PackedLinear) or linear.blocked is None:
        return None
    bias = linear.bias
    if bias is not None and (bias.dtype != linear.dtype or not bias.is_contiguous()):
        return None
    return Projection(linear.blocked, bias)


def _layer(layer: DecoderLayer, kv: tuple[Tensor, Tensor], dtype: torch.dtype
           ) -> LayerWeights | None:
    attn, mlp = layer.self_attn, layer.mlp
    norm_modules = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.qk_norm:
        norm_modules += [attn.q_norm, attn.k_norm]
    if (layer.sandwich or type(mlp) is not MLP or mlp.activation != "silu"
            or any(n.gemma for n in norm_modules)):
        return None
    projections = [_projection(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                            mlp.down_proj)]
    norms = [n.weight.detach() for n in norm_modules]
    if (None in projections or any(n.dtype != dtype or not n.is_contiguous() for n in norms)
            or not all(c.is_contiguous() and c.dtype == dtype for c in kv)):
        return None
    qkv, o, gate_up, down = projections
    qk_norms = (norms[2], norms[3]) if attn.qk_norm else None
    return LayerWeights(norms[0], norms[1], qk_norms, qkv, o, gate_up, down, kv[0], kv[1],
                        attn.scale, attn.window, attn.softcap)


def build(model: DecoderForCausalLM, kv_caches: list[tuple[Tensor, Tensor]],
          backend: AttentionBackend) -> LayerStack | None:
    """The model's layers as one stack, or None where a layer, the backend or the CPU does not
    allow it (see the module's docstring)."""
    cfg = model.cfg
    dtype = model.embed_tokens.weight.dtype
    if (backend.name != "cpu" or cpu_decode_layers.load() is None or model.vision is not None
            or cfg.mrope_section is not None or not cfg.rope or not kv_caches
            or dtype not in (torch.bfloat16, torch.float32)):
        return None
    tables = [getattr(model, f"rope_{key}") for key in cfg.rope]
    if not all(torch.equal(t, tables[0]) for t in tables):  # one RoPE table for every layer
        return None
    k_cache = kv_caches[0][0]
    if k_cache.device.type != "cpu" or not cpu_decode.supports(
            torch.empty(0, cfg.num_attention_heads, cfg.head_dim, dtype=dtype), k_cache):
        return None
    eps = {m.eps for m in model.layers.modules() if isinstance(m, RMSNorm)}
    layers = [_layer(layer, kv, dtype) for layer, kv in zip(model.layers, kv_caches, strict=True)]
    if None in layers or len(eps) != 1:
        return None
    log.info("decode steps run the %d decoder layers in one C call", len(layers))
    return LayerStack(layers, cfg.num_attention_heads, cfg.head_dim, eps.pop())
