"""The compiled bfloat16 and float32 elementwise operations of the CPU (``csrc/elementwise.c``),
one pass and one call each where the torch definitions (kernels/elementwise.py) take several.

They round where the torch definitions round; what may differ is the last bit of a float32 sum
of squares (its order) or of expf. In bfloat16 that bit shows only where it decides a bfloat16
rounding (tests/kernels/test_cpu_elementwise.py bounds how often); in float32 the outputs are
within a few units in the last place of torch's, as float32's products, packed for oneDNN,
already are of transformers' MKL ones. With them a float32 decode step of one sequence took
8.1 ms against 9.5 with the torch definitions (docs/BENCHMARKS.md). ``PAGEWIRE_CPU_ELEMENTWISE=0``
turns them off (and with them ``argmax``, the sampler's one vectorised pass per row, for which
torch's CPU kernel compares one element at a time).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels import c_library
from kernels.row_buckets import empty_rows

FLAGS = [*c_library.BASE_FLAGS, "-mprefer-vector-width=512", "-ffp-contract=off"]


@functools.cache
def load() -> ctypes.CDLL | None:
    return build(FLAGS)


def build(flags: list[str]) -> ctypes.CDLL | None:
    """The library compiled with ``flags`` (tests also build it with AVX-512 off: the plain C
    rows a CPU without it runs)."""
    lib = c_library.load("elementwise.c", flags, "PAGEWIRE_CPU_ELEMENTWISE", ("-lmvec", "-lm"))
    if lib is None:
        return None
    i64, f32, ptr, i32 = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p, ctypes.c_int
    signatures = {
        "rms_norm": [ptr, i64, ptr, ptr, i64, i64, f32, i32, i32],
        "rms_norm_heads": [ptr, i64, i64, i64, i64, ptr, f32, i32, i32],
        "add_rms_norm": [ptr, ptr, ptr, ptr, ptr, i64, i64, f32, i32, i32],
        "rope": [ptr, i64, i64, i64, i64, i64, ptr, ptr, i64, i32],
        "silu_mul": [ptr, i64, ptr, i64, i64, i32],
        "gelu_tanh_mul": [ptr, i64, ptr, i64, i64, ptr, i32],
    }
    for name, args in signatures.items():
        for suffix in SUFFIX.values():
            fn = getattr(lib, f"{name}_{suffix}")
            fn.restype, fn.argtypes = (ctypes.c_int if name == "gelu_tanh_mul" else None), args
    lib.argmax_f32.restype, lib.argmax_f32.argtypes = None, [ptr, i64, i64, i64, ptr, i32]
    return lib


SUFFIX = {torch.bfloat16: "bf16", torch.float32: "f32"}


def _fn(name: str, x: Tensor):  # noqa: ANN202
    """The library's ``name`` for x's dtype."""
    return getattr(load(), f"{name}_{SUFFIX[x.dtype]}")


def takes(x: Tensor) -> bool:
    """Whether the compiled operations take ``x``: bfloat16 or float32 on the CPU, last dim
    contiguous."""
    return x.dtype in SUFFIX and x.is_cpu and x.stride(-1) == 1 and load() is not None


def takes_rope(x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether :func:`rope_` takes this call: heads contiguous in a token, cos/sin rows with a
    common stride and contiguous values (else the torch definition runs)."""
    return (x.dim() == 3 and x.stride(1) == x.shape[2] and cos.stride(0) == sin.stride(0)
            and cos.stride(-1) == sin.stride(-1) == 1 and cos.dtype == sin.dtype == x.dtype
            and takes(x))


