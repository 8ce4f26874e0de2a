import pytest

from scheduler_svc.block_pool import BlockPool


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


def test_check_catches_a_block_in_two_tables() -> None:
    pool = BlockPool(4)
    a = pool.allocate(2)
    with pytest.raises(AssertionError):
        pool.check([a, a[:1]])
