"""M-RoPE positions (Qwen2.5-VL): where each token of a step sits in (temporal, height, width).

As transformers numbers a prompt (``get_rope_index``): text tokens count up by one with all
three positions equal; an image's placeholders, starting at text position ``s``, take
``(s + t, s + row, s + column)`` over its merged grid (t, h, w) in raster order; the text after
it resumes at ``s + max(h, w)``. So from the end of an image on, a token's position is its index
in the sequence plus an offset (the image's ``max(h, w) - t*h*w``, summed over the images so
far); past the last image that offset is the sequence's ``rope_delta``, which decodes add (one
array op over the batch). A token whose three positions are equal rotates exactly as with a
plain position, so only steps with image placeholders in them carry [3, T] positions.

The worker knows every image of a sequence (offset, length, grid) whenever it holds the
sequence, since a sequence always arrives whole (``new``) with its images; so positions are
right for a chunk that starts or ends inside an image run, a chunk after a prefix-cache hit
(which starts mid-sequence, images before it included), a resend after preemption, and decodes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pagewire.v1 import common_pb2
from worker_svc.seq_table import SequenceTable
from worker_svc.step_layout import StepLayout


@dataclass(frozen=True)
class ImageGrids:
    """A sequence's images as M-RoPE sees them (arrays by image, in prompt order)."""

    offset: np.ndarray  # first placeholder's index in the sequence
    t: np.ndarray  # merged grid: frames, rows, columns
    h: np.ndarray
    w: np.ndarray

    @property
    def length(self) -> np.ndarray:
        return self.t * self.h * self.w

    @property
    def before(self) -> np.ndarray:
        """[images + 1]: position offset of the tokens after 0, 1, ... images."""
        step = np.maximum(self.h, self.w) - self.length
        return np.concatenate([[0], np.cumsum(step)])


def grids(images: Sequence[common_pb2.ImageInput], merge: int) -> ImageGrids:
    """The merged grids of ``images``; ValueError for an image without a grid, or whose
    placeholder run does not match it."""
    rows = []
    for im in images:
        if len(im.grid_thw) != 3:
            raise ValueError(f"image at {im.offset} has no grid_thw (needed for M-RoPE)")
        t, h, w = im.grid_thw
        if h % merge or w % merge or t * (h // merge) * (w // merge) != im.length:
            raise ValueError(f"image at {im.offset}: grid {list(im.grid_thw)} merged {merge}x"
                             f"{merge} does not give its {im.length} placeholders")
        rows.append((im.offset, t, h // merge, w // merge))
    a = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
    return ImageGrids(a[:, 0], a[:, 1], a[:, 2], a[:, 3])


def sequence_offsets(g: ImageGrids) -> tuple[int, int]:
    """(rope_delta: the offset past the last image, the index where that offset starts)."""
    if not len(g.offset):
        return 0, 0
    return int(g.before[-1]), int(g.offset[-1] + g.length[-1])


def chunk_positions(g: ImageGrids, start: int, n: int) -> tuple[np.ndarray, bool]:
    """([3, n] positions of tokens start .. start + n - 1, whether any is an image's)."""
    idx = np.arange(start, start + n, dtype=np.int64)
    ends = g.offset + g.length
    before = g.before
    pos = np.repeat((idx + before[np.searchsorted(ends, idx, side="right")])[None], 3, axis=0)
    touched = False
    for j in np.flatnonzero((g.offset < start + n) & (ends > start)):
        lo, hi = max(start, int(g.offset[j])), min(start + n, int(ends[j]))
        local = np.arange(lo, hi) - g.offset[j]
        h, w = g.h[j], g.w[j]
        s = g.offset[j] + before[j]
        pos[:, lo - start : hi - start] = s + np.stack([local // (h * w), local // w % h, local % w])
        touched = True
    return pos, touched


def step_positions(
    positions: np.ndarray, owner: np.ndarray, starts: np.ndarray, lens: np.ndarray,
    rows: np.ndarray, delta: np.ndarray, until: np.ndarray,
    grids_of: Callable[[int], ImageGrids | None],
) -> tuple[np.ndarray, np.ndarray | None]:
    """A step's rotary positions: [T] (each token's index plus its sequence's ``delta``), and
    [3, T] when a slot's tokens include an image's placeholders (None otherwise).

    ``positions``/``owner``: each token's index in its sequence and its slot; ``starts``,
    ``lens``, ``rows``: each slot's first index, token count and table row; ``delta``/``until``:
    the table's rope_delta and where it starts, by row; ``grids_of(slot)``: the slot's images.
    Only slots that start before their sequence's last image ends (prefill chunks of prompts
    with images) are worked out token by token; the rest, decodes above all, are one add."""
    flat = positions + delta[rows][owner]
    exact = np.flatnonzero(starts < until[rows])
    if not len(exact):
        return flat, None
    cu = np.concatenate([[0], np.cumsum(lens)])
    images: list[tuple[int, np.ndarray]] = []  # (first token, [3, n]) of slots with image tokens
    for i in exact:
        g = grids_of(int(i))
        if g is None:
            continue
        pos, touched = chunk_positions(g, int(starts[i]), int(lens[i]))
        flat[cu[i] : cu[i + 1]] = pos[0]
        if touched:
            images.append((int(cu[i]), pos))
    if not images:
        return flat, None
    full = np.repeat(flat[None], 3, axis=0)
    for at, pos in images:
        full[:, at : at + pos.shape[1]] = pos
    return flat, full


class MropePositions:
    """The runner's M-RoPE side: each held sequence's image grids by table row, its
    ``rope_delta``/``rope_until`` in the table's columns, and a step's positions from them."""

    def __init__(self, merge: int) -> None:
        self.merge = merge
        self.grids: dict[int, ImageGrids] = {}  # by table row; rows without images absent

    def put(self, table: SequenceTable, row: int, images: Sequence[common_pb2.ImageInput]
            ) -> None:
        """A ``new`` sequence's images (the row was just (re)assigned to it)."""
        self.grids.pop(row, None)
        if images:
            g = grids(images, self.merge)
            self.grids[row] = g
            table.rope_delta[row], table.rope_until[row] = sequence_offsets(g)

    def positions(self, positions: np.ndarray, owner: np.ndarray, lay: StepLayout,
                  table: SequenceTable) -> tuple[np.ndarray, np.ndarray | None]:
        """:func:`step_positions` of a laid-out step."""
        return step_positions(positions, owner, lay.starts, lay.lens, lay.rows,
                              table.rope_delta, table.rope_until,
                              lambda slot: self.grids.get(int(lay.rows[slot])))
