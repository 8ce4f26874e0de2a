"""LLaVA's image side: a CLIP vision transformer and the MLP projector into the decoder's space.

The text side of a LLaVA checkpoint is an ordinary decoder (``text_config``, served by
:mod:`worker_svc.models.llama`); this module turns preprocessed pixels into one row per
placeholder token, which the runner writes over the placeholders' token embeddings. As in
transformers, the features are the hidden states of ``vision_feature_layer`` (layers after it
are never run), without the CLS row under the ``default`` strategy, through
``linear_2(act(linear_1(x)))``. Every config key is read or refused, as for the decoder.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagewire.model_dir import text_config
from worker_svc.models.refusal import Unsupported, check_keys, require

ARCHITECTURES = frozenset({"LlavaForConditionalGeneration"})
_LLAVA_KEYS = frozenset({
    "text_config", "vision_config", "image_token_index", "image_token_id", "image_seq_length",
    "projector_hidden_act", "vision_feature_select_strategy", "vision_feature_layer",
    "multimodal_projector_bias", "tie_word_embeddings",
    "ignore_index",  # the training loss's label to skip
})
_CLIP_KEYS = frozenset({
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
    "patch_size", "num_channels", "hidden_act", "layer_norm_eps",
    # The CLIP joint-embedding projection and init scales: not part of the vision tower's forward.
    "projection_dim", "initializer_factor", "vocab_size",
})
ACTS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int  # layers run: those up to the feature layer
    num_checkpoint_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    eps: float
    act: str
    drop_cls: bool  # vision_feature_select_strategy "default"
    projector_act: str
    projector_bias: bool
    text_hidden_size: int
    image_token_id: int

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + (0 if self.drop_cls else 1)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> VisionConfig:
        """Read a LLaVA config.json's image side; refuse what transformers would compute
        differently from this module."""
        check_keys({k: v for k, v in hf.items() if k not in ("text_config",)}, _LLAVA_KEYS)
        v = dict(hf["vision_config"])
        require("vision_config.model_type", v.get("model_type", "clip_vision_model"),
                ("clip_vision_model",))
        check_keys(v, _CLIP_KEYS)
        layer = hf.get("vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise Unsupported("vision_feature_layer", layer, "only one feature layer is served")
        total = v["num_hidden_layers"]
        run = layer % (total + 1)  # hidden_states[layer] of [embeddings, layer 1, ..., layer N]
        strategy = require("vision_feature_select_strategy",
                           hf.get("vision_feature_select_strategy", "default"), ("default", "full"))
        token = hf.get("image_token_index", hf.get("image_token_id"))
        if token is None:
            raise Unsupported("image_token_index", None, "a LLaVA config must name its image token")
        return cls(
            hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=run,
            num_checkpoint_layers=total, num_heads=v["num_attention_heads"],
            image_size=v["image_size"], patch_size=v["patch_size"],
            num_channels=v.get("num_channels", 3), eps=v.get("layer_norm_eps", 1e-5),
            act=require("vision_config.hidden_act", v.get("hidden_act", "quick_gelu"), tuple(ACTS)),
            drop_cls=strategy == "default",
            projector_act=require("projector_hidden_act", hf.get("projector_hidden_act", "gelu"),
                                  tuple(ACTS)),
            projector_bias=bool(hf.get("multimodal_projector_bias", True)),
            text_hidden_size=text_config(hf)["hidden_size"], image_token_id=int(token),
        )


class ClipAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.heads = cfg.num_heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = (p(x).view(n, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v)  # every patch sees every patch
        return self.out_proj(out.transpose(1, 2).reshape(n, t, d))


class ClipMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = ACTS[cfg.act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.self_attn = ClipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.eps)
        self.mlp = ClipMLP(cfg)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipVisionTower(nn.Module):
    """Patches (a strided convolution) plus CLS and learned positions, pre-norm, then the layers
    up to the feature layer. Names follow the checkpoint's ``vision_tower.*`` (layers past the
    feature layer and ``post_layernorm`` are read and checked, never run)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d, p = cfg.hidden_size, cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(d))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((cfg.image_size // p) ** 2 + 1, d)
        self.pre_layrnorm = nn.LayerNorm(d, eps=cfg.eps)
        self.layers = nn.ModuleList(ClipLayer(cfg) for _ in range(cfg.num_checkpoint_layers))
        self.post_layernorm = nn.LayerNorm(d, eps=cfg.eps)

    def forward(self, pixels: Tensor) -> Tensor:
        """[N, C, S, S] pixels -> [N, 1 + patches, hidden] features of the feature layer."""
        n = pixels.shape[0]
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = torch.cat([self.class_embedding.expand(n, 1, -1), patches.flatten(2).transpose(1, 2)],
                      dim=1)
        x = self.pre_layrnorm(x + self.position_embedding.weight)
        for layer in self.layers[: self.cfg.num_layers]:
            x = layer(x)
        return x


class Projector(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.act = ACTS[cfg.projector_act]
        b = cfg.projector_bias
        self.linear_1 = nn.Linear(cfg.hidden_size, cfg.text_hidden_size, bias=b)
        self.linear_2 = nn.Linear(cfg.text_hidden_size, cfg.text_hidden_size, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    """Pixels to placeholder embeddings: [N, C, S, S] -> [N, tokens_per_image, text hidden]."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.vision_tower = ClipVisionTower(cfg)
        self.multi_modal_projector = Projector(cfg)

    @torch.inference_mode()
    def forward(self, pixels: Tensor) -> Tensor:
        feats = self.vision_tower(pixels)
        if self.cfg.drop_cls:
            feats = feats[:, 1:]
        return self.multi_modal_projector(feats)

    def encode(self, pixels: Tensor, grid: tuple[int, ...] = ()) -> Tensor:
        """One image's [C, S, S] pixels to its placeholder rows (``grid``: unused, fixed size)."""
        return self(pixels.unsqueeze(0))[0]

    @torch.no_grad()
    def init_dummy(self, seed: int = 0) -> None:
        """Random weights for ``--load-format dummy``: matrices N(0, 1/fan_in), norms 1, biases 0."""
        gen = torch.Generator(device=self.vision_tower.class_embedding.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)

    def load(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy ``vision_tower.*`` / ``multi_modal_projector.*`` tensors in; fail on anything
        missing, unexpected or misshapen."""
        load_exactly(self, ((_clip_name(name), t) for name, t in weights))


def _clip_name(name: str) -> str:
    name = name.replace("vision_tower.vision_model.", "vision_tower.")
    return name.replace("embeddings.", "").replace("encoder.layers.", "layers.")


def load_exactly(module: nn.Module, weights: Iterable[tuple[str, Tensor]]) -> None:
    """Copy (name, tensor) pairs, named as ``module`` names its parameters, into ``module``;
    an unexpected, misshapen or missing vision weight is an error, never a silent default."""
    params = dict(module.named_parameters())
    seen: set[str] = set()
    for name, tensor in weights:
        if name not in params:
            raise KeyError(f"unexpected vision weight {name!r} in checkpoint")
        if params[name].shape != tensor.shape:
            raise ValueError(f"vision weight {name!r} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(params[name].shape)}")
        params[name].data.copy_(tensor)
        seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise KeyError(f"checkpoint lacks vision weights: {missing[:8]}")


def split_checkpoint_name(name: str) -> tuple[str, str]:
    """("text" | "vision", the name as its model reads it) for a LLaVA checkpoint tensor, in
    both layouts: transformers 4's ``language_model.model.*`` / ``language_model.lm_head`` /
    ``vision_tower.vision_model.*`` and transformers 5's ``model.language_model.*`` /
    ``lm_head`` / ``model.vision_tower.*``."""
    if name.startswith("model."):
        name = name.removeprefix("model.")
    if name.startswith(("vision_tower.", "multi_modal_projector.")):
        return "vision", name
    if name.startswith("language_model.model."):
        return "text", "model." + name.removeprefix("language_model.model.")
    if name.startswith("language_model.lm_head."):
        return "text", name.removeprefix("language_model.")
    if name.startswith("language_model."):
        return "text", "model." + name.removeprefix("language_model.")
    return "text", name
