"""Per-request KV bookkeeping between the scheduler's decisions and the block pool.

The scheduler decides who runs with how many tokens; this says what that costs in blocks and
does the bookkeeping: block tables grow and are given back, a prompt's leading blocks are found
in the prefix cache, and full computed blocks are named by their chained hash so later prompts
can find them. The pool below it (``block_pool``) knows blocks, not requests.
"""

from __future__ import annotations

from pagewire.block_hash import block_hash, image_extra, prompt_block_hashes
from scheduler_svc.block_pool import BlockPool, blocks_for
from scheduler_svc.request import Request, Status


class KVCacheManager:
    def __init__(self, pool: BlockPool, block_size: int, prefix_caching: bool) -> None:
        self.pool = pool
        self.block_size = block_size
        self.prefix_caching = prefix_caching

    @property
    def num_free(self) -> int:
        return self.pool.num_free

    def blocks_needed(self, req: Request, num_tokens: int) -> int:
        """Blocks ``req`` lacks to compute ``num_tokens`` more tokens."""
        return blocks_for(req.num_computed + num_tokens, self.block_size) - len(req.block_table)

    def grow(self, req: Request, num_tokens: int) -> list[int]:
        """Allocate what ``req`` lacks for ``num_tokens`` more tokens; the new blocks."""
        new_blocks = self.pool.allocate(self.blocks_needed(req, num_tokens))
        req.block_table.extend(new_blocks)
        return new_blocks

    def grow_one(self, req: Request) -> int:
        """One more block for a decode crossing into it."""
        block = self.pool.allocate(1)[0]
        req.block_table.append(block)
        return block

    def free(self, req: Request) -> None:
        """Give ``req``'s blocks back (hashed ones stay cached)."""
        if req.block_table:
            self.pool.release(req.block_table)
            req.block_table = []

    # ---- the prefix cache --------------------------------------------------------------
    def cached_prefix(self, req: Request) -> list[int]:
        """Cached blocks for the request's leading full blocks (none with caching off)."""
        if not self.prefix_caching or not req.uses_prefix_cache:
            return []
        hashes = prompt_block_hashes(req.tokens(0, req.num_tokens), self.block_size, req.images,
                                     req.cache_salt)
        req.block_hashes = hashes  # provisional: trimmed to what is really in the table by admit
        return self.pool.lookup(hashes)

    def can_admit(self, req: Request, hits: list[int], num_tokens: int) -> bool:
        """Whether ``num_tokens`` after the ``hits`` fit: reusing cached blocks takes them out of
        the evictable set, so they count as needed too."""
        reusable = sum(1 for b in hits if self.pool.ref_count[b] == 0)
        cached = len(hits) * self.block_size
        need = blocks_for(cached + num_tokens, self.block_size) - len(hits)
        return need + reusable <= self.pool.num_free

    def admit(self, req: Request, hits: list[int]) -> None:
        """Start ``req``'s block table with the cached ``hits``."""
        self.pool.acquire(hits)
        if self.prefix_caching and req.uses_prefix_cache:
            self.pool.count_lookup(len(req.block_hashes), len(hits))
        req.block_table = list(hits)
        req.block_hashes = req.block_hashes[: len(hits)]
        # A fully cached sequence still computes its last token (its logits are needed).
        req.num_computed = min(len(hits) * self.block_size, req.num_tokens - 1)
        if req.num_cached < 0:
            req.num_cached = req.num_computed

    def register_full_blocks(self, req: Request, computed: int) -> None:
        """Name every newly full block among the first ``computed`` tokens by its chained hash."""
        bs = self.block_size
        full = min(min(computed, req.num_known) // bs, len(req.block_table))
        parent = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), full):
            extra = image_extra(req.images, i * bs, (i + 1) * bs) if req.images else b""
            parent = block_hash(parent, req.tokens(i * bs, (i + 1) * bs), extra, req.cache_salt)
            req.block_hashes.append(parent)
            self.pool.register(req.block_table[i], parent)

    # ---- recovery ----------------------------------------------------------------------
    def restore(self, req: Request) -> None:
        """Take back a request reloaded from Redis whose blocks are in the pool already.

        A request with output has every token but the last in the worker's KV (that is how its
        last token was sampled). One still in prefill keeps only the cached leading blocks it can
        prove by hash; the rest of its prompt is computed again.
        """
        bs = self.block_size
        if req.output:
            req.num_computed = req.num_tokens - 1
        else:
            hashes = prompt_block_hashes(req.tokens(0, req.num_tokens), bs, req.images,
                                         req.cache_salt)
            proven = 0
            for h, b in zip(hashes, req.block_table, strict=False):
                if self.pool.index.get(h) != b:
                    break
                proven += 1
            req.num_computed = min(proven * bs, req.num_tokens - 1)
        req.num_computed = min(req.num_computed, len(req.block_table) * bs)
        req.block_hashes = []
        self.register_full_blocks(req, req.num_computed)
        req.status = Status.RUNNING

    def reset(self, num_blocks: int) -> None:
        """A fresh pool (the worker's KV memory is gone): every block free, nothing cached."""
        self.pool = BlockPool(num_blocks)

    def check(self, reqs: list[Request]) -> None:
        self.pool.check([r.block_table for r in reqs])
