"""The compiled CPU paged decode (``csrc/paged_decode.c``): built on first use, loaded by ctypes.

Decode attention on a CPU is bound by memory traffic; the C kernel reads each cached key and
value once, where the torch path gathers them into a copy first. It needs only a C compiler with
OpenMP (``cc``, or ``$CC``) and no torch headers, so it builds in about a second. The library is
cached under ``$PAGEWIRE_KERNEL_CACHE`` (default ``~/.cache/pagewire/kernels``), named by a hash of
the source, the flags and this CPU's feature flags (it is built with ``-march=native``), so a
changed source or another CPU gets its own build.

:func:`load` returns None when there is no compiler or the build fails; callers then use the
torch path. The kernel handles fp32 and bf16 caches with fp32 queries, up to 64 query heads and
head dims up to 256; :func:`supports` says whether a call fits.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger("kernels.cpu_decode")
SOURCE = Path(__file__).parent / "csrc" / "paged_decode.c"
# Not -ffast-math: linking with it sets flush-to-zero for the whole process that loads the
# library (torch's arithmetic and Python's floats included). These are its parts that let the
# reductions reorder, and that change nothing outside this library.
FLAGS = ["-O3", "-march=native", "-funroll-loops", "-fno-math-errno", "-fno-trapping-math",
         "-fassociative-math", "-fno-signed-zeros", "-freciprocal-math", "-fopenmp", "-shared",
         "-fPIC", "-std=c11"]
_SYMBOLS = {torch.float32: "paged_decode_f32", torch.bfloat16: "paged_decode_bf16"}


def _cpu_id() -> str:
    """This CPU's model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.startswith(("flags", "model name", "Features"))]
    return "\n".join(sorted(set(keep)))


def _cache_dir() -> Path:
    default = Path.home() / ".cache" / "pagewire" / "kernels"
    return Path(os.environ.get("PAGEWIRE_KERNEL_CACHE", default))


def _build(compiler: str, out: Path) -> None:
    """Compile into a temporary file, then rename: concurrent builders never see half a library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, "-o", str(tmp_path), str(SOURCE), "-lm"],
                       check=True, capture_output=True, timeout=120)
        tmp_path.replace(out)
    finally:
        tmp_path.unlink(missing_ok=True)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it if needed; None where it cannot be built."""
    if os.environ.get("PAGEWIRE_CPU_DECODE", "1") == "0":
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: CPU decode attention uses the torch path")
        return None
    key = hashlib.sha256(
        SOURCE.read_bytes() + " ".join([compiler, *FLAGS]).encode() + _cpu_id().encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"paged_decode-{platform.machine()}-{key}.so"
    try:
        if not path.exists():
            _build(compiler, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("CPU decode kernel unavailable (%s): using the torch path", e)
        return None
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    for name in _SYMBOLS.values():
        fn = getattr(lib, name)
        fn.restype = None
        fn.argtypes = [ptr, ptr, ptr, ptr, i64, ptr, i64, i64, i64, i64, i64, f32, ptr,
                       ctypes.c_int, i64, f32]
    return lib


def supports(q: Tensor, k_cache: Tensor) -> bool:
    """Whether the kernel takes this call (else the caller uses the torch path)."""
    heads, kv_heads, dim = q.shape[1], k_cache.shape[2], k_cache.shape[3]
    return (
        q.device.type == "cpu"
        and k_cache.dtype in _SYMBOLS
        and heads % kv_heads == 0
        and heads <= 64
        and dim <= 256
        and load() is not None
    )


def paged_decode_attention(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, context_lens: Tensor,
    scale: float, window: int | None = None, softcap: float | None = None,
) -> Tensor:
    """Same contract as :func:`kernels.reference.paged_decode_attention` (check :func:`supports`)."""
    lib = load()
    assert lib is not None
    batch, heads, dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches are allocated contiguous"
    qf = q.contiguous().float()
    tables = block_tables.to(torch.int32).contiguous()
    lens = context_lens.to(torch.int32).contiguous()
    out = torch.empty((batch, heads, dim), dtype=torch.float32)
    if batch:
        getattr(lib, _SYMBOLS[k_cache.dtype])(
            qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(),
            tables.stride(0), lens.data_ptr(), batch, heads, kv_heads, dim, block_size,
            scale, out.data_ptr(), torch.get_num_threads(),  # the worker's --threads
            window or 0, softcap or 0.0,
        )
    return out.to(q.dtype)
