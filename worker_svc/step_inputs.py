"""A step's inputs, laid out on the host and sent to the device in one copy.

Everything the forward pass reads per token or per sequence (token ids, the row whose last sample
feeds a token, positions, KV slots, context lengths, prefill offsets, block tables) is packed
into one int32 buffer. On CUDA it goes through pinned memory on a side stream: the copy of step
N+1's inputs runs on the copy engine while step N computes, the host never waits for it, and the
compute stream only waits for the copy's event. One copy instead of seven also saves six launches
and six staging buffers per step.

A token whose id the host does not know yet -- a decode feeding the token its sequence sampled in
the step still in flight -- is sent as ``-1`` with its sequence's row; the device takes the id
from the runner's column of last samples (:meth:`StepTensors.token_ids`), so step N+1 can be
launched before step N's tokens reach the host.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

FROM_DEVICE = -1  # a token id the device fills in from the sequence's last sample


@dataclass
class StepTensors:
    """Device views into one packed step buffer (all int32)."""

    ids: Tensor  # [T] token ids, FROM_DEVICE where the last sample is to be used
    rows: Tensor  # [T] table row of each token's sequence
    positions: Tensor  # [T]
    slots: Tensor  # [T] KV slot of each token, -1 = do not store (padding)
    context_lens: Tensor  # [B]
    cu_seqlens_q: Tensor  # [P + 1] offsets of the prefill chunks (from 0)
    block_tables: Tensor  # [B, width]
    sampling: Tensor  # [2 * S]: table rows, then hidden-state indices, of the sampling rows

    def token_ids(self, last_tokens: Tensor) -> Tensor:
        """Input ids with every FROM_DEVICE filled from ``last_tokens`` (indexed by row)."""
        return torch.where(self.ids >= 0, self.ids, last_tokens[self.rows])


def pack(
    ids: np.ndarray, rows: np.ndarray, positions: np.ndarray, slots: np.ndarray,
    context_lens: np.ndarray, cu_seqlens_q: np.ndarray, block_tables: np.ndarray,
    *extra: np.ndarray,
) -> tuple[np.ndarray, tuple[int, ...]]:
    """One int32 buffer holding the fields in order, and the field lengths."""
    fields = (ids, rows, positions, slots, context_lens, cu_seqlens_q, block_tables, *extra)
    sizes = tuple(int(f.size) for f in fields)
    out = np.empty(sum(sizes), dtype=np.int32)
    at = 0
    for f, n in zip(fields, sizes, strict=True):
        out[at : at + n] = f.reshape(-1)
        at += n
    return out, sizes


def unpack(buf: Tensor, sizes: tuple[int, ...], width: int) -> StepTensors:
    """Views of the fields of a buffer made by :func:`pack` (``width``: block-table columns)."""
    parts = list(buf.split(sizes))
    parts[6] = parts[6].view(-1, width)
    return StepTensors(*parts)


class Uploader:
    """Host -> device copies of packed step buffers (on CUDA: pinned memory, a side stream)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(self, packed: np.ndarray) -> Tensor:
        host = torch.from_numpy(packed)
        if self.stream is None:
            return host.to(self.device)
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        pinned.copy_(host)
        main = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self.stream):
            buf = pinned.to(self.device, non_blocking=True)
        main.wait_stream(self.stream)
        buf.record_stream(main)  # allocated on the side stream, read on the main one
        return buf


class Download:
    """A device tensor on its way to the host: started at once, awaited only when read."""

    def __init__(self, src: Tensor) -> None:
        if src.device.type != "cuda":
            self.host, self.event = src, None
            return
        self.host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
        self.host.copy_(src, non_blocking=True)
        self.event = torch.cuda.Event()
        self.event.record()

    def ready(self) -> bool:
        return self.event is None or self.event.query()

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def numpy(self) -> np.ndarray:
        self.wait()
        return self.host.numpy()
