"""Qwen2.5-VL's image side: a window-attention vision transformer and the 2x2 patch merger.

The processor cuts an image into ``temporal_patch_size x patch_size x patch_size`` patches on a
grid (t, h, w) that follows the image's own size (dynamic resolution) and sends them flattened,
already ordered so that each ``merge x merge`` block of patches is contiguous. Here, as in
transformers: a linear patch embedding; 2-D rotary embeddings (each patch's row and column
rotate half of each head); the patches reordered window by window (windows of
``window_size`` pixels, in merged units) so that most blocks attend within a window and the
``fullatt_block_indexes`` blocks over the whole image; pre-norm blocks with RMSNorm and a
gated MLP; and the merger (RMSNorm, the 4 patches of a block concatenated, a 2-layer GELU MLP)
whose rows are put back in raster order: one row per placeholder token. Every config key is
read or refused, as for the decoder.

Window attention is one SDPA call with a block-diagonal boolean mask ([patches, patches] per
image: 28 MB for a 1024x1024 image at patch 14), not a loop over windows; a varlen kernel
would avoid the mask where images are large.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pagewire.model_dir import FLAT_TEXT_KEYS, text_config
from worker_svc.models.layers import RMSNorm
from worker_svc.models.refusal import Unsupported, check_keys, require
from worker_svc.models.vision import ACTS, load_exactly

ARCHITECTURES = frozenset({"Qwen2_5_VLForConditionalGeneration"})
_TOP_KEYS = frozenset({
    "text_config", "vision_config", "image_token_id", "video_token_id", "vision_start_token_id",
    "vision_end_token_id", "tie_word_embeddings",
})
_VISION_KEYS = frozenset({
    "depth", "hidden_size", "hidden_act", "intermediate_size", "num_heads", "in_channels",
    "patch_size", "spatial_merge_size", "temporal_patch_size", "window_size", "out_hidden_size",
    "fullatt_block_indexes", "rope_parameters",
    "tokens_per_second",  # spaces video frames' temporal positions; images have one frame
    # Hub configs' older names, which transformers does not read (it uses in_channels and
    # patch_size): accepted only where they agree with what it reads.
    "in_chans", "spatial_patch_size",
})
_TOP_INERT = frozenset({"vision_token_id"})  # hub configs: unused by transformers' model
EPS = 1e-6  # transformers' Qwen2.5-VL vision norms use this whatever the config says


@dataclass(frozen=True)
class QwenVisionConfig:
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    in_channels: int
    patch_size: int
    merge: int  # spatial_merge_size: a placeholder is a merge x merge block of patches
    temporal_patch_size: int
    window_size: int  # pixels
    out_hidden_size: int
    full_blocks: frozenset[int]
    act: str
    rope_theta: float
    image_token_id: int

    @property
    def patch_dim(self) -> int:
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> QwenVisionConfig:
        top = {k: v for k, v in hf.items() if k != "text_config"
               and ("text_config" in hf or k not in FLAT_TEXT_KEYS)}
        check_keys(top, _TOP_KEYS | _TOP_INERT)
        v = dict(hf["vision_config"])
        # Old checkpoints name the vision config qwen2_5_vl; transformers reads it as vision.
        require("vision_config.model_type", v.get("model_type", "qwen2_5_vl_vision"),
                ("qwen2_5_vl_vision", "qwen2_5_vl"))
        v.pop("model_type", None)
        check_keys(v, _VISION_KEYS)
        for old, new, default in (("in_chans", "in_channels", 3),
                                  ("spatial_patch_size", "patch_size", 14)):
            if old in v and v[old] != v.get(new, default):
                raise Unsupported(f"vision_config.{old}", v[old], f"transformers reads {new}="
                                  f"{v.get(new, default)} and ignores {old}")
        rope = dict(v.get("rope_parameters") or {"rope_type": "axial"})
        require("vision_config.rope_parameters.rope_type", rope.get("rope_type", "axial"),
                ("axial",))
        out = int(v.get("out_hidden_size", 3584))
        if out != text_config(hf)["hidden_size"]:
            raise Unsupported("vision_config.out_hidden_size", out,
                              "must equal the decoder's hidden_size")
        return cls(
            depth=v.get("depth", 32), hidden_size=v.get("hidden_size", 3584),
            intermediate_size=v.get("intermediate_size", 3420), num_heads=v.get("num_heads", 16),
            in_channels=v.get("in_channels", 3), patch_size=v.get("patch_size", 14),
            merge=v.get("spatial_merge_size", 2), temporal_patch_size=v.get("temporal_patch_size", 2),
            window_size=v.get("window_size", 112), out_hidden_size=out,
            full_blocks=frozenset(v.get("fullatt_block_indexes", [7, 15, 23, 31])),
            act=require("vision_config.hidden_act", v.get("hidden_act", "silu"), tuple(ACTS)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
            image_token_id=int(hf.get("image_token_id", 151655)),
        )


@dataclass
class ImageLayout:
    """One image's patches as the blocks see them: window order, rotary angles, attention."""

    order: Tensor  # [patches] patch index at each window-ordered place
    cos: Tensor  # [patches, head_dim] float32, window order
    sin: Tensor
    window_mask: Tensor  # [patches, patches] bool: same window


