"""The planner with several KV-cache groups (kvbm.core.groups): pure Python, real BlockPools.

A hybrid model has one block table per group. A full-attention group needs its whole prefix
for a hit, a sliding-window group only the ``window_blocks`` blocks before the hit's end; vLLM
puts its null block (NULL here) where a windowed group keeps nothing.
"""

from __future__ import annotations

import pytest

from kvbm.core.groups import SINGLE_FULL, KVGroup, check_groups, group_root
from kvbm.core.hashing import engine_root, extend_hashes
from kvbm.core.planner import Planner
from kvbm.core.pool import BlockPool
from kvbm.core.tiers import DISK, HOST, Tier

BS = 4
NULL = 0
ROOT = engine_root("groups-test")
FULL = KVGroup("0:full", None)
SWA = KVGroup("1:swa", 2)
SWA3 = KVGroup("2:swa", 3)


def toks(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def make(groups=(FULL, SWA), slots: int = 256, disk: int = 0) -> tuple[Planner, BlockPool, BlockPool | None]:
    host = BlockPool(slots, "g2")
    chain = [Tier("G2", HOST, slots, sync_load=True)]
    indexes = {"G2": host}
    g3 = None
    if disk:
        g3 = BlockPool(disk, "g3")
        chain.append(Tier("G3", DISK, disk))
        indexes["G3"] = g3
    return Planner(chain, BS, groups=groups, null_block=NULL, indexes=indexes), host, g3


def seed(pool: BlockPool, tokens, group: KVGroup, blocks=None) -> dict[int, int]:
    """Commit the group's blocks of ``tokens`` (or only ``blocks``) into ``pool``: {block: slot}."""
    hs = extend_hashes([], tokens, BS, group_root(ROOT, group))
    out = {}
    for i, h in enumerate(hs):
        if blocks is None or i in blocks:
            slot = pool.reserve(h)
            pool.commit(slot)
            out[i] = slot
    return out


def ids(group: int, n: int, nulls: int = 0) -> list[int]:
    """GPU block ids of one group: ``nulls`` null blocks, then real ones."""
    return [NULL] * nulls + [1000 * (group + 1) + i for i in range(nulls, n)]


def test_group_roots_are_distinct_and_the_single_group_keeps_the_request_chain():
    assert group_root(ROOT, SINGLE_FULL[0]) == ROOT
    assert len({group_root(ROOT, g) for g in (FULL, SWA, SWA3)}) == 3
    with pytest.raises(ValueError):
        check_groups([KVGroup("a"), KVGroup("a", 2)])
    with pytest.raises(ValueError):
        check_groups([KVGroup("", None), KVGroup("b", 2)])


def test_windowed_group_needs_only_its_window():
    planner, host, _ = make()
    prompt = toks(10 * BS + 1)  # 10 full blocks can be matched
    seed(host, prompt, FULL)
    swa = seed(host, prompt, SWA, blocks={8, 9})  # only the window before block 10
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 10 * BS
    planner.on_alloc("r", [ids(0, 11), ids(1, 11, nulls=8)], 10 * BS)
    op = planner.take_plan().loads[0]
    # full group: blocks 0..9; window group: blocks 8, 9 only
    assert op.gpu_blocks == ids(0, 10) + [2008, 2009]
    assert [p.slots for p in op.parts][-1] == [swa[8], swa[9]]
    assert planner.load_sources("r")["G2"] == 12
    # the hit rate counts prompt positions (the full group's blocks), not blocks moved: never above 1
    assert planner.stats.tier("G2").hit_blocks == planner.stats.lookup_blocks == 10


def test_a_gap_in_the_window_ends_the_hit_before_it():
    planner, host, _ = make()
    prompt = toks(10 * BS + 1)
    seed(host, prompt, FULL)
    seed(host, prompt, SWA, blocks={4, 5, 6, 7, 9})  # block 8 missing: windows ending at 10 and 9 break
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 8 * BS  # the window 6, 7 before block 8


def test_the_full_group_bounds_the_hit_and_windows_follow_it():
    planner, host, _ = make()
    prompt = toks(10 * BS + 1)
    seed(host, prompt, FULL, blocks=set(range(5)))
    seed(host, prompt, SWA)
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 5 * BS
    planner.on_alloc("r", [ids(0, 11), ids(1, 11, nulls=3)], 5 * BS)
    op = planner.take_plan().loads[0]
    assert op.gpu_blocks == ids(0, 5) + [2003, 2004]


def test_several_windows_settle_on_an_end_every_group_serves():
    planner, host, _ = make((FULL, SWA, SWA3))
    prompt = toks(12 * BS + 1)
    seed(host, prompt, FULL)
    seed(host, prompt, SWA, blocks={6, 7, 9, 10, 11})  # serves ends 12, 11, 8
    seed(host, prompt, SWA3, blocks=set(range(0, 9)))  # serves ends <= 9
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 8 * BS


def test_a_hit_after_vllms_own_prefix_reads_the_window_from_there():
    planner, host, _ = make()
    prompt = toks(10 * BS + 1)
    seed(host, prompt, FULL)
    seed(host, prompt, SWA, blocks={7, 8, 9})
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 9 * BS) == 1 * BS  # vLLM holds 9 blocks; the window needs block 9 only
    planner.on_alloc("r", [ids(0, 11), ids(1, 11, nulls=7)], BS)
    assert planner.take_plan().loads[0].gpu_blocks == [1009, 2009]


