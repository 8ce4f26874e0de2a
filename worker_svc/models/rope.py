"""Rotary position embeddings: one function per Hugging Face rope type, one cos/sin table each.

A config names its rope in one of two layouts: transformers 4 (``rope_theta`` plus an optional
``rope_scaling`` dict with ``type``/``rope_type``) or transformers 5 (``rope_parameters``, flat,
or nested by layer type as Gemma 3 does: ``{"full_attention": {...}, "sliding_attention":
{...}}``). :func:`rope_specs` reads either into one :class:`RopeSpec` per layer type.

Two rope types change their frequencies with the length of what transformers is running
(``dynamic`` grows its base past ``max_position_embeddings``; ``longrope`` switches from the short
to the long factors past ``original_max_position_embeddings``, for every position of the forward
pass at once). A paged cache keeps keys rotated when they were computed, so pagewire serves these
exactly only up to that threshold and refuses a longer ``--max-model-len`` (:func:`check_max_len`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from kernels import elementwise
from worker_svc.models.refusal import Unsupported

KINDS = ("default", "linear", "llama3", "dynamic", "yarn", "longrope")
# su: Phi-3's early name; mrope: Qwen2-VL's transformers 4 name for default frequencies with
# 3-D positions (config.py reads mrope_section and refuses it outside Qwen2.5-VL).
_ALIASES = {"su": "longrope", "mrope": "default"}


@dataclass(frozen=True)
class RopeSpec:
    """One rope: its type, base, the type's parameters, and the rotated share of each head."""

    theta: float
    kind: str = "default"
    params: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    partial_rotary_factor: float = 1.0

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)


def _spec(params: dict[str, Any], theta: float, partial: float, hf: dict[str, Any]) -> RopeSpec:
    """A RopeSpec from one scaling/parameters dict; the rope type is validated here."""
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise Unsupported("rope_scaling.rope_type", params.get("rope_type", params.get("type")),
                          f"supported rope types: {', '.join(KINDS)}")
    params = dict(params)
    if kind == "longrope" and hf.get("original_max_position_embeddings"):
        # Phi-3 keeps this at the top level; transformers gives it priority over the dict's.
        params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
    theta = float(params.get("rope_theta", theta))
    partial = float(params.get("partial_rotary_factor", partial))
    return RopeSpec(theta=theta, kind=kind, params=params, partial_rotary_factor=partial)


def rope_specs(hf: dict[str, Any], layer_types: set[str]) -> dict[str, RopeSpec]:
    """The rope of each layer type present in the model (``layer_types``), from either layout."""
    partial = float(hf.get("partial_rotary_factor") or 1.0)
    params = hf.get("rope_parameters")
    if isinstance(params, dict) and set(params) & {"full_attention", "sliding_attention"}:
        return {t: _spec(params[t], 10000.0, partial, hf) for t in layer_types}
    if isinstance(params, dict):
        spec = _spec(params, float(hf.get("rope_theta") or 10000.0), partial, hf)
        return {t: spec for t in layer_types}
    theta = float(hf.get("rope_theta") or 10000.0)
    spec = _spec(hf.get("rope_scaling") or {}, theta, partial, hf)
    specs = {t: spec for t in layer_types}
    if "sliding_attention" in specs and hf.get("rope_local_base_freq") is not None:
        # Gemma 3 in transformers 4 layout: local layers use their own base and no scaling.
        specs["sliding_attention"] = RopeSpec(float(hf["rope_local_base_freq"]),
                                              partial_rotary_factor=partial)
    return specs


def check_max_len(spec: RopeSpec, max_len: int, max_position_embeddings: int) -> None:
    """Refuse a served length where transformers' own frequencies would change mid-sequence."""
    if spec.kind == "dynamic" and max_len > max_position_embeddings:
        raise Unsupported(
            "rope_scaling.rope_type", "dynamic",
            f"dynamic NTK rescales every position once a sequence passes max_position_embeddings="
            f"{max_position_embeddings}, which a paged cache cannot honour; serve with "
            f"--max-model-len {max_position_embeddings} or less")
    if spec.kind == "longrope":
        original = int(spec.params["original_max_position_embeddings"])
        if max_len > original:
            raise Unsupported(
                "rope_scaling.rope_type", "longrope",
                f"longrope switches every position to long_factor once a sequence passes "
                f"original_max_position_embeddings={original}, which a paged cache cannot honour; "
                f"serve with --max-model-len {original} or less")


