"""Which decoders run a CPU decode step's layers in one C call (kernels/cpu_decode_layers.py).

The C loop runs a dense decoder layer in the layouts the supported families use: pre-norms
(Llama's or Gemma's), a fused q/k/v projection, per-head q/k norms (Qwen3, Gemma 3), rotate-half
RoPE from one of at most two tables (Gemma 3's local layers have their own), paged attention with
the layer's window and soft-cap, the output projection, Gemma 2 and 3's sandwich norms, a gated
MLP with SiLU or Gemma's tanh GELU (the latter where torch's own vector tanh is found, so that it
computes what torch does), every projection a packed weight a product kernel reads. Llama,
Mistral, Phi-3, Qwen2, Qwen3 and Gemma 1-3 decoders are that; mixture-of-experts layers, exact
(erf) GELU, M-RoPE and vision models keep the Python layers for every step, as does a worker
whose attention backend is not the compiled CPU one (a ``--attention-backend`` the user picked
is honoured). The Python layers stay the definition: tests check the stack against them bit for
bit.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from kernels import AttentionBackend, cpu_decode, cpu_decode_layers, cpu_elementwise
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


def _norms(layer: DecoderLayer) -> list[RMSNorm]:
    """The layer's norms in LayerWeights' order: input, post-attention, [q, k], [pre-, post-MLP]."""
    attn = layer.self_attn
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    if attn.qk_norm:
        norms += [attn.q_norm, attn.k_norm]
    if layer.sandwich:
        norms += [layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm]
    return norms


def _layer(layer: DecoderLayer, kv: tuple[Tensor, Tensor], dtype: torch.dtype, rope: int
           ) -> LayerWeights | None:
    attn, mlp = layer.self_attn, layer.mlp
    if type(mlp) is not MLP or mlp.activation not in ("silu", "gelu_tanh"):
        return None
    if mlp.activation == "gelu_tanh" and not (cpu_elementwise.torch_tanh16()
                                              and mlp.down_proj.in_features % 16 == 0):
        return None
    projections = [_projection(p) for p in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                            mlp.down_proj)]
    norms = [n.weight.detach() for n in _norms(layer)]
    if (None in projections or any(n.dtype != dtype or not n.is_contiguous() for n in norms)
            or not all(c.is_contiguous() and c.dtype == dtype for c in kv)):
        return None
    qkv, o, gate_up, down = projections
    qk_norms = (norms[2], norms[3]) if attn.qk_norm else None
    sandwich = (norms[-2], norms[-1]) if layer.sandwich else None
    return LayerWeights(norms[0], norms[1], qk_norms, sandwich, qkv, o, gate_up, down, kv[0],
                        kv[1], attn.scale, attn.window, attn.softcap,
                        mlp.activation == "gelu_tanh", rope)


def _rope_tables(model: DecoderForCausalLM) -> tuple[tuple[str, ...], dict[str, int]] | None:
    """The distinct RoPE tables (at most two: Gemma 3's global and local) by one key each, and
    each key's index among them; None with more."""
    keys: list[str] = []
    index: dict[str, int] = {}
    for key in model.cfg.rope or {}:
        table = getattr(model, f"rope_{key}")
        same = next((i for i, k in enumerate(keys)
                     if torch.equal(getattr(model, f"rope_{k}"), table)), None)
        if same is None:
            keys.append(key)
            same = len(keys) - 1
        index[key] = same
    return (tuple(keys), index) if 1 <= len(keys) <= 2 else None


def build(model: DecoderForCausalLM, kv_caches: list[tuple[Tensor, Tensor]],
          backend: AttentionBackend) -> LayerStack | None:
    """The model's layers as one stack, or None where a layer, the backend or the CPU does not
    allow it (see the module's docstring)."""
    cfg = model.cfg
    dtype = model.embed_tokens.weight.dtype
    if (backend.name != "cpu" or cpu_decode_layers.load() is None or model.vision is not None
            or cfg.mrope_section is not None or not kv_caches
            or dtype not in (torch.bfloat16, torch.float32)):
        return None
    ropes = _rope_tables(model)
    k_cache = kv_caches[0][0]
    if ropes is None or k_cache.device.type != "cpu" or not cpu_decode.supports(
            torch.empty(0, cfg.num_attention_heads, cfg.head_dim, dtype=dtype), k_cache):
        return None
    keys, index = ropes
    norms = [n for layer in model.layers for n in _norms(layer)]
    eps, gemma = {n.eps for n in norms}, {n.gemma for n in norms}
    layers = [_layer(layer, kv, dtype, index[layer.self_attn.rope_key])
              for layer, kv in zip(model.layers, kv_caches, strict=True)]
    if None in layers or len(eps) != 1 or len(gemma) != 1:
        return None
    log.info("decode steps run the %d decoder layers in one C call", len(layers))
    return LayerStack(layers, cfg.num_attention_heads, cfg.head_dim, eps.pop(), gemma.pop(), keys)