def test_windows_only_model_matches_without_a_full_group():
    planner, host, _ = make((KVGroup("0:swa", 2), KVGroup("1:swa", 2)))
    prompt = toks(6 * BS + 1)
    seed(host, prompt, KVGroup("0:swa", 2), blocks={4, 5})
    seed(host, prompt, KVGroup("1:swa", 2), blocks={4, 5})
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 6 * BS


def test_windows_span_tiers_in_chain_order():
    planner, host, disk = make(disk=64)
    prompt = toks(8 * BS + 1)
    seed(host, prompt, FULL, blocks=set(range(6)))
    seed(disk, prompt, FULL, blocks={6, 7})
    seed(host, prompt, SWA, blocks={6})
    seed(disk, prompt, SWA, blocks={7})
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 8 * BS
    planner.on_alloc("r", [ids(0, 9), ids(1, 9, nulls=6)], 8 * BS)
    assert planner.load_sources("r") == {"G2": 7, "G3": 3}


def test_stores_skip_null_blocks():
    planner, host, _ = make()
    prompt = toks(4 * BS)
    planner.add_request("r", ROOT)
    planner.on_scheduled("r", prompt, [ids(0, 4), ids(1, 4, nulls=1)], True, 4 * BS, 0)
    store = planner.take_plan().store
    assert store is not None
    assert NULL not in store.gpu_blocks
    assert len(store.gpu_blocks) == 4 + 3


def test_a_step_waits_for_a_windowed_store_only_when_vllm_hands_out_one_of_its_blocks():
    """vLLM frees a window's older blocks while the request runs and may give them to another
    request: that step's forward pass must not write one before the store has read it. Steps
    that allocate none of them (the usual case: freed blocks are handed out last) do not wait;
    full-attention blocks are never freed under a running request and never fence."""
    planner, host, _ = make()
    prompt = toks(4 * BS)
    planner.add_request("r", ROOT)
    planner.on_scheduled("r", prompt, [ids(0, 4), ids(1, 4, nulls=1)], True, 4 * BS, 0)
    plan = planner.take_plan()
    assert not plan.fence_stores  # nothing was in flight
    window_blocks = ids(1, 4, nulls=1)[1:]
    # Next step: another request gets fresh blocks and a full-attention block id of "r": no fence.
    planner.add_request("q", ROOT)
    planner.on_alloc("q", [[5000, 1001], [6000, 6001]], 0)
    planner.on_scheduled("q", toks(2 * BS, 77), [[5000, 1001], [6000, 6001]], True, BS, 0)
    assert not planner.take_plan().fence_stores
    # A step that hands out one of the windowed blocks being stored waits (a new request's table)...
    planner.add_request("p", ROOT)
    planner.on_scheduled("p", toks(2 * BS, 99), [[7000, 7001], [window_blocks[0], 7002]], True, BS, 0)
    assert planner.take_plan().fence_stores
    # ... and so does one that gives it to a running request as a new block.
    planner.on_scheduled("q", toks(2 * BS, 77), [[], [window_blocks[1]]], False, 2 * BS, BS)
    assert planner.take_plan().fence_stores
    assert planner.stats.window_store_fences == 2 and planner.stats.window_store_fences_skipped == 1
    # Once every store is reported the blocks are free to write: no fence.
    planner.on_worker_report(stored={batch: 1 for batch in list(planner._pending)})
    planner.on_scheduled("q", toks(3 * BS, 77), [[], [window_blocks[2]]], False, 3 * BS, 2 * BS)
    assert not planner.take_plan().fence_stores


