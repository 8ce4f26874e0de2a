"""The physical KV blocks of one worker: reference counts, the prefix cache, LRU eviction.

A block is in exactly one of three places: ``free`` (no reference, nothing worth keeping), in use
(reference count > 0: named by that many block tables), or ``cached_free`` (no reference, but it
holds a full block whose chained hash is in the prefix index, kept in least-recently-used order
for reuse or eviction). Allocation takes free blocks first, then evicts the oldest cached one.

Hash hits are trusted without comparing token ids because the hash is 128-bit BLAKE2b over the
whole prefix (``pagewire.block_hash``): a collision is not a practical event.

Every block whose place changed since the last :meth:`drain_dirty` is reported, so the state
store writes the final state of each changed block once per step, whatever happened in between.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """KV blocks that hold ``num_tokens`` tokens (the last one partly filled)."""
    return -(-num_tokens // block_size)


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.cached_free: OrderedDict[int, None] = OrderedDict()  # oldest first
        self.index: dict[bytes, int] = {}  # prefix cache: block hash -> block id
        self._dirty: set[int] = set()
        self._unhashed: dict[bytes, int] = {}  # hashes removed since the last drain
        self.hits = 0
        self.queries = 0

    @classmethod
    def restore(
        cls,
        num_blocks: int,
        tables: Iterable[Sequence[int]],
        index: dict[bytes, int],
        cached_lru: Sequence[int],
    ) -> BlockPool:
        """Rebuild the pool from what Redis recorded: reference counts follow the block tables."""
        pool = cls(num_blocks)
        for t in tables:
            for b in t:
                pool.ref_count[b] += 1
        for h, b in index.items():
            pool.block_hash[b] = h
            pool.index[h] = b
        free, cached = pool.places(range(num_blocks))
        listed = set(cached_lru)
        # Redis's LRU order; hashed, unreferenced blocks it did not list stay cached, as the
        # oldest (highest id first).
        unlisted = [b for b in reversed(cached) if b not in listed]
        pool.cached_free = OrderedDict.fromkeys(unlisted + pool.places(cached_lru)[1])
        pool.free = deque(free)
        return pool

    # ---- capacity ----------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks an allocation can take (free, plus cached blocks it may evict)."""
        return len(self.free) + len(self.cached_free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    # ---- prefix cache ------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """Blocks holding the longest cached run of ``hashes`` (leading blocks of a prompt)."""
        found = []
        for h in hashes:
            block = self.index.get(h)
            if block is None:
                break
            found.append(block)
        return found

    def count_lookup(self, queried: int, hit: int) -> None:
        """Prefix-cache statistics, counted once per admission (not per retry of a waiting one)."""
        self.queries += queried
        self.hits += hit

    def acquire(self, blocks: Iterable[int]) -> None:
        """Take a reference on cached blocks a new request reuses."""
        for b in blocks:
            if self.ref_count[b] == 0:
                del self.cached_free[b]
                self._dirty.add(b)
            self.ref_count[b] += 1

    def register(self, block: int, block_hash: bytes) -> None:
        """A block just became full and computed: make it findable by its hash.

        If another block already holds the same content, the index keeps that one.
        """
        if self.block_hash[block] is not None or block_hash in self.index:
            return
        self.block_hash[block] = block_hash
        self.index[block_hash] = block
        self._dirty.add(block)

    # ---- allocation --------------------------------------------------------------------
    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise MemoryError(f"asked for {n} blocks, {self.num_free} free")
        blocks = []
        for _ in range(n):
            if self.free:
                b = self.free.popleft()
            else:
                b, _ = self.cached_free.popitem(last=False)
                self._forget_hash(b)
            self.ref_count[b] = 1
            self._dirty.add(b)
            blocks.append(b)
        return blocks

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference per block; unreferenced hashed blocks stay cached (most recent last).

        A table is released last block first, so its first block is the last to be evicted: a
        chained prefix is only reusable from its start, and evicting the head first would strand
        every later block of it in the cache, unusable.
        """
        for b in reversed(blocks):
            assert self.ref_count[b] > 0, f"block {b} released but not in use"
            self.ref_count[b] -= 1
            if self.ref_count[b] == 0:
                if self.block_hash[b] is not None:
                    self.cached_free[b] = None
                else:
                    self.free.append(b)
                self._dirty.add(b)

    def places(self, blocks: Iterable[int]) -> tuple[list[int], list[int]]:
        """``blocks`` sorted into free ones and cached ones (in their given order); the rest are
        in use. The one statement of what makes a block free, cached or in use."""
        refs, hashes = self.ref_count, self.block_hash
        free, cached = [], []
        for b in blocks:
            if refs[b] == 0:
                (free if hashes[b] is None else cached).append(b)
        return free, cached

    def _forget_hash(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None:
            self.block_hash[b] = None
            if self.index.get(h) == b:
                del self.index[h]
                self._unhashed[h] = b
            self._dirty.add(b)

    # ---- reporting ---------------------------------------------------------------------
    def drain_dirty(self) -> tuple[list[int], dict[bytes, int]]:
        """Blocks whose place changed, and hashes removed from the index, since the last call."""
        dirty, self._dirty = sorted(self._dirty), set()
        unhashed, self._unhashed = self._unhashed, {}
        return dirty, unhashed

    def check(self, tables: Iterable[Sequence[int]]) -> None:
        """Assert the pool agrees with the block tables that name its blocks."""
        refs = [0] * self.num_blocks
        for t in tables:
            assert len(set(t)) == len(t), "a block twice in one block table"
            for b in t:
                refs[b] += 1
        assert refs == self.ref_count, "reference counts differ from the block tables"
        free, cached = set(self.free), set(self.cached_free)
        assert len(free) == len(self.free), "a block twice in the free list"
        assert not free & cached, "a block both free and cached"
        in_use = {b for b in range(self.num_blocks) if refs[b]}
        assert not in_use & (free | cached), "a block both in use and free"
        assert len(free) + len(cached) + len(in_use) == self.num_blocks
        placed = self.places(range(self.num_blocks))
        assert (set(placed[0]), set(placed[1])) == (free, cached), "a block out of its place"
        for h, b in self.index.items():
            assert self.block_hash[b] == h, "prefix index points at a block with another hash"
