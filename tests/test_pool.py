"""BlockPool: slot states, dedup, LRU eviction, pins. (No timing asserts.)"""

from __future__ import annotations

import pytest

from kvbm.core.pool import BlockPool, SlotState


def fill(pool: BlockPool, hashes) -> list[int]:
    """Reserve and commit ``hashes`` in order; returns their slots."""
    slots = []
    for h in hashes:
        slot = pool.reserve(h)
        assert slot is not None
        pool.commit(slot)
        slots.append(slot)
    return slots


def check_invariants(pool: BlockPool) -> None:
    """Every slot is exactly one of: free, evictable (LRU), pinned, pending."""
    lru = set(pool.lru_order())
    free = set(pool._free)
    assert len(free) == len(pool._free), "slot freed twice"
    assert not (lru & free)
    for slot in range(pool.num_slots):
        state, refs = pool.state(slot), pool.refcount(slot)
        assert refs >= 0
        if slot in free:
            assert state is SlotState.FREE and refs == 0
        elif slot in lru:
            assert state is SlotState.READY and refs == 0
        else:
            assert refs > 0 or state is SlotState.PENDING, (slot, state, refs)
    assert pool.num_used == pool.num_slots - len(free)


def test_rejects_empty_pool():
    with pytest.raises(ValueError, match="num_slots"):
        BlockPool(0, name="g2")


def test_fresh_pool():
    pool = BlockPool(4)
    assert pool.num_used == 0
    assert not pool.contains(1)
    assert pool.ready_slot(1) is None
    assert pool.match_prefix([1, 2]) == []
    assert pool.lru_order() == []
    check_invariants(pool)


def test_reserve_is_pending_and_invisible_but_deduped():
    pool = BlockPool(4)
    slot = pool.reserve(11)
    assert slot is not None
    assert pool.state(slot) is SlotState.PENDING
    assert pool.contains(11)  # dedup: nobody stores it twice
    assert pool.ready_slot(11) is None  # but lookups do not see it
    assert pool.match_prefix([11]) == []
    assert pool.reserve(11) is None  # already being stored
    assert pool.lru_order() == []  # pending slots are not evictable
    assert pool.num_used == 1
    check_invariants(pool)


def test_commit_makes_visible_and_evictable():
    pool = BlockPool(4)
    slot = pool.reserve(11)
    pool.commit(slot)
    assert pool.state(slot) is SlotState.READY
    assert pool.ready_slot(11) == slot
    assert pool.match_prefix([11]) == [slot]
    assert pool.lru_order() == [slot]
    assert pool.reserve(11) is None  # stored already
    assert pool.stats.stored == 1
    # Committing twice is a no-op.
    pool.commit(slot)
    assert pool.stats.stored == 1
    assert pool.lru_order() == [slot]
    check_invariants(pool)


def test_num_used():
    pool = BlockPool(3)
    a = pool.reserve(1)
    assert pool.num_used == 1
    pool.commit(a)
    pool.reserve(2)
    assert pool.num_used == 2
    pool.drop(a)
    assert pool.num_used == 1
    check_invariants(pool)


def test_lru_evicts_oldest_unreferenced_ready_first():
    pool = BlockPool(3)
    s1, s2, s3 = fill(pool, [1, 2, 3])
    assert pool.lru_order() == [s1, s2, s3]
    s4 = pool.reserve(4)
    assert s4 == s1  # oldest evicted
    assert not pool.contains(1)
    assert pool.ready_slot(1) is None
    assert pool.contains(2) and pool.contains(3) and pool.contains(4)
    assert pool.stats.evicted == 1
    assert pool.state(s4) is SlotState.PENDING
    assert pool.lru_order() == [s2, s3]
    check_invariants(pool)


def test_free_slots_are_used_before_evicting():
    pool = BlockPool(3)
    (s1,) = fill(pool, [1])
    fill(pool, [2, 3])
    assert pool.stats.evicted == 0
    assert pool.ready_slot(1) == s1


def test_touch_moves_to_mru():
    pool = BlockPool(3)
    s1, s2, s3 = fill(pool, [1, 2, 3])
    pool.touch([s1])
    assert pool.lru_order() == [s2, s3, s1]
    assert pool.reserve(4) == s2
    assert pool.contains(1) and not pool.contains(2)
    # Touching several keeps their relative order at the MRU end.
    pool.touch([s3, s1])
    assert pool.lru_order() == [s3, s1]
    check_invariants(pool)


def test_touch_ignores_pinned_and_pending_slots():
    pool = BlockPool(3)
    s1, s2 = fill(pool, [1, 2])
    s3 = pool.reserve(3)
    pool.acquire([s1])
    pool.touch([s1, s3])
    assert pool.lru_order() == [s2]
    check_invariants(pool)


def test_acquire_pins_against_eviction():
    pool = BlockPool(2)
    s1, s2 = fill(pool, [1, 2])
    pool.acquire([s1])
    assert pool.refcount(s1) == 1
    assert pool.lru_order() == [s2]
    s3 = pool.reserve(3)
    assert s3 == s2  # the unpinned one goes, though s1 is older
    assert pool.ready_slot(1) == s1
    check_invariants(pool)


def test_reserve_returns_none_when_everything_pinned_or_pending():
    pool = BlockPool(3)
    s1, s2 = fill(pool, [1, 2])
    pool.reserve(3)  # pending
    pool.acquire([s1, s2])
    assert pool.reserve(4) is None
    assert not pool.contains(4)
    assert pool.stats.evicted == 0
    # Pinned blocks are still readable.
    assert pool.match_prefix([1, 2]) == [s1, s2]
    # One release makes room again.
    pool.release([s2])
    assert pool.reserve(4) == s2
    check_invariants(pool)


