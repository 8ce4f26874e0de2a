"""Load a Hugging Face Llama-family directory into the project's own model code.

Reads ``config.json``, then ``model.safetensors`` or the shards named by
``model.safetensors.index.json``, tensor by tensor (no second full copy in memory). With the
``dummy`` load format the weights are random instead (nothing but config.json is read), for
benchmarking a model's shape without its checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

from worker_svc.models.llama import LlamaConfig, LlamaForCausalLM, load_weights, rope_cache

SUPPORTED = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
LOAD_FORMATS = ("auto", "dummy")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelFiles:
    """What the worker reads from a model directory besides the weights."""

    path: Path
    hf_config: dict
    eos_token_ids: tuple[int, ...]

    @property
    def max_position_embeddings(self) -> int:
        return int(self.hf_config.get("max_position_embeddings", 4096))


def read_model_dir(path: str | Path) -> ModelFiles:
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in SUPPORTED:
        raise ValueError(f"architecture {arch} is not supported (supported: {sorted(SUPPORTED)})")
    eos = hf.get("eos_token_id")
    gen_path = path / "generation_config.json"
    if gen_path.exists():
        eos = json.loads(gen_path.read_text()).get("eos_token_id", eos)
    eos_ids = tuple(eos if isinstance(eos, list) else ([] if eos is None else [eos]))
    return ModelFiles(path=path, hf_config=hf, eos_token_ids=eos_ids)


def checkpoint_tensors(path: Path) -> Iterator[tuple[str, Tensor]]:
    """Every tensor of the checkpoint, single file or sharded."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    for name in files:
        with safe_open(str(path / name), framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)


def resolve_dtype(name: str, hf_config: dict, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    return DTYPES.get(str(hf_config.get("torch_dtype") or hf_config.get("dtype")), torch.bfloat16)


def load_model(
    files: ModelFiles,
    device: torch.device,
    dtype: torch.dtype,
    max_len: int,
    load_format: str = "auto",
) -> LlamaForCausalLM:
    """Build the model on the meta device, allocate it once in ``dtype`` on ``device``, fill it
    from the checkpoint (``auto``) or with random weights (``dummy``)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not one of {LOAD_FORMATS}")
    cfg = LlamaConfig.from_hf(files.hf_config)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_len).to(dtype)
    model = model.to_empty(device=device)
    if load_format == "dummy":
        init_dummy_weights(model)
    else:
        load_weights(model, checkpoint_tensors(files.path))
    model.rope = rope_cache(cfg, max_len).to(device)  # a buffer: to_empty left it uninitialised
    return model.eval()


@torch.no_grad()
def init_dummy_weights(model: LlamaForCausalLM, seed: int = 0) -> None:
    """Random weights, one fill per tensor on its device. Matrices are N(0, 1/fan_in), norms 1
    and biases 0: each projection keeps its input's scale, so the residual stream grows only
    like sqrt(layers) and activations and logits stay O(1)-O(10), finite in fp16 and bf16."""
    if model.cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    gen = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 2:
            param.normal_(0.0, param.shape[1] ** -0.5, generator=gen)
        elif name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.zero_()