def test_a_failed_windowed_store_fences_nothing():
    planner, host, _ = make()
    planner.add_request("r", ROOT)
    planner.on_scheduled("r", toks(4 * BS), [ids(0, 4), ids(1, 4, nulls=1)], True, 4 * BS, 0)
    batch = planner.take_plan().store.batch_id
    planner.on_worker_report(failed_batches=[batch])
    planner.add_request("p", ROOT)
    planner.on_scheduled("p", toks(2 * BS, 99), [[7000, 7001], [ids(1, 4)[2], 7002]], True, BS, 0)
    assert not planner.take_plan().fence_stores


def test_a_windowed_group_stores_only_what_the_step_computed():
    """vLLM frees a window's older blocks while the request runs: one stored a step late could
    hold another request's KV. The full group resumes a store the pool had no room for."""
    planner, host, _ = make(slots=8)
    prompt = toks(4 * BS)
    planner.add_request("r", ROOT)
    held = [host.reserve(bytes([s]) * 16) for s in range(8)]  # every slot pending: no room this step
    planner.on_scheduled("r", prompt, [ids(0, 3), ids(1, 3)], True, 3 * BS, 0)
    assert planner.take_plan().store is None
    for slot in held:
        host.drop(slot)
    planner.on_scheduled("r", prompt, [[1003], [2003]], False, 4 * BS, 3 * BS)
    store = planner.take_plan().store
    assert [b for b in store.gpu_blocks if b < 2000] == ids(0, 4)  # the full group catches up
    assert [b for b in store.gpu_blocks if b >= 2000] == [2003]  # blocks 0-2 may be gone: never


def test_single_group_planner_accepts_flat_block_lists():
    planner = Planner([Tier("G2", HOST, 16, sync_load=True)], BS)
    planner.add_request("r", ROOT)
    planner.on_scheduled("r", toks(2 * BS), [7, 8], True, 2 * BS)
    assert planner.take_plan().store.gpu_blocks == [7, 8]


def test_a_group_read_before_the_step_loads_asynchronously_even_from_g2():
    """vLLM copies a Mamba state out of the hit's block before the step's forward, before an
    in-step load lands: a hit with a part in such a group is loaded before the request runs."""
    mamba = KVGroup("1:MambaSpec:1", 1, load_before_step=True)
    planner, host, _ = make((FULL, mamba))
    prompt = toks(6 * BS + 1)
    seed(host, prompt, FULL)
    seed(host, prompt, mamba, blocks={5})
    planner.add_request("r", ROOT)
    assert planner.match("r", prompt, 0) == 6 * BS
    assert planner.load_is_async("r")
    # the same hit without the Mamba part (vLLM holds the state itself) stays in-step
    plain, host2, _ = make((FULL, SWA))
    seed(host2, prompt, FULL)
    seed(host2, prompt, SWA, blocks={4, 5})
    plain.add_request("r", ROOT)
    assert plain.match("r", prompt, 0) == 6 * BS
    assert not plain.load_is_async("r")
