"""The sparse feed-forward of Mixtral and Qwen3-MoE: a router and stacked experts.

Both families route the same way (softmax over experts, top-k); Mixtral always renormalises
the chosen weights to sum to 1, Qwen3-MoE only with ``norm_topk_prob``. The experts run in
``kernels``: grouped per expert on the CPU, the fused Triton kernel on CUDA.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kernels.moe import grouped_moe, route
from worker_svc.models.config import ModelConfig


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.top_k, self.renormalize, self.activation = moe.top_k, moe.renormalize, cfg.activation
        self.gate = nn.Linear(cfg.hidden_size, moe.num_experts, bias=False)
        h, i = cfg.hidden_size, moe.intermediate_size
        self.w_gate_up = nn.Parameter(torch.empty(moe.num_experts, 2 * i, h))
        self.w_down = nn.Parameter(torch.empty(moe.num_experts, h, i))

    def forward(self, x: Tensor) -> Tensor:
        weights, ids = route(self.gate(x), self.top_k, self.renormalize)
        if x.is_cuda:
            from kernels.triton_ops.fused_moe import fused_moe  # imports triton

            return fused_moe(x, self.w_gate_up, self.w_down, weights, ids, self.activation)
        return grouped_moe(x, self.w_gate_up, self.w_down, weights, ids, self.activation)
