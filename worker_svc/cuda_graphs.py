"""Decode steps replayed from CUDA graphs.

A decode step of a small model is mostly launch overhead: a 24-layer model issues some 300
kernels a step, each a few microseconds of Python and driver time, for well under a millisecond
of GPU work. So the forward pass of a decode-only batch is captured once per padded batch size at
start-up and replayed: one launch a step. A graph reads fixed addresses, so a step's inputs are
copied into persistent buffers first (two device copies from the step's packed buffer); a batch
of n sequences runs in the smallest captured size >= n, its padding rows with no context and no
KV slot, so they attend to nothing and write nothing. The Triton decode chooses its split count
from the batch size and the block-table width alone, both fixed per graph, so it is graph-safe.

Without graphs (CPU, ``--no-cuda-graphs``) the same padded path can run eagerly; that is how CI
checks the padding and the reuse of the persistent buffers from one step to the next.
"""

from __future__ import annotations

import bisect
import logging
import time

import numpy as np
import torch
from torch import Tensor

from kernels import AttentionBackend
from worker_svc.models.llama import AttentionMetadata, LlamaForCausalLM

log = logging.getLogger("worker")

# Padding of the per-token fields in the packed order (ids, rows, positions, slots, context lens):
# token 0 of row 0 at position 0, stored nowhere, attending to nothing.
_PAD = (0, 0, 0, -1, 0)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes to capture: powers of two to 32, then every 16, up to the first >= max."""
    sizes, s = [1, 2, 4, 8, 16, 32], 48
    while sizes[-1] < max_num_seqs:
        sizes.append(s)
        s += 16
    return sizes[: bisect.bisect_left(sizes, max_num_seqs) + 1]


def pad_columns(n: int, size: int, *columns: np.ndarray) -> list[np.ndarray]:
    """The five per-token columns of a decode batch, each padded from n to ``size`` entries."""
    out = []
    for col, fill in zip(columns, _PAD, strict=True):
        padded = np.full(size, fill, dtype=np.int64)
        padded[:n] = col
        out.append(padded)
    return out


class DecodeGraphs:
    """Persistent input buffers, one captured forward pass per batch size, and the replay."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[tuple[Tensor, Tensor]],
        backend: AttentionBackend,
        device: torch.device,
        block_size: int,
        max_model_len: int,
        max_num_seqs: int,
        capture: bool = True,
    ) -> None:
        self.model, self.kv_caches, self.backend = model, kv_caches, backend
        self.sizes = capture_sizes(max_num_seqs)
        self.width = -(-max_model_len // block_size)
        size = self.sizes[-1]
        i32 = {"dtype": torch.int32, "device": device}
        # The packed step's first five fields, one row each: ids, rows, positions, slots, lens.
        self.small = torch.zeros(5, size, **i32)
        self.ids = torch.zeros(size, **i32)
        self.block_tables = torch.zeros(size, self.width, **i32)
        self.cu = torch.zeros(1, **i32)
        dtype = model.embed_tokens.weight.dtype
        self.hidden = torch.zeros(size, model.cfg.hidden_size, dtype=dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture(device)

    def bucket(self, n: int) -> int:
        """The captured size a batch of ``n`` runs in."""
        return self.sizes[bisect.bisect_left(self.sizes, n)]

    def fits(self, n: int, width: int) -> bool:
        return n <= self.sizes[-1] and width <= self.width

    @torch.inference_mode()
    def run(self, buf: Tensor, n: int, width: int, last_tokens: Tensor) -> Tensor:
        """Final hidden states [n, H] of a decode batch packed as five padded columns of
        ``bucket(n)`` entries followed by the [n, width] block tables."""
        size = self.bucket(n)
        self.small[:, :size].copy_(buf[: 5 * size].view(5, size))
        self.block_tables[:n, :width].copy_(buf[5 * size : 5 * size + n * width].view(n, width))
        small = self.small[:, :size]
        torch.where(small[0] >= 0, small[0], last_tokens[small[1]], out=self.ids[:size])
        graph = self.graphs.get(size)
        if graph is None:
            self._forward(size)
        else:
            graph.replay()
        return self.hidden[:n]

    def _forward(self, size: int) -> None:
        s = self.small
        meta = AttentionMetadata(
            slot_mapping=s[3, :size].long(),
            block_tables=self.block_tables[:size],
            context_lens=s[4, :size],
            cu_seqlens_q=self.cu,
            num_decode=size,
            backend=self.backend,
        )
        self.hidden[:size] = self.model(self.ids[:size], s[2, :size], self.kv_caches, meta)

    @torch.inference_mode()
    def _capture(self, device: torch.device) -> None:
        """Largest size first, all sharing one memory pool (a smaller graph reuses its blocks)."""
        start, free_before = time.perf_counter(), torch.cuda.mem_get_info(device)[0]
        for row, fill in enumerate(_PAD):
            self.small[row].fill_(fill)
        pool = None
        for size in reversed(self.sizes):
            self._forward(size)  # compiles the Triton variants and picks GEMMs outside the capture
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(size)
            pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(device)
        used = free_before - torch.cuda.mem_get_info(device)[0]
        log.info("captured %d decode graphs (batch %d..%d) in %.1f s, %.0f MiB",
                 len(self.sizes), self.sizes[0], self.sizes[-1], time.perf_counter() - start,
                 used / 2**20)
