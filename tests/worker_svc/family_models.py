"""Random-weight models of each family and transformers' greedy tokens on them (the oracle)."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM

from pagewire.config import WorkerConfig
from pagewire.testmodel_arch import make_arch_model
from worker_svc.runner import ModelRunner
from worker_svc.server import build_runner

_ROOT = Path(tempfile.mkdtemp(prefix="pagewire-families-"))


@functools.cache
def _model_dir(arch: str, overrides_json: str) -> Path:
    name = f"{arch}-{len(list(_ROOT.iterdir()))}"
    return make_arch_model(_ROOT / name, arch, seed=0, size="tiny", num_hidden_layers=2,
                           **json.loads(overrides_json))


def model_dir(arch: str, **overrides: Any) -> Path:
    """A tiny 2-layer model of ``arch`` (built once per process per set of overrides)."""
    return _model_dir(arch, json.dumps(overrides, sort_keys=True))


def hf_model(path: Path) -> AutoModelForCausalLM:
    # eager: the attention transformers writes out in full (softcapping, windows), no kernels.
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager").eval()


def hf_generate(hf: AutoModelForCausalLM, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy generate, with its KV cache, no early stop."""
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                          dtype=torch.long), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def runner_for(path: Path, backend: str = "cpu",
               block_size: int = 4, max_model_len: int = 0) -> ModelRunner:
    cfg = WorkerConfig(model=str(path), num_blocks=256, block_size=block_size,
                       attention_backend=backend, max_model_len=max_model_len)
    return build_runner(cfg)[0]


def prompts(vocab: int, lengths: tuple[int, ...] = (3, 11, 29)) -> dict[int, list[int]]:
    """Deterministic prompts of the given lengths (token 0 is BOS-like, others pseudo-random)."""
    g = torch.Generator().manual_seed(1)
    return {i + 1: [0, *torch.randint(10, vocab, (n - 1,), generator=g).tolist()]
            for i, n in enumerate(lengths)}
