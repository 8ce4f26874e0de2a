"""A decode step's decoder layers in one call (``csrc/decode_layers.c``).

Each layer of a decode step is ten C kernels (two norms, four products, RoPE, the K/V store,
attention, SiLU-and-multiply), and driving them one by one from Python costs more than some of
them: 2 ms of a 17 ms step of 64 sequences, 0.6 of a 2.9 ms step of one (the small test model,
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
    _fields_ = [(name, _ptr) for name in
                ("rows", "norm", "norm_heads", "add_norm", "rope", "silu_mul", "store_kv", "decode")]


class _Proj(ctypes.Structure):
    _fields_ = [("w", _ptr), ("n", _i64), ("k", _i64), ("kp", _i64), ("bias", _ptr)]


class _Layer(ctypes.Structure):
    _fields_ = [("in_norm", _ptr), ("post_norm", _ptr), ("q_norm", _ptr), ("k_norm", _ptr),
                ("qkv", _Proj), ("o", _Proj),
                ("gate_up", _Proj), ("down", _Proj), ("k_cache", _ptr), ("v_cache", _ptr),
                ("window", _i64), ("softcap", _f32), ("scale", _f32)]


class _Shape(ctypes.Structure):
    _fields_ = [(name, _i64) for name in
                ("hidden", "heads", "kv_heads", "head_dim", "inter", "block_size", "elem")] + [
        ("eps", _f32), ("q_bf16", _int), ("threads", _int)]


class _Step(ctypes.Structure):
    _fields_ = [("tokens", _i64)] + [(name, _ptr) for name in (
        "x", "pending", "normed", "qkv", "attn", "h", "gate_up", "act", "cos", "sin")] + [
        ("cs_stride", _i64), ("half", _i64), ("slots", _ptr), ("tables", _ptr),
        ("tables_stride", _i64), ("lens", _ptr)]


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
def _kernels(dtype: torch.dtype, rows: int) -> _Kernels:
    """The kernels of ``dtype``, the products' at address ``rows``."""
    suffix = cpu_elementwise.SUFFIX[dtype]
    el, attn = cpu_elementwise.load(), cpu_decode.load()
    decode = attn.paged_decode_bf16 if dtype == torch.bfloat16 else attn.paged_decode_f32
    return _Kernels(
        rows, *(_address(getattr(el, f"{name}_{suffix}"))
                          for name in ("rms_norm", "rms_norm_heads", "add_rms_norm", "rope",
                                       "silu_mul")),
        _address(attn.store_kv_rows), _address(decode))


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
    """One decoder layer as the C loop runs it: Llama's pre-norms (no Gemma offset), the fused q/k/v
    projection, Qwen3's per-head q/k norms where it has them, rotate-half RoPE, paged attention,
    the output projection, a SiLU-gated MLP."""

    in_norm: Tensor  # [hidden], the model's dtype, contiguous
    post_norm: Tensor
    qk_norms: tuple[Tensor, Tensor] | None  # [head dim] each
    qkv: Projection
    o: Projection
    gate_up: Projection
    down: Projection
    k_cache: Tensor  # [blocks, block size, KV heads, head dim], contiguous
    v_cache: Tensor
    scale: float
    window: int | None  # sliding window (None: the whole context)
    softcap: float | None  # attention score soft-capping


class LayerStack:
    """Every layer's pointers, laid out once; :meth:`run` runs a decode step through them."""

    def __init__(self, layers: list[LayerWeights], heads: int, head_dim: int, eps: float) -> None:
        first = layers[0]
        self.dtype = first.in_norm.dtype
        self.hidden = first.in_norm.shape[0]
        self.inter = first.down.weight.in_features
        self.q_size = heads * head_dim
        _, block_size, kv_heads, _ = first.k_cache.shape
        self.qkv_size = self.q_size + 2 * kv_heads * head_dim
        self._layers = (_Layer * len(layers))(*(
            _Layer(w.in_norm.data_ptr(), w.post_norm.data_ptr(),
                   *((None, None) if w.qk_norms is None else (n.data_ptr() for n in w.qk_norms)),
                   w.qkv.struct(), w.o.struct(),
                   w.gate_up.struct(), w.down.struct(), w.k_cache.data_ptr(),
                   w.v_cache.data_ptr(), w.window or 0, w.softcap or 0.0, w.scale)
            for w in layers))
        self._keep = layers  # the tensors those pointers are into
        self._first_cache = first.k_cache.data_ptr()
        self._shape = _Shape(self.hidden, heads, kv_heads, head_dim, self.inter, block_size,
                             first.in_norm.element_size(), eps, int(self.dtype == torch.bfloat16),
                             1)

    def takes(self, tokens: int, k_cache: Tensor) -> bool:
        """Whether a product kernel here takes ``tokens`` rows, and ``k_cache`` (the step's first
        layer's) is the cache laid out (else the step runs layer by layer)."""
        return (k_cache.data_ptr() == self._first_cache
                and cpu_linear.kernel(self.dtype, tokens) is not None)

    def run(self, x: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, tables: Tensor,
            lens: Tensor) -> Tensor:
        """A decode step of ``x.shape[0]`` sequences (check :meth:`takes`): ``x`` [T, hidden], the
        embeddings, becomes the residual stream after the last layer's attention half, and the
        last MLP's output is returned (the stream is their sum, as the Python layers leave it).
        cos/sin [T, 1, R/2] in x's dtype with a common row stride; slots [T] (no -1); tables
        [T, width]; lens [T]."""
        tokens, dtype = x.shape[0], self.dtype
        assert x.is_contiguous() and x.dtype == dtype and cos.dtype == sin.dtype == dtype
        assert cos.stride(0) == sin.stride(0) and cos.stride(-1) == sin.stride(-1) == 1
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
                     cos.data_ptr(), sin.data_ptr(), cos.stride(0), cos.shape[-1],
                     slots.data_ptr(), tables.data_ptr(), tables.stride(0), lens.data_ptr())
        failed = load().decode_layers(ctypes.byref(_kernels(dtype, _address(rows))), self._layers,
                                      len(self._layers), ctypes.byref(self._shape),
                                      ctypes.byref(step))
        if failed >= 0:  # checked above; the caches and x are then partly written: fail the step
            raise RuntimeError(f"decode layers: layer {failed}'s product kernel declined "
                               f"{tokens} rows")
        return pending