def rms_norm(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    """kernels.elementwise.rms_norm's contract for 2-D ``x`` whose rows are evenly strided."""
    assert x.dim() == 2
    rows, dim = x.shape
    out = empty_rows(rows, dim, dtype=x.dtype)  # a product's input: room for its bucketed rows
    w = weight.to(x.dtype).contiguous()
    _fn("rms_norm", x)(x.data_ptr(), x.stride(0), w.data_ptr(), out.data_ptr(), rows, dim, eps,
                       int(gemma), torch.get_num_threads())
    return out


def takes_heads(x: Tensor) -> bool:
    """Whether :func:`rms_norm_heads_` takes ``x``: [T, H, D], heads side by side in a token."""
    return x.dim() == 3 and x.stride(1) == x.shape[2] and takes(x)


def rms_norm_heads_(x: Tensor, weight: Tensor, eps: float, gemma: bool) -> None:
    """kernels.elementwise.rms_norm_heads_'s contract (check :func:`takes_heads`)."""
    tokens, heads, dim = x.shape
    w = weight.to(x.dtype).contiguous()
    _fn("rms_norm_heads", x)(x.data_ptr(), x.stride(0), tokens, heads, dim, w.data_ptr(), eps,
                             int(gemma), torch.get_num_threads())


def add_rms_norm_(x: Tensor, h: Tensor, weight: Tensor, eps: float, gemma: bool) -> Tensor:
    """kernels.elementwise.add_rms_norm_'s contract for contiguous 2-D ``x`` and ``h``."""
    assert x.dim() == 2 and x.is_contiguous() and h.is_contiguous()
    rows, dim = x.shape
    out = empty_rows(rows, dim, dtype=x.dtype)  # a product's input: room for its bucketed rows
    w = weight.to(x.dtype).contiguous()
    _fn("add_rms_norm", x)(x.data_ptr(), h.data_ptr(), w.data_ptr(), x.data_ptr(), out.data_ptr(),
                           rows, dim, eps, int(gemma), torch.get_num_threads())
    return out


def rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """kernels.elementwise.rope_'s contract: x [T, H, D] with heads contiguous in a token,
    cos/sin [T, 1, R/2] views with a common row stride."""
    tokens, heads, dim = x.shape
    assert x.stride(1) == dim and cos.stride(0) == sin.stride(0) and cos.stride(-1) == 1
    _fn("rope", x)(x.data_ptr(), x.stride(0), dim, tokens, heads, cos.shape[-1], cos.data_ptr(),
                   sin.data_ptr(), cos.stride(0), torch.get_num_threads())


def silu_mul(gate_up: Tensor) -> Tensor:
    """silu(gate) * up of a fused 2-D [T, 2 * I] projection -> a new contiguous [T, I]."""
    assert gate_up.dim() == 2
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = empty_rows(tokens, inter, dtype=gate_up.dtype)  # the down projection's input
    _fn("silu_mul", gate_up)(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(), tokens, inter,
                             torch.get_num_threads())
    return out


@functools.cache
def torch_tanh16() -> int:
    """The address of the vector tanh torch's CPU kernels use on 16 float32 lanes (Sleef's, which
    libtorch exports), if this torch has it and the compiled GeGLU with it gives torch's own
    GELU bit for bit in both dtypes here; else 0 (GeGLU then runs torch's ops)."""
    lib = load()
    try:
        torch_cpu = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        address = int(ctypes.cast(torch_cpu.Sleef_tanhf16_u10, ctypes.c_void_p).value or 0)
    except (OSError, AttributeError):
        return 0
    if lib is None or not address:
        return 0
    g = torch.Generator().manual_seed(0)
    for dtype in SUFFIX:
        gate_up = (torch.randn(8, 2 * 4096, generator=g) * 4).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        want = F.gelu(gate, approximate="tanh") * up
        got = torch.empty_like(want)
        done = _fn("gelu_tanh_mul", gate_up)(gate_up.data_ptr(), gate_up.stride(0), got.data_ptr(),
                                              8, 4096, address, 1)
        if not done or not torch.equal(got, want):
            return 0
    return address


def takes_gelu_tanh(gate_up: Tensor) -> bool:
    """Whether :func:`gelu_tanh_mul` takes this fused [T, 2 * I] projection (I a multiple of 16,
    and torch's tanh found and checked)."""
    return (gate_up.dim() == 2 and gate_up.shape[1] % 32 == 0 and gate_up.stride(1) == 1
            and takes(gate_up) and torch_tanh16() != 0)


def gelu_tanh_mul(gate_up: Tensor) -> Tensor:
    """GeGLU, gelu_tanh(gate) * up, of a fused [T, 2 * I] projection -> a new contiguous [T, I],
    as torch's ``F.gelu(gate, approximate="tanh") * up`` (check :func:`takes_gelu_tanh`)."""
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = empty_rows(tokens, inter, dtype=gate_up.dtype)
    done = _fn("gelu_tanh_mul", gate_up)(gate_up.data_ptr(), gate_up.stride(0), out.data_ptr(),
                                          tokens, inter, torch_tanh16(), torch.get_num_threads())
    assert done, "takes_gelu_tanh checked the call"
    return out


def takes_argmax(x: Tensor) -> bool:
    """Whether :func:`argmax` takes ``x``: float32 [rows, cols] on the CPU, values contiguous."""
    return x.dim() == 2 and x.dtype == torch.float32 and x.shape[1] > 0 and takes(x)


def argmax(x: Tensor) -> Tensor:
    """``x.argmax(dim=-1)`` of a 2-D float32 ``x`` (the first of equal maxima; NaN wins)."""
    rows, cols = x.shape
    out = torch.empty(rows, dtype=torch.int64)
    load().argmax_f32(x.data_ptr(), x.stride(0), rows, cols, out.data_ptr(),
                      torch.get_num_threads())
    return out