def test_release_puts_back_at_mru():
    pool = BlockPool(3)
    s1, s2, s3 = fill(pool, [1, 2, 3])
    pool.acquire([s1])
    pool.release([s1])
    assert pool.refcount(s1) == 0
    assert pool.lru_order() == [s2, s3, s1]
    check_invariants(pool)


def test_multiple_readers_need_all_releases():
    pool = BlockPool(2)
    s1, s2 = fill(pool, [1, 2])
    pool.acquire([s1])
    pool.acquire([s1])
    assert pool.refcount(s1) == 2
    pool.release([s1])
    assert pool.refcount(s1) == 1
    assert s1 not in pool.lru_order()
    pool.release([s1])
    assert pool.lru_order() == [s2, s1]
    check_invariants(pool)


def test_pin_of_pending_slot_then_commit():
    pool = BlockPool(2)
    s = pool.reserve(1)
    pool.acquire([s])
    pool.commit(s)
    assert pool.ready_slot(1) == s
    assert pool.lru_order() == []  # still pinned
    pool.release([s])
    assert pool.lru_order() == [s]
    check_invariants(pool)


def test_drop_unreferenced_frees_immediately():
    pool = BlockPool(2)
    s1, s2 = fill(pool, [1, 2])
    pool.drop(s1)
    assert not pool.contains(1)
    assert pool.state(s1) is SlotState.FREE
    assert pool.lru_order() == [s2]
    assert pool.num_used == 1
    assert pool.stats.dropped == 1
    # The slot is reusable without evicting anything.
    assert pool.reserve(3) == s1
    assert pool.stats.evicted == 0
    check_invariants(pool)


def test_drop_pending_slot():
    pool = BlockPool(2)
    s = pool.reserve(1)
    pool.drop(s)  # failed copy
    assert not pool.contains(1)
    assert pool.num_used == 0
    # The hash can be stored again.
    assert pool.reserve(1) is not None
    check_invariants(pool)


def test_drop_referenced_slot_frees_only_after_release():
    pool = BlockPool(2)
    s1, s2 = fill(pool, [1, 2])
    pool.acquire([s1])
    pool.drop(s1)  # e.g. corrupt data discovered while a load reads it
    assert not pool.contains(1)
    assert pool.ready_slot(1) is None
    assert pool.refcount(s1) == 1
    assert pool.num_used == 2  # not reusable yet
    assert s1 not in pool._free
    # Only the unpinned READY slot can be taken now.
    assert pool.reserve(3) == s2
    assert pool.reserve(4) is None
    check_invariants(pool)
    pool.release([s1])
    assert pool.refcount(s1) == 0
    assert pool.num_used == 1
    assert s1 not in pool.lru_order()
    assert pool.reserve(4) == s1
    check_invariants(pool)


def test_drop_twice_is_harmless():
    pool = BlockPool(2)
    (s1,) = fill(pool, [1])
    pool.drop(s1)
    pool.drop(s1)
    assert pool.stats.dropped == 1
    assert pool._free.count(s1) == 1
    check_invariants(pool)


def test_match_prefix_stops_at_first_miss():
    pool = BlockPool(8)
    s1, s2, _, s4 = fill(pool, [1, 2, 3, 4])
    pool.drop(pool.ready_slot(3))
    assert pool.match_prefix([1, 2, 3, 4]) == [s1, s2]
    assert pool.match_prefix([9, 1, 2]) == []
    assert pool.match_prefix([]) == []
    # A pending block is a miss too.
    pool.reserve(5)
    assert pool.match_prefix([4, 5, 1]) == [s4]


def test_match_prefix_honours_start():
    pool = BlockPool(8)
    s1, s2, s3 = fill(pool, [1, 2, 3])
    hashes = [100, 1, 2, 3, 200]  # block 0 is not in the pool (e.g. on the GPU)
    assert pool.match_prefix(hashes) == []
    assert pool.match_prefix(hashes, 1) == [s1, s2, s3]
    assert pool.match_prefix(hashes, 2) == [s2, s3]
    assert pool.match_prefix(hashes, 4) == []
    assert pool.match_prefix(hashes, 5) == []
    assert pool.match_prefix(hashes, 99) == []


def test_match_prefix_does_not_touch():
    pool = BlockPool(3)
    s1, s2, s3 = fill(pool, [1, 2, 3])
    pool.match_prefix([1, 2])
    assert pool.lru_order() == [s1, s2, s3]


def test_many_cycles_keep_invariants():
    pool = BlockPool(5)
    h = 0
    pinned: list[int] = []
    for step in range(200):
        h += 1
        slot = pool.reserve(h)
        if slot is not None:
            if step % 7 == 0:
                pool.drop(slot)
            else:
                pool.commit(slot)
                if step % 3 == 0 and len(pinned) < 3:
                    pool.acquire([slot])
                    pinned.append(slot)
        if step % 5 == 0 and pinned:
            pool.release([pinned.pop(0)])
        check_invariants(pool)
    pool.release(pinned)
    check_invariants(pool)
    assert all(pool.refcount(s) == 0 for s in range(pool.num_slots))


def test_commit_many_is_commit_in_order():
    one, many = BlockPool(8), BlockPool(8)
    for pool in (one, many):
        slots = [pool.reserve(bytes([i]) * 16) for i in range(5)]
        pool.acquire(slots[1:2])  # pinned: committed but kept out of the LRU
    for slot in reversed(slots):
        one.commit(slot)
    many.commit_many(slots[::-1] + [slots[0], 7])  # again, and a FREE slot: ignored as commit() does
    assert one.lru_order() == many.lru_order() and one.stats == many.stats and one.version == many.version
    assert all(many.state(s) is SlotState.READY for s in slots)