def patch_rows_cols(t: int, h: int, w: int, merge: int, device: torch.device) -> Tensor:
    """[2, t*h*w]: each patch's row and column, in the processor's block-major order."""
    rows = torch.arange(h, device=device)[:, None].expand(h, w)
    cols = torch.arange(w, device=device)[None, :].expand(h, w)
    shape = (h // merge, merge, w // merge, merge)
    rc = torch.stack([x.reshape(shape).transpose(1, 2).reshape(-1) for x in (rows, cols)])
    return rc.repeat(1, t)


def window_order(t: int, h: int, w: int, merge: int, per_side: int, device: torch.device
                 ) -> tuple[Tensor, Tensor]:
    """(merged blocks in window order, window of each): windows of ``per_side`` x ``per_side``
    merged blocks over the (h/merge, w/merge) grid, row-major, each frame apart; the last row
    and column of windows may be partial."""
    lh, lw = h // merge, w // merge
    nh, nw = -(-lh // per_side), -(-lw // per_side)
    r = torch.arange(lh, device=device)[:, None].expand(lh, lw)
    c = torch.arange(lw, device=device)[None, :].expand(lh, lw)
    win = (r // per_side) * nw + c // per_side  # window of each block, per frame
    key = win * (lh * lw) + r * lw + c  # sort: by window, then raster order inside it
    order = torch.argsort(key.reshape(-1))
    frame = torch.arange(t, device=device)[:, None]
    blocks = (order[None, :] + frame * lh * lw).reshape(-1)
    windows = (win.reshape(-1)[order][None, :] + frame * nh * nw).reshape(-1)
    return blocks, windows


class VisionAttention(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, lay: ImageLayout, full: bool) -> Tensor:
        n, d = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, -1).unbind(1)
        q, k = (_rotate(z, lay.cos, lay.sin) for z in (q, k))
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            attn_mask=None if full else lay.window_mask)
        return self.proj(out.transpose(0, 1).reshape(n, d))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE in float32 (as transformers does for the vision tower)."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.act = ACTS[cfg.act]
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class VisionBlock(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, EPS)
        self.attn = VisionAttention(cfg)
        self.norm2 = RMSNorm(cfg.hidden_size, EPS)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, lay: ImageLayout, full: bool) -> Tensor:
        x = x + self.attn(self.norm1(x), lay, full)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        wide = cfg.hidden_size * cfg.merge**2
        self.ln_q = RMSNorm(cfg.hidden_size, EPS)
        self.mlp = nn.Sequential(nn.Linear(wide, wide), nn.GELU(),
                                 nn.Linear(wide, cfg.out_hidden_size))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(self.ln_q(x).reshape(-1, self.mlp[0].in_features))


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d whose kernel equals its stride over exactly one patch: a matrix
    product with the flattened patch."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, patches: Tensor) -> Tensor:
        w = self.proj.weight
        return F.linear(patches.to(w.dtype), w.reshape(w.shape[0], -1))


