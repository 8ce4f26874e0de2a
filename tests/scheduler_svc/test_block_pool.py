"""The block pool: reference counts, the prefix index, LRU eviction, rebuilding from Redis."""

import pytest

from scheduler_svc.block_pool import BlockPool

H = [bytes([i]) * 16 for i in range(8)]


def test_allocate_and_release_keep_free_plus_used_equal_total() -> None:
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_free == 0 and pool.num_used == 8
    assert not set(a) & set(b)
    pool.check([a, b])
    pool.release(a)
    assert pool.num_free == 3
    pool.check([b])


def test_over_allocation_fails_without_taking_anything() -> None:
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free == 1


def test_double_release_is_caught() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    pool.release(a)
    with pytest.raises(AssertionError):
        pool.release(a)


def test_check_catches_reference_counts_that_differ_from_tables() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    with pytest.raises(AssertionError):
        pool.check([a, a[:1]])


def test_released_hashed_block_stays_cached_and_is_found_again() -> None:
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.register(b, H[0])
    pool.release([b])
    assert pool.num_free == 4, "a cached block still counts as allocatable"
    assert pool.lookup([H[0], H[1]]) == [b], "longest leading run of hits"
    pool.acquire([b])
    assert pool.ref_count[b] == 1
    pool.check([[b]])


def test_shared_block_counts_one_reference_per_table() -> None:
    pool = BlockPool(4)
    [b] = pool.allocate(1)
    pool.register(b, H[0])
    pool.acquire(pool.lookup([H[0]]))
    assert pool.ref_count[b] == 2
    pool.check([[b], [b]])
    pool.release([b])
    assert pool.ref_count[b] == 1 and b not in pool.cached_free


def test_allocation_prefers_free_blocks_then_evicts_least_recently_used() -> None:
    pool = BlockPool(3)
    blocks = pool.allocate(3)
    for b, h in zip(blocks, H, strict=False):
        pool.register(b, h)
    pool.release([blocks[1]])
    pool.release([blocks[0]])  # blocks[1] is now the oldest cached block
    pool.release([blocks[2]])
    [taken] = pool.allocate(1)
    assert taken == blocks[1]
    assert pool.lookup([H[1]]) == [], "the evicted block left the prefix index"
    assert pool.lookup([H[0]]) == [blocks[0]]
    dirty, unhashed = pool.drain_dirty()
    assert set(dirty) == set(blocks) and unhashed == {H[1]: blocks[1]}


def test_duplicate_content_keeps_the_first_block_in_the_index() -> None:
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    pool.register(a, H[0])
    pool.register(b, H[0])
    assert pool.index[H[0]] == a and pool.block_hash[b] is None
    pool.release([a, b])
    assert b in pool.free and a in pool.cached_free


def test_restore_rebuilds_counts_cache_order_and_free_list() -> None:
    tables = [[0, 1], [0, 2]]
    pool = BlockPool.restore(6, tables, index={H[0]: 0, H[3]: 3, H[4]: 4}, cached_lru=[4, 3])
    pool.check(tables)
    assert pool.ref_count[:3] == [2, 1, 1]
    assert list(pool.cached_free) == [4, 3]
    assert sorted(pool.free) == [5]
    assert pool.allocate(2) == [5, 4], "free first, then the oldest cached"
