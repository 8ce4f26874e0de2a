"""Image features of the sequences a worker holds: each image encoded once, sliced per chunk.

A sequence's images arrive with its ``new`` SequenceStep. An image is run through the vision
encoder the first time a prefill chunk reaches one of its placeholders, and its output rows
stay here until the sequence is released or resent, so when chunked prefill splits a
placeholder run the later chunks take their rows from the cache instead of encoding again.
Like the sequence table, this is a cache: a resend (preemption, a new stream) rebuilds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from pagewire.images import pixels
from pagewire.v1 import common_pb2, worker_pb2


class EncoderCache:
    def __init__(self, vision: nn.Module | None, device: torch.device) -> None:
        self.vision = vision
        self.device = device
        self.images: dict[int, list[common_pb2.ImageInput]] = {}
        self.features: dict[tuple[int, int], Tensor] = {}  # (seq_id, image index) -> [len, H]
        self.encoded = 0  # images run through the encoder (tests and metrics read it)

    def put(self, seq_id: int, images: Sequence[common_pb2.ImageInput]) -> None:
        """A ``new`` sequence's images (replacing any it had)."""
        self.release((seq_id,))
        if images:
            if self.vision is None:
                raise ValueError("this worker's model takes no images")
            self.images[seq_id] = list(images)

    def release(self, seq_ids: Iterable[int]) -> None:
        for s in seq_ids:
            for i in range(len(self.images.pop(s, ()))):
                self.features.pop((s, i), None)

    def clear(self) -> None:
        self.images.clear()
        self.features.clear()

    def step_embeds(
        self, seqs: Sequence[worker_pb2.SequenceStep], token_at: np.ndarray
    ) -> tuple[Tensor, Tensor] | None:
        """(token indices, rows) of the step's placeholder tokens; ``token_at[i]``: index in the
        forward pass of SequenceStep i's first token. None when the step has none."""
        if not self.images:
            return None
        idx: list[np.ndarray] = []
        rows: list[Tensor] = []
        for i, s in enumerate(seqs):
            images = self.images.get(s.seq_id)
            if not images:
                continue
            start, end = s.start_pos, s.start_pos + max(len(s.token_ids), 1)
            for j, im in enumerate(images):
                lo, hi = max(start, im.offset), min(end, im.offset + im.length)
                if lo >= hi:
                    continue
                feats = self._features(s.seq_id, j, im)
                rows.append(feats[lo - im.offset : hi - im.offset])
                idx.append(np.arange(lo - start, hi - start) + int(token_at[i]))
        if not idx:
            return None
        index = torch.from_numpy(np.concatenate(idx)).to(self.device)
        return index, torch.cat(rows)

    def _features(self, seq_id: int, j: int, im: common_pb2.ImageInput) -> Tensor:
        key = (seq_id, j)
        feats = self.features.get(key)
        if feats is None:
            assert self.vision is not None
            px = torch.from_numpy(pixels(im).copy()).to(self.device)
            feats = self.vision.encode(px, tuple(im.grid_thw))
            if feats.shape[0] != im.length:
                raise ValueError(f"image at {im.offset} has {im.length} placeholders; the "
                                 f"encoder gives {feats.shape[0]} rows")
            self.features[key] = feats
            self.encoded += 1
        return feats
