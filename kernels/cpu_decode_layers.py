"""A decode step's decoder layers in one call (``csrc/decode_layers.c``).

Each layer of a decode step is ten or more C kernels (norms, four products, RoPE, the K/V store,
attention, the gated activation), and driving them one by one from Python costs more than some
of them: 2 ms of a 17 ms step of 64 sequences, 0.6 of a 2.9 ms step of one (the small test model,
docs/BENCHMARKS.md), while the OpenMP team's other thread waits. :class:`LayerStack` lays out
once where every layer's weights, norms and caches are, and :meth:`LayerStack.run` hands a step's
buffers to one C call that runs the same kernels in the same order; the results are the
kernels' own, bit for bit.

This module knows kernels, not models: the model side (worker_svc/models/decode_layers.py)
decides which decoders are a stack of these layers and builds the :class:`LayerWeights`.
``PAGEWIRE_CPU_DECODE_LAYERS=0`` turns it off (every step then runs layer by layer).
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from kernels import c_library, cpu_decode, cpu_elementwise, cpu_linear
from kernels.cpu_linear import BlockedWeight

SWITCH = "PAGEWIRE_CPU_DECODE_LAYERS"
_ptr, _i64, _f32, _int = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


class _Kernels(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("rows", "norm", "norm_heads", "add_norm", "rope",
                                          "silu_mul", "gelu_tanh_mul", "tanh16", "store_kv",
                                          "decode")]


class _Proj(ctypes.Structure):
    _fields_ = [("w", _ptr), ("n", _i64), ("k", _i64), ("kp", _i64), ("bias", _ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [(name, _ptr) for name in ("in_norm", "post_norm", "q_norm", "k_norm",
                                          "pre_ff_norm", "post_ff_norm")] + [
        ("qkv", _Proj), ("o", _Proj), ("gate_up", _Proj), ("down", _Proj), ("k_cache", _ptr),
        ("v_cache", _ptr), ("window", _i64), ("softcap", _f32), ("scale", _f32),
        ("gelu_tanh", _int), ("rope", _int)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, _i64) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "inter", "block_size", "elem")] + [
        ("eps", _f32), ("gemma", _int), ("q_bf16", _int), ("threads", _int)]


class _Step(ctypes.Structure):
    _fields_ = [("tokens", _i64)] + [(name, _ptr) for name in (
        "x", "pending", "normed", "qkv", "attn", "h", "gate_up", "act")] + [
        ("cos", _ptr * 2), ("sin", _ptr * 2), ("cs_stride", _i64), ("half", _i64),
        ("slots", _ptr), ("tables", _ptr), ("tables_stride", _i64), ("lens", _ptr)]


@functools.cache
def load() -> ctypes.CDLL | None:
    """The library, built if needed; None where it (or a kernel it calls) is unavailable."""
    if cpu_decode.load() is None or cpu_elementwise.load() is None:
        return None
    lib = c_library.load("decode_layers.c", c_library.BASE_FLAGS, SWITCH)
    if lib is None:
        return None
    lib.decode_layers.restype = _i64
    lib.decode_layers.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_Layer), _i64,
                                  ctypes.POINTER(_Shape), ctypes.POINTER(_Step)]
    return lib


def _address(fn: Callable[..., object]) -> int:
    return int(ctypes.cast(fn, ctypes.c_void_p).value or 0)


@functools.cache
def _kernels(dtype: torch.dtype, rows: int, tanh16: int) -> _Kernels:
    """The kernels of ``dtype``, the products' at address ``rows``; ``tanh16``: torch's vector
    tanh for GeGLU (0 where no layer has it)."""
    suffix = cpu_elementwise.SUFFIX[dtype]
    el, attn = cpu_elementwise.load(), cpu_decode.load()
    decode = attn.paged_decode_bf16 if dtype == torch.bfloat16 else attn.paged_decode_f32
    return _Kernels(
        rows, *(_address(getattr(el, f"{name}_{suffix}"))
                for name in ("rms_norm", "rms_norm_heads", "add_rms_norm", "rope", "silu_mul",
                             "gelu_tanh_mul")),
        tanh16, _address(attn.store_kv_rows), _address(decode))


def _pointers(pair: tuple[Tensor, Tensor] | None) -> tuple[int | None, int | None]:
    return (None, None) if pair is None else (pair[0].data_ptr(), pair[1].data_ptr())


@dataclass(frozen=True)
class Projection:
    weight: BlockedWeight
    bias: Tensor | None  # the weight's dtype, contiguous

    def struct(self) -> _Proj:
        w = self.weight
        bias = None if self.bias is None else self.bias.data_ptr()
        return _Proj(w.address, w.out_features, w.in_features, w.padded_in, bias)


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the C loop runs it: a norm, the fused q/k/v projection, per-head q/k
    norms where it has them (Qwen3, Gemma 3), rotate-half RoPE from one of the step's tables,
    paged attention, the output projection, the residual add and the MLP's norm (Gemma 2 and 3:
    the attention's output normed first), a gated MLP (SiLU, or Gemma's tanh GELU), Gemma 2 and
    3's norm of its output."""

    in_norm: Tensor  # [hidden], the model's dtype, contiguous
    post_norm: Tensor  # the MLP's input norm; with a sandwich, the attention output's
    qk_norms: tuple[Tensor, Tensor] | None  # [head dim] each
    sandwich: tuple[Tensor, Tensor] | None  # the MLP's input norm and its output's
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    k_cache: Tensor  # [blocks, block size, KV heads, head dim], contiguous
    v_cache: Tensor
    scale: float
    window: int | None  # sliding window (None: the whole context)
    softcap: float | None  # attention score soft-capping
    gelu_tanh: bool  # the MLP's activation: tanh GELU (GeGLU), else SiLU
    rope: int  # which of the step's RoPE tables, 0 or 1


