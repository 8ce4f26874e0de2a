"""Load a Hugging Face model directory into the project's own model code.

Reads ``config.json``, then ``model.safetensors`` or the shards named by
``model.safetensors.index.json``, tensor by tensor (no second full copy in memory). With the
``dummy`` load format the weights are random instead (nothing but config.json is read), for
benchmarking a model's shape without its checkpoint.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor, nn

from pagewire.model_dir import architecture, is_vision, text_config
from worker_svc.models import qwen_vision, vision
from worker_svc.models.config import FAMILIES, ModelConfig
from worker_svc.models.llama import DecoderForCausalLM
from worker_svc.models.weights import init_dummy_weights, load_weights

SUPPORTED = frozenset(FAMILIES)
LOAD_FORMATS = ("auto", "dummy")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class ModelFiles:
    """What the worker reads from a model directory besides the weights."""

    path: Path
    hf_config: dict
    eos_token_ids: tuple[int, ...]

    @property
    def text_config(self) -> dict:
        return text_config(self.hf_config)

    @property
    def max_position_embeddings(self) -> int:
        return int(self.text_config.get("max_position_embeddings", 4096))


def read_model_dir(path: str | Path) -> ModelFiles:
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    # Both refuse, naming the key, what pagewire cannot serve exactly.
    ModelConfig.from_hf(text_config(hf))
    if is_vision(hf):
        _family(hf)[0].from_hf(hf)
    eos = text_config(hf).get("eos_token_id", hf.get("eos_token_id"))
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
) -> DecoderForCausalLM:
    """Build the model on the meta device, allocate it once in ``dtype`` on ``device``, fill it
    from the checkpoint (``auto``) or with random weights (``dummy``). A vision-language model's
    image side becomes ``model.vision`` (None for a text model)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not one of {LOAD_FORMATS}")
    cfg = ModelConfig.from_hf(files.text_config)
    with torch.device("meta"), _without_init():
        model = DecoderForCausalLM(cfg, max_len).to(dtype)
    _allocate(model, device)
    vision = _vision(files, device, dtype)
    if load_format == "dummy":
        init_dummy_weights(model)
        if vision is not None:
            vision.init_dummy()
    elif vision is None:
        load_weights(model, checkpoint_tensors(files.path))
    else:
        split = _family(files.hf_config)[2]
        parts = [(kind, name, t) for name, t in checkpoint_tensors(files.path)
                 for kind, name in [split(name)]]
        load_weights(model, ((n, t) for kind, n, t in parts if kind == "text"))
        vision.load((n, t) for kind, n, t in parts if kind == "vision")
    model.init_rope(max_len, device)  # buffers: to_empty left them uninitialised
    model.vision = vision
    return model.eval()


def _allocate(model: nn.Module, device: torch.device) -> None:
    """Real, uninitialised storage on ``device`` for every parameter and buffer of a model built
    on the meta device. (``Module.to_empty`` asks each meta tensor for its layout through torch's
    reference ops, which import sympy and the symbolic-shape machinery: 1.4 s of a worker's
    start.) Nothing is shared yet: tied weights are tied when loaded."""
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)


# What torch's layers call from reset_parameters(); on the meta device they compute nothing, but
# the first call imports torch._dynamo (their no-dynamo wrapper): 1.3 s of every worker's start.
_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_", "xavier_normal_")


@contextlib.contextmanager
def _without_init() -> Iterator[None]:
    """torch.nn.init's in-place initialisers as no-ops while a model is built on the meta device
    (its weights are allocated and filled afterwards)."""
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in _INIT_FUNCTIONS:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _family(hf: dict) -> tuple[Any, Any, Callable[[str], tuple[str, str]]]:
    """(config class, module class, checkpoint-name splitter) of a vision model's image side."""
    if architecture(hf) in qwen_vision.ARCHITECTURES:
        return (qwen_vision.QwenVisionConfig, qwen_vision.QwenVision,
                qwen_vision.split_checkpoint_name)
    return vision.VisionConfig, vision.LlavaVision, vision.split_checkpoint_name


def _vision(files: ModelFiles, device: torch.device, dtype: torch.dtype) -> nn.Module | None:
    if not is_vision(files.hf_config):
        return None
    config, module, _ = _family(files.hf_config)
    with torch.device("meta"):
        image_side = module(config.from_hf(files.hf_config)).to(dtype)
    return image_side.to_empty(device=device).eval()