def _base_inv_freq(theta: float, dim: int) -> Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def _llama3(spec: RopeSpec, dim: int, max_pos: int) -> tuple[Tensor, float]:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    p, inv_freq = spec.params, _base_inv_freq(spec.theta, dim)
    factor = p["factor"]
    low, high = p.get("low_freq_factor", 1.0), p.get("high_freq_factor", 4.0)
    old_len = p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_len / wavelen - low) / (high - low)
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
    return torch.where(is_mid, mid, scaled), 1.0


def _yarn(spec: RopeSpec, dim: int, max_pos: int) -> tuple[Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, ramp between the correction
    dims of ``beta_fast``/``beta_slow`` rotations; cos/sin scaled by the attention factor."""
    p = spec.params
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = p.get("attention_factor")
    if attention is None:
        m, m_all = p.get("mscale"), p.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(spec.theta))

    low, high = correction_dim(p.get("beta_fast") or 32), correction_dim(p.get("beta_slow") or 1)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = _base_inv_freq(spec.theta, dim)
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, float(attention)


def _longrope(spec: RopeSpec, dim: int, max_pos: int) -> tuple[Tensor, float]:
    """LongRoPE (Phi-3) with its short factors: check_max_len keeps sequences where transformers
    uses them. The attention factor depends on the long context and applies throughout."""
    p = spec.params
    original = p["original_max_position_embeddings"]
    factor = p.get("factor") or max_pos / original
    attention = p.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    short = torch.tensor(p["short_factor"], dtype=torch.float64)
    return _base_inv_freq(spec.theta, dim) / short, float(attention)


def inv_freq_and_scale(spec: RopeSpec, dim: int, max_pos: int) -> tuple[Tensor, float]:
    """Inverse frequencies (float64, ``dim // 2``) and the factor cos/sin are multiplied by."""
    if spec.kind == "llama3":
        return _llama3(spec, dim, max_pos)
    if spec.kind == "yarn":
        return _yarn(spec, dim, max_pos)
    if spec.kind == "longrope":
        return _longrope(spec, dim, max_pos)
    inv_freq = _base_inv_freq(spec.theta, dim)
    if spec.kind == "linear":
        inv_freq = inv_freq / spec.params["factor"]
    # "dynamic" equals "default" up to max_position_embeddings; check_max_len holds us there.
    return inv_freq, 1.0


def rope_cache(spec: RopeSpec, head_dim: int, max_len: int, max_pos: int) -> Tensor:
    """cos/sin table [max_len, rotary_dim] (cos in the first half, sin in the second), fp32."""
    inv_freq, scale = inv_freq_and_scale(spec, spec.rotary_dim(head_dim), max_pos)
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return (torch.cat([freqs.cos(), freqs.sin()], dim=-1) * scale).float()


def apply_rope_(x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """Rotate-half RoPE (the Hugging Face convention) in place on the first ``2 * cos.shape[-1]``
    dims of each head (all of them unless the rope is partial). x [T, H, D]; cos/sin [T, 1, R/2].
    One kernel on CUDA, in place on the projection's output in torch (kernels.elementwise)."""
    elementwise.rope_(x, cos, sin)


def mrope_rows(table: Tensor, positions: Tensor, section: tuple[int, ...]) -> Tensor:
    """M-RoPE cos/sin rows [T, R] for 3-D positions [3, T] (temporal, height, width): frequency
    j takes its angle from the position of the axis whose ``section`` holds j, in both the cos
    and the sin half (as transformers splits the frequencies). A token whose three positions
    are equal gets ``table[position]``: text tokens need no 3-D positions at all."""
    r = table.shape[-1]
    axis = torch.repeat_interleave(torch.arange(len(section), device=table.device),
                                   torch.tensor(section, device=table.device))
    assert 2 * len(axis) == r, f"mrope_section {section} does not cover {r // 2} frequencies"
    axis = torch.cat([axis, axis])
    rows = table[positions]  # [3, T, R]
    return rows.gather(0, axis.view(1, 1, r).expand(1, rows.shape[1], r)).squeeze(0)
