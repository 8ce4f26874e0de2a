"""The decoder's building blocks that are not attention: norms, activations, the dense MLP."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels import elementwise
from worker_svc.models.config import ModelConfig


class RMSNorm(nn.Module):
    """Llama's RMSNorm, or Gemma's (``gemma=True``): weight stored as an offset from 1, and the
    product taken in fp32 before the cast back (Llama casts first), as transformers does each."""

    def __init__(self, dim: int, eps: float, gemma: bool = False) -> None:
        super().__init__()
        self.eps, self.gemma = eps, gemma
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return elementwise.rms_norm(x, self.weight, self.eps, self.gemma)  # one kernel on CUDA

    def heads_(self, x: Tensor) -> None:
        """The norm of each head of x [T, H, D], in place (per-head q/k norms)."""
        elementwise.rms_norm_heads_(x, self.weight, self.eps, self.gemma)

    def after_add(self, x: Tensor, h: Tensor | None) -> Tensor:
        """The norm of ``x + h``, the sum left in ``x`` (in place; ``h`` None: just the norm)."""
        if h is None:
            return self(x)
        return elementwise.add_rms_norm_(x, h, self.weight, self.eps, self.gemma)


class MLP(nn.Module):
    """Gated feed-forward: down(act(gate(x)) * up(x)), gate and up as one fused projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.activation = cfg.activation
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        # One kernel on CUDA; elsewhere in place on the projection's output.
        return self.down_proj(elementwise.act_and_mul(self.gate_up_proj(x), self.activation))


def softcap(x: Tensor, cap: float | None) -> Tensor:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping); x itself when cap is None."""
    return x if cap is None else torch.tanh(x / cap) * cap