class QwenVision(nn.Module):
    """Flattened patches of one image and its grid to placeholder rows [t*h*w / merge^2, H]."""

    def __init__(self, cfg: QwenVisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def layout(self, grid: tuple[int, int, int]) -> ImageLayout:
        cfg, dev = self.cfg, self.merger.ln_q.weight.device
        dim = cfg.hidden_size // cfg.num_heads // 2  # rows rotate half of each head, columns half
        # Computed here, not kept as a buffer: the loader builds modules on the meta device.
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, device=dev,
                                                         dtype=torch.float32) / dim)
        t, h, w = grid
        unit = cfg.merge**2
        blocks, windows = window_order(t, h, w, cfg.merge,
                                       cfg.window_size // cfg.merge // cfg.patch_size, dev)
        order = (blocks[:, None] * unit + torch.arange(unit, device=dev)).reshape(-1)
        rc = patch_rows_cols(t, h, w, cfg.merge, dev)[:, order]
        freqs = (rc[..., None].float() * inv_freq).permute(1, 0, 2).reshape(rc.shape[1], -1)
        emb = torch.cat([freqs, freqs], dim=-1)
        win = windows.repeat_interleave(unit)
        return ImageLayout(order, emb.cos(), emb.sin(), win[:, None] == win[None, :])

    @torch.inference_mode()
    def encode(self, patches: Tensor, grid: tuple[int, ...]) -> Tensor:
        t, h, w = (int(g) for g in grid)
        cfg = self.cfg
        if patches.shape != (t * h * w, cfg.patch_dim) or h % cfg.merge or w % cfg.merge:
            raise ValueError(f"image patches {tuple(patches.shape)} do not fit grid {grid} of "
                             f"{cfg.patch_dim}-value patches merged {cfg.merge}x{cfg.merge}")
        lay = self.layout((t, h, w))
        x = self.patch_embed(patches)[lay.order]
        for i, block in enumerate(self.blocks):
            x = block(x, lay, i in cfg.full_blocks)
        merged = self.merger(x)  # window order, one row per merged block
        out = torch.empty_like(merged)
        out[lay.order[:: cfg.merge**2] // cfg.merge**2] = merged
        return out

    @torch.no_grad()
    def init_dummy(self, seed: int = 0) -> None:
        """Random weights for ``--load-format dummy``: matrices N(0, 1/fan_in), norms 1, biases 0."""
        gen = torch.Generator(device=self.merger.ln_q.weight.device).manual_seed(seed)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
            else:
                p.fill_(1.0 if "norm" in name or "ln_q" in name else 0.0)

    def load(self, weights: Iterable[tuple[str, Tensor]]) -> None:
        """Copy ``visual.*`` tensors in; fail on anything missing, unexpected or misshapen."""
        load_exactly(self, ((name.removeprefix("visual."), t) for name, t in weights))


def split_checkpoint_name(name: str) -> tuple[str, str]:
    """("text" | "vision", the name as its model reads it) for a Qwen2.5-VL tensor, in the
    hub layout (``visual.*``, ``model.*``, ``lm_head.*``) and transformers 5's
    (``model.visual.*``, ``model.language_model.*``)."""
    if name.startswith("model.visual."):
        name = name.removeprefix("model.")
    if name.startswith("visual."):
        return "vision", name
    if name.startswith("model.language_model."):
        return "text", "model." + name.removeprefix("model.language_model.")
    return "text", name