class LayerStack:
    """Every layer's pointers, laid out once; :meth:`run` runs a decode step through them."""

    def __init__(self, layers: list[LayerWeights], heads: int, head_dim: int, eps: float,
                 gemma: bool, rope_keys: tuple[str, ...]) -> None:
        """``gemma``: every norm is Gemma's; ``rope_keys``: the caller's names of the RoPE tables
        :meth:`run` takes, in order (at most two)."""
        assert 1 <= len(rope_keys) <= 2
        self.rope_keys = rope_keys
        first = layers[0]
        self.dtype = first.in_norm.dtype
        self.hidden = first.in_norm.shape[0]
        self.inter = first.down.weight.in_features
        self.q_size = heads * head_dim
        _, block_size, kv_heads, _ = first.k_cache.shape
        self.qkv_size = self.q_size + 2 * kv_heads * head_dim
        self._layers = (_Layer * len(layers))(*(
            _Layer(w.in_norm.data_ptr(), w.post_norm.data_ptr(), *_pointers(w.qk_norms),
                   *_pointers(w.sandwich), w.qkv.struct(), w.o.struct(), w.gate_up.struct(),
                   w.down.struct(), w.k_cache.data_ptr(), w.v_cache.data_ptr(), w.window or 0,
                   w.softcap or 0.0, w.scale, int(w.gelu_tanh), w.rope)
            for w in layers))
        self._keep = layers  # the tensors those pointers are into
        self._first_cache = first.k_cache.data_ptr()
        # found and checked at start-up (tens of ms), and only for a model that uses it
        self._tanh16 = (cpu_elementwise.torch_tanh16() if any(w.gelu_tanh for w in layers)
                        else 0)
        self._shape = _Shape(self.hidden, heads, kv_heads, head_dim, self.inter, block_size,
                             first.in_norm.element_size(), eps, int(gemma),
                             int(self.dtype == torch.bfloat16), 1)

    def takes(self, tokens: int, k_cache: Tensor) -> bool:
        """Whether a product kernel here takes ``tokens`` rows, and ``k_cache`` (the step's first
        layer's) is the cache laid out (else the step runs layer by layer)."""
        return (k_cache.data_ptr() == self._first_cache
                and cpu_linear.kernel(self.dtype, tokens) is not None)

    def run(self, x: Tensor, rope: list[tuple[Tensor, Tensor]], slots: Tensor, tables: Tensor,
            lens: Tensor) -> Tensor:
        """A decode step of ``x.shape[0]`` sequences (check :meth:`takes`): ``x`` [T, hidden], the
        embeddings, becomes the residual stream after the last layer's attention half, and the
        last MLP's output is returned (the stream is their sum, as the Python layers leave it).
        ``rope``: (cos, sin) rows of each table of ``rope_keys``, [T, 1, R/2] in x's dtype, all
        with one row stride and R; slots [T] (no -1); tables [T, width]; lens [T]."""
        tokens, dtype = x.shape[0], self.dtype
        cos, sin = rope[0]
        assert x.is_contiguous() and x.dtype == dtype and len(rope) == len(self.rope_keys)
        for c, s in rope:
            assert c.dtype == s.dtype == dtype and c.shape == cos.shape
            assert c.stride(0) == s.stride(0) == cos.stride(0) and c.stride(-1) == s.stride(-1) == 1
        pairs = rope * 2  # a second table's slot, unused with one
        rows = cpu_linear.kernel(dtype, tokens)
        assert rows is not None, f"no product kernel for {tokens} rows"
        widths = (self.hidden, self.hidden, self.qkv_size, self.q_size, self.hidden,
                  2 * self.inter, self.inter)
        space = torch.empty(tokens * sum(widths), dtype=dtype)
        pending, normed, qkv, attn, h, gate_up, act = (
            t.view(tokens, -1) for t in space.split([tokens * w for w in widths]))
        self._shape.threads = torch.get_num_threads()
        slots = slots.to(torch.int64).contiguous()
        tables, lens = tables.to(torch.int32).contiguous(), lens.to(torch.int32).contiguous()
        step = _Step(tokens, x.data_ptr(), pending.data_ptr(), normed.data_ptr(), qkv.data_ptr(),
                     attn.data_ptr(), h.data_ptr(), gate_up.data_ptr(), act.data_ptr(),
                     (_ptr * 2)(*(c.data_ptr() for c, _ in pairs[:2])),
                     (_ptr * 2)(*(s.data_ptr() for _, s in pairs[:2])), cos.stride(0),
                     cos.shape[-1],
                     slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr())
        kernels = _kernels(dtype, _address(rows), self._tanh16)
        failed = load().decode_layers(ctypes.byref(kernels), self._layers,
                                      len(self._layers), ctypes.byref(self._shape),
                                      ctypes.byref(step))
        if failed >= 0:  # checked above; the caches and x are then partly written: fail the step
            raise RuntimeError(f"decode layers: a kernel of layer {failed} declined {tokens} rows")
        return pending
