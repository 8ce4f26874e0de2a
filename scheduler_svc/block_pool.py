"""The physical KV blocks of one worker: which are free, which are in use.

A request's block table is the list of block ids it holds, in order; the pool only knows the
free set. Invariant (asserted): free + held by block tables = total, and no block twice.
"""

from __future__ import annotations

from collections import deque


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._in_use: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._in_use)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise MemoryError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        self._in_use.update(blocks)
        return blocks

    def release(self, blocks: list[int]) -> None:
        for b in blocks:
            assert b in self._in_use, f"block {b} released but not in use"
            self._in_use.remove(b)
            self._free.append(b)

    def check(self, tables: list[list[int]]) -> None:
        """Assert the pool agrees with the block tables that name its blocks."""
        held = [b for t in tables for b in t]
        assert len(held) == len(set(held)), "a block is in two block tables"
        assert set(held) == self._in_use, "block tables and pool disagree on blocks in use"
        assert len(self._free) + len(self._in_use) == self.num_blocks
        assert not self._in_use.intersection(self._free)
