"""Building and loading the CPU's C kernels (``csrc/*.c``): compiled on first use, loaded by ctypes.

They need only a C compiler with OpenMP (``cc``, or ``$CC``) and no torch headers, so each builds
in about a second. Libraries are cached under ``$PAGEWIRE_KERNEL_CACHE`` (default
``~/.cache/pagewire/kernels``), named by a hash of the source, the flags and this CPU's feature
flags (they are built with ``-march=native``), so a changed source or header (``csrc/*.h``) or
another CPU gets its own build. The OpenMP runtime they link is the one torch has already loaded
(same soname), so their parallel regions use the calling thread's team, not a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("kernels.c_library")
CSRC = Path(__file__).parent / "csrc"
# Not -ffast-math: linking with it sets flush-to-zero for the whole process that loads the
# library (torch's arithmetic and Python's floats included).
BASE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp",
              "-shared", "-fPIC", "-std=c11"]


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


def _build(compiler: str, flags: list[str], source: Path, out: Path, libs: list[str]) -> None:
    """Compile into a temporary file, then rename: concurrent builders never see half a library."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        subprocess.run([compiler, *flags, "-o", str(tmp_path), str(source), *libs],
                       check=True, capture_output=True, timeout=120)
        tmp_path.replace(out)
    finally:
        tmp_path.unlink(missing_ok=True)


def load(
    source_name: str, flags: list[str], switch: str, libs: tuple[str, ...] = ("-lm",)
) -> ctypes.CDLL | None:
    """``csrc/<source_name>`` compiled with ``flags`` and linked with ``libs`` (built if needed);
    None when the environment
    variable ``switch`` is "0", or there is no compiler, or the build fails (callers then use
    their torch path)."""
    if os.environ.get(switch, "1") == "0":
        return None
    source = CSRC / source_name
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler: %s is not used", source_name)
        return None
    headers = b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    key = hashlib.sha256(
        source.read_bytes() + headers + " ".join([compiler, *flags, *libs]).encode()
        + _cpu_id().encode()
    ).hexdigest()[:16]
    path = _cache_dir() / f"{source.stem}-{platform.machine()}-{key}.so"
    try:
        if not path.exists():
            _build(compiler, flags, source, path, list(libs))
        return ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        log.warning("%s unavailable (%s): using the torch path", source_name, e)
        return None
