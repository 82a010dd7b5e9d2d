"""Planner decisions against a real BlockPool (pure python, no mocks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from kvbm.core.hashing import engine_root, extend_hashes, request_root
from kvbm.core.plan import LoadOp, LoadPart
from kvbm.core.planner import Planner, StepPlan
from kvbm.core.pool import BlockPool, SlotState
from kvbm.core.tiers import DISK, HOST, Tier

BS = 4
ROOT = engine_root("planner-test|bs=4")


def toks(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def gpu(n: int, base: int = 100) -> list[int]:
    return list(range(base, base + n))


def g2(num_slots: int = 64, sync_load: bool = True) -> Tier:
    return Tier("G2", HOST, num_slots, sync_load=sync_load)


def g3(num_slots: int = 64, sync_load: bool = False) -> Tier:
    return Tier("G3", DISK, num_slots, sync_load=sync_load)


def make(num_slots: int = 64, world_size: int = 1) -> tuple[Planner, BlockPool]:
    pool = BlockPool(num_slots, "g2")
    return Planner([g2(num_slots)], BS, world_size, indexes={"G2": pool}), pool


def two_tiers(host: BlockPool, disk: BlockPool, **kw) -> Planner:
    return Planner([g2(host.num_slots), g3(disk.num_slots)], BS, indexes={"G2": host, "G3": disk}, **kw)


def hashes(tokens, root=ROOT) -> list[int]:
    return extend_hashes([], tokens, BS, root)


def seed(pool: BlockPool, tokens, root=ROOT, blocks=None) -> list[int]:
    """Put the full blocks of ``tokens`` (or only ``blocks`` of them) READY into the pool."""
    hs = hashes(tokens, root)
    slots = []
    for i, h in enumerate(hs):
        if blocks is not None and i not in blocks:
            continue
        slot = pool.reserve(h)
        assert slot is not None
        pool.commit(slot)
        slots.append(slot)
    return slots


def prefill(p: Planner, rid: str, tokens, gpu_blocks, root=ROOT) -> StepPlan:
    """A request with no hit runs its whole prompt in one step."""
    p.add_request(rid, root)
    p.match(rid, tokens, 0)
    p.on_alloc(rid, gpu_blocks, 0)
    p.on_scheduled(rid, tokens, gpu_blocks, True, len(tokens))
    return p.take_plan()


def confirm(p: Planner, plan: StepPlan) -> None:
    assert plan.store is not None
    p.on_worker_report(stored={plan.store.batch_id: p.world_size})


def probe(p: Planner, tokens, num_computed: int = 0, root=ROOT) -> int:
    """What a fresh request with ``tokens`` would get from G2 (leaves no trace)."""
    p.add_request("__probe__", root)
    n = p.match("__probe__", tokens, num_computed)
    p.on_finished("__probe__")
    return n


def assert_no_leak(p: Planner, pool: BlockPool) -> None:
    assert not p.busy
    free = set(pool._free)
    lru = set(pool.lru_order())
    for slot in range(pool.num_slots):
        assert pool.refcount(slot) == 0, slot
        assert (slot in free) != (slot in lru), slot
        assert pool.state(slot) is (SlotState.FREE if slot in free else SlotState.READY)


def test_core_imports_neither_torch_nor_vllm():
    code = (
        "import sys, kvbm.core.planner, kvbm.core.pool, kvbm.core.hashing, kvbm.config\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'vllm')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---- match -------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt_len, expected_blocks",
    [
        (16, 3),  # exactly 4 full blocks: the last one is left to compute
        (17, 4),  # partial last block: every full block can come from G2
        (19, 4),
        (20, 4),  # 5 full blocks, but only 4 are cached
        (4, 0),  # a single full block: nothing to claim
        (5, 1),
        (1, 0),
        (0, 0),
    ],
)
def test_match_never_claims_whole_prompt(prompt_len, expected_blocks):
    p, pool = make()
    seed(pool, toks(16))  # 4 blocks cached
    tokens = toks(prompt_len)
    p.add_request("r", ROOT)
    n = p.match("r", tokens, 0)
    assert n == expected_blocks * BS
    assert n < max(prompt_len, 1)


def test_match_full_cache_of_exact_prompt_leaves_last_block():
    p, pool = make()
    tokens = toks(32)  # 8 full blocks, all cached
    seed(pool, tokens)
    assert probe(p, tokens) == 7 * BS
    assert probe(p, tokens + [1]) == 8 * BS


def test_match_stops_at_first_miss():
    p, pool = make()
    tokens = toks(33)
    seed(pool, tokens, blocks={0, 1, 3, 4})
    assert probe(p, tokens) == 2 * BS


def test_match_starts_after_num_computed():
    p, pool = make()
    tokens = toks(25)  # 6 full blocks
    # Blocks 0-1 live only on the GPU (vLLM's prefix cache); 2-5 in G2.
    seed(pool, tokens, blocks={2, 3, 4, 5})
    assert probe(p, tokens, 0) == 0
    assert probe(p, tokens, 8) == 4 * BS
    assert probe(p, tokens, 12) == 3 * BS
    assert probe(p, tokens, 24) == 0  # everything computed already
    assert probe(p, tokens, 28) == 0


def test_match_unknown_request_is_zero():
    p, pool = make()
    seed(pool, toks(16))
    assert p.match("nope", toks(17), 0) == 0


def test_match_twice_with_different_num_computed():
    p, pool = make()
    tokens = toks(21)  # 5 full blocks, all in G2
    slots = seed(pool, tokens)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 5 * BS
    # Not scheduled this step; next step vLLM's prefix cache covers 2 blocks.
    assert p.match("r", tokens, 8) == 3 * BS
    blocks = gpu(6)
    p.on_alloc("r", blocks, 3 * BS)
    plan = p.take_plan()
    assert plan.loads == [LoadOp(req_id="r", gpu_blocks=blocks[2:5], parts=[LoadPart("G2", slots[2:5])], sync=True)]
    # And a third call after that is harmless too.
    assert p.match("r", tokens, 20) == 0


def test_match_is_repeatable_and_records_no_pins():
    p, pool = make()
    tokens = toks(13)
    seed(pool, tokens)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 12
    assert p.match("r", tokens, 0) == 12
    assert all(pool.refcount(s) == 0 for s in range(pool.num_slots))
    assert p.take_plan().is_empty()


# ---- loads -------------------------------------------------------------------


def test_g2_loads_are_synchronous_by_default_and_the_mode_is_per_tier():
    tokens = toks(21)
    for sync_load, want_async in ((True, False), (False, True)):
        pool = BlockPool(64, "g2")
        p = Planner([g2(sync_load=sync_load)], BS, indexes={"G2": pool})
        seed(pool, tokens)
        p.add_request("r", ROOT)
        assert p.match("r", tokens, 0) == 5 * BS
        assert p.load_is_async("r") is want_async
        p.on_alloc("r", gpu(6), 5 * BS)
        assert p.take_plan().loads[0].sync is not want_async
    assert make()[0].load_is_async("unknown")  # nothing matched: nothing to load


def test_finished_right_after_a_sync_load_still_waits_for_its_stores():
    """A request can finish in the step that loaded it synchronously (e.g. one output token):
    its GPU blocks must stay with vLLM until that step's stores are reported."""
    p, pool = make()
    tokens = toks(21)
    seed(pool, tokens, blocks={0, 1})
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 2 * BS
    blocks = gpu(6)
    p.on_alloc("r", blocks, 2 * BS)
    p.on_scheduled("r", tokens, blocks, True, len(tokens))
    plan = p.take_plan()
    assert plan.loads[0].sync and plan.store is not None
    assert p.on_finished("r") is True  # keep the blocks: the store still reads them
    p.on_worker_report(stored={plan.store.batch_id: 1}, finished_loads=["r"], released=["r"])
    assert not p.busy


def test_failed_sync_load_lets_the_recomputed_blocks_be_stored():
    p, pool = make()
    tokens = toks(21)
    slots = seed(pool, tokens, blocks={0, 1, 2})
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 3 * BS
    blocks = gpu(6)
    p.on_alloc("r", blocks, 3 * BS)
    p.on_scheduled("r", tokens, blocks, True, len(tokens))
    plan = p.take_plan()
    assert plan.store.slots  # blocks 3, 4 computed this step
    # The worker reports the load failed: the step's store batch dropped, slot 1 unreadable.
    pool.drop(slots[1])
    p.on_worker_report(failed_batches=[plan.store.batch_id], finished_loads=["r"], failed_loads=["r"])
    assert p.stats.failed_loads == 1 and not p.busy
    # vLLM recomputes from the first bad block: those blocks are stored this time.
    p.on_scheduled("r", tokens, None, False, len(tokens))
    again = p.take_plan()
    assert again.store is not None and len(again.store.slots) == 3  # blocks 1, 3, 4 (0 and 2 are still in G2)


def test_on_alloc_without_external_tokens_queues_nothing():
    p, pool = make()
    tokens = toks(13)
    seed(pool, tokens)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 12
    p.on_alloc("r", gpu(4), 0)
    assert p.take_plan().is_empty()
    assert not p.busy
    assert all(pool.refcount(s) == 0 for s in range(pool.num_slots))
    assert p.stats.lookup_requests == 1
    assert p.stats.hit_blocks == 0


def test_on_alloc_queues_load_and_pins_until_finished():
    p, pool = make()
    tokens = toks(30)  # 7 full blocks
    slots = seed(pool, tokens, blocks={2, 3, 4})
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 8) == 3 * BS
    blocks = gpu(8, base=500)
    p.on_alloc("r", blocks, 3 * BS)
    for s in slots:
        assert pool.refcount(s) == 1
        assert s not in pool.lru_order()
    assert p.busy
    plan = p.take_plan()
    assert plan.loads == [LoadOp(req_id="r", gpu_blocks=blocks[2:5], parts=[LoadPart("G2", slots)], sync=True)]
    assert plan.store is None
    assert p.stats.hit_blocks == 3
    assert p.stats.matched_tokens == 12
    # Still pinned after the plan was handed out.
    assert all(pool.refcount(s) == 1 for s in slots)
    p.on_worker_report(finished_loads=["r"])
    assert all(pool.refcount(s) == 0 for s in slots)
    assert not p.busy
    assert p.stats.onboarded_blocks == 3
    # A repeated report is ignored (no double release).
    p.on_worker_report(finished_loads=["r"])
    assert all(pool.refcount(s) == 0 for s in slots)


def test_on_alloc_loads_fewer_blocks_than_matched():
    p, pool = make()
    tokens = toks(21)
    slots = seed(pool, tokens)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 20
    p.on_alloc("r", gpu(6), 8)
    (load,) = p.take_plan().loads
    assert load.slots("G2") == slots[:2]
    assert load.gpu_blocks == gpu(6)[:2]
    assert [pool.refcount(s) for s in slots] == [1, 1, 0, 0, 0]


def test_on_alloc_more_than_matched_is_an_error():
    p, pool = make()
    tokens = toks(13)
    seed(pool, tokens)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 12
    with pytest.raises(RuntimeError, match="kvbm bug"):
        p.on_alloc("r", gpu(4), 16)


def test_load_touches_slots_to_mru():
    p, pool = make(num_slots=8)
    a = seed(pool, toks(9, base=1000))  # older
    b = seed(pool, toks(9, base=2000))
    p.add_request("r", ROOT)
    assert p.match("r", toks(9, base=1000), 0) == 8
    p.on_alloc("r", gpu(3), 8)
    p.on_worker_report(finished_loads=["r"])
    # Released at MRU, chain head most recent so eviction takes tails first.
    assert pool.lru_order() == b + a[::-1]


def test_failed_load_releases_slots():
    p, pool = make()
    tokens = toks(13)
    slots = seed(pool, tokens)
    p.add_request("r", ROOT)
    p.match("r", tokens, 0)
    p.on_alloc("r", gpu(4), 12)
    p.take_plan()
    p.on_worker_report(finished_loads=["r"], failed_loads=["r"])
    assert all(pool.refcount(s) == 0 for s in slots)
    assert p.stats.failed_loads == 1
    assert p.stats.onboarded_blocks == 0
    p.on_finished("r")
    assert_no_leak(p, pool)


# ---- stores ------------------------------------------------------------------


def test_prefill_stores_each_full_block_once():
    p, pool = make()
    tokens = toks(10)  # 2 full blocks + 2 tokens
    blocks = gpu(3)
    plan = prefill(p, "a", tokens, blocks)
    assert plan.store is not None
    assert plan.store.gpu_blocks == blocks[:2]
    assert len(set(plan.store.slots)) == 2
    for h, s in zip(hashes(tokens), plan.store.slots, strict=True):
        assert pool.contains(h)
        assert pool.state(s) is SlotState.PENDING
    assert p.busy
    # Same step count again: nothing new.
    p.on_scheduled("a", tokens, None, False, 10)
    assert p.take_plan().store is None


def test_store_dedup_across_steps():
    p, pool = make()
    tokens = toks(12)
    p.add_request("a", ROOT)
    p.on_scheduled("a", tokens, gpu(3), True, 12)
    first = p.take_plan().store
    assert first.gpu_blocks == gpu(3)
    # vLLM rescheduling the same computed range (or a replay) stores nothing.
    p.on_scheduled("a", tokens, None, False, 12)
    assert p.take_plan().store is None
    p.on_scheduled("a", tokens, None, False, 8)
    assert p.take_plan().store is None


def test_store_dedup_across_requests_sharing_prefix():
    p, pool = make()
    shared = toks(8)
    ta = shared + toks(5, base=50)  # blocks: S0 S1 A2 + 1
    tb = shared + toks(5, base=80)  # blocks: S0 S1 B2 + 1
    pa = prefill(p, "a", ta, gpu(4, base=100))
    assert pa.store.gpu_blocks == [100, 101, 102]
    # Same prefix while a's copies are still in flight: not stored twice.
    pb = prefill(p, "b", tb, gpu(4, base=200))
    assert pb.store.gpu_blocks == [202]
    assert pool.num_used == 4
    # Both in one step: one batch, shared blocks once.
    p2, pool2 = make()
    for rid, t, base in (("a", ta, 100), ("b", tb, 200)):
        p2.add_request(rid, ROOT)
        p2.on_scheduled(rid, t, gpu(4, base=base), True, len(t))
    plan = p2.take_plan()
    assert plan.store.gpu_blocks == [100, 101, 102, 202]
    assert pool2.num_used == 4


def test_store_counts_only_computed_and_known_tokens():
    p, pool = make()
    tokens = toks(16)
    p.add_request("a", ROOT)
    # 6 tokens computed by this step: 1 full block.
    p.on_scheduled("a", tokens, gpu(4), True, 6)
    assert p.take_plan().store.gpu_blocks == [100]
    # 12 computed but only 10 tokens known yet (e.g. speculative slots): 2 blocks.
    p.on_scheduled("a", tokens[:10], None, False, 12)
    assert p.take_plan().store.gpu_blocks == [101]
    # Now tokens are known: block 2.
    p.on_scheduled("a", tokens[:13], None, False, 13)
    assert p.take_plan().store.gpu_blocks == [102]


def test_store_limited_by_gpu_blocks_known():
    p, pool = make()
    tokens = toks(16)
    p.add_request("a", ROOT)
    p.on_scheduled("a", tokens, gpu(2), True, 16)
    assert p.take_plan().store.gpu_blocks == [100, 101]
    p.on_scheduled("a", tokens, [102, 103], False, 16)
    assert p.take_plan().store.gpu_blocks == [102, 103]


def test_chunked_prefill_over_several_steps():
    p, pool = make()
    tokens = toks(27)  # 6 full blocks + 3
    blocks = gpu(7)
    p.add_request("a", ROOT)
    p.match("a", tokens, 0)
    p.on_alloc("a", blocks[:2], 0)
    stored: list[list[int]] = []
    batch_ids = []
    # Chunks of 7 tokens (not block aligned), GPU blocks arrive as needed.
    computed = 0
    given = 0
    first = True
    while computed < len(tokens):
        computed = min(computed + 7, len(tokens))
        need = -(-computed // BS)
        new = blocks[given:need] if not first else blocks[:need]
        p.on_scheduled("a", tokens, new, first, computed)
        given, first = need, False
        plan = p.take_plan()
        if plan.store is not None:
            stored.append(plan.store.gpu_blocks)
            batch_ids.append(plan.store.batch_id)
            confirm(p, plan)
    assert stored == [[100], [101, 102], [103, 104], [105]]
    assert batch_ids == sorted(set(batch_ids))
    assert probe(p, tokens) == 6 * BS
    assert p.stats.offloaded_blocks == 6


def test_decode_steps_fill_a_block():
    p, pool = make()
    tokens = toks(6)
    blocks = gpu(2)
    plan = prefill(p, "a", tokens, blocks)
    assert plan.store.gpu_blocks == [100]
    confirm(p, plan)
    stored_at = []
    for step in range(8):
        tokens.append(900 + step)  # the sampled token; computed next step
        new = [200] if len(tokens) == 9 else None  # third block allocated when needed
        p.on_scheduled("a", tokens, new, False, len(tokens) - 1)
        plan = p.take_plan()
        if plan.store is not None:
            stored_at.append((len(tokens) - 1, plan.store.gpu_blocks))
            confirm(p, plan)
    assert stored_at == [(8, [101]), (12, [200])]


def test_blocks_visible_only_after_worker_report():
    p, pool = make()
    tokens = toks(13)
    plan = prefill(p, "a", tokens, gpu(4))
    assert probe(p, tokens) == 0  # pending: invisible
    p.on_worker_report(stored={plan.store.batch_id + 1: 1})  # other batch: ignored
    assert probe(p, tokens) == 0
    confirm(p, plan)
    assert probe(p, tokens) == 12
    assert p.stats.offloaded_blocks == 3


def test_world_size_two_needs_both_reports():
    p, pool = make(world_size=2)
    tokens = toks(13)
    plan = prefill(p, "a", tokens, gpu(4))
    bid = plan.store.batch_id
    p.on_worker_report(stored={bid: 1})
    assert probe(p, tokens) == 0
    assert p.busy
    p.on_worker_report(stored={bid: 1})
    assert probe(p, tokens) == 12
    # Both in one report works as well.
    plan2 = prefill(p, "b", toks(9, base=70), gpu(3))
    p.on_worker_report(stored={plan2.store.batch_id: 2})
    assert probe(p, toks(9, base=70)) == 8
    assert not p.busy


def test_failed_batch_drops_slots():
    p, pool = make()
    tokens = toks(13)
    plan = prefill(p, "a", tokens, gpu(4))
    assert pool.num_used == 3
    p.on_worker_report(failed_batches=[plan.store.batch_id])
    assert pool.num_used == 0
    assert not any(pool.contains(h) for h in hashes(tokens))
    assert p.stats.failed_stores == 3
    assert not p.busy
    # A late success report for it is ignored.
    p.on_worker_report(stored={plan.store.batch_id: 1})
    assert probe(p, tokens) == 0
    # Another request with the same prompt stores the blocks again.
    plan2 = prefill(p, "b", tokens, gpu(4, base=300))
    assert plan2.store.gpu_blocks == [300, 301, 302]
    confirm(p, plan2)
    assert probe(p, tokens) == 12


def test_failed_on_one_rank_drops_even_if_other_rank_stored():
    p, pool = make(world_size=2)
    tokens = toks(9)
    plan = prefill(p, "a", tokens, gpu(3))
    bid = plan.store.batch_id
    p.on_worker_report(stored={bid: 1})
    p.on_worker_report(failed_batches=[bid])
    assert pool.num_used == 0
    p.on_worker_report(stored={bid: 1})
    assert probe(p, tokens) == 0
    assert not p.busy


def test_empty_store_batch_is_not_sent():
    p, pool = make()
    tokens = toks(13)
    confirm(p, prefill(p, "a", tokens, gpu(4)))
    plan = prefill(p, "b", tokens, gpu(4, base=300))  # all deduplicated
    assert plan.store is None
    assert plan.is_empty()
    assert not p.busy


# ---- finishing -----------------------------------------------------------------


def test_on_finished_waits_for_pending_store():
    p, pool = make()
    plan = prefill(p, "a", toks(9), gpu(3))
    bid = plan.store.batch_id
    assert p.on_finished("a") is True
    nxt = p.take_plan()
    assert nxt.release_after_store == [("a", bid)]
    assert p.busy
    assert p.num_tracked_requests() == 0
    p.on_worker_report(stored={bid: 1})
    assert p.busy  # the worker has not reported the request released yet
    p.on_worker_report(released=["a"])
    assert not p.busy
    assert_no_leak(p, pool)


def test_on_finished_after_stores_confirmed_is_false():
    p, pool = make()
    plan = prefill(p, "a", toks(9), gpu(3))
    confirm(p, plan)
    assert p.on_finished("a") is False
    assert p.take_plan().is_empty()
    assert_no_leak(p, pool)


def test_on_finished_waits_for_last_batch_only_if_pending():
    p, pool = make()
    tokens = toks(16)
    p.add_request("a", ROOT)
    p.on_scheduled("a", tokens, gpu(4), True, 8)
    confirm(p, p.take_plan())
    p.on_scheduled("a", tokens, None, False, 16)
    plan2 = p.take_plan()
    assert p.on_finished("a") is True
    assert p.take_plan().release_after_store == [("a", plan2.store.batch_id)]


def test_on_finished_without_stores_is_false():
    p, pool = make()
    prefill(p, "a", toks(3), gpu(1))  # no full block
    assert p.on_finished("a") is False
    assert p.on_finished("unknown") is False
    assert p.take_plan().is_empty()


def test_on_finished_whose_blocks_another_request_stores_is_false():
    # Request b shares a's prefix; the copies read a's GPU blocks, not b's.
    p, pool = make()
    shared = toks(8)
    prefill(p, "a", shared + [1], gpu(3, base=100))
    plan_b = prefill(p, "b", shared + [2], gpu(3, base=200))
    assert plan_b.store is None
    assert p.on_finished("b") is False
    assert p.on_finished("a") is True


def test_on_finished_with_inflight_load_is_false():
    p, pool = make()
    tokens = toks(13)
    seed(pool, tokens)
    p.add_request("r", ROOT)
    p.match("r", tokens, 0)
    p.on_alloc("r", gpu(4), 12)
    p.take_plan()
    assert p.on_finished("r") is False  # vLLM waits for finished_recving itself
    assert p.take_plan().release_after_store == []


def test_abort_while_loading_releases_everything():
    p, pool = make(num_slots=6)
    tokens = toks(17)
    slots = seed(pool, tokens)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 16
    p.on_alloc("r", gpu(5), 16)
    plan = p.take_plan()
    assert plan.loads[0].slots("G2") == slots
    assert all(pool.refcount(s) == 1 for s in slots)
    assert p.on_finished("r") is False
    assert p.num_tracked_requests() == 0
    assert p.busy
    # Pinned slots survive pressure while the load is still reading them.
    for i in range(10):
        p.add_request(f"x{i}", ROOT)
        p.on_scheduled(f"x{i}", toks(4, base=10_000 * (i + 1)), gpu(1), True, 4)
        pl = p.take_plan()
        if pl.store is not None:
            confirm(p, pl)
        p.on_finished(f"x{i}")
    for h, s in zip(hashes(tokens), slots, strict=True):
        assert pool.ready_slot(h) == s
    p.on_worker_report(finished_loads=["r"])
    assert_no_leak(p, pool)
    assert p.take_plan().is_empty()


# ---- special requests ----------------------------------------------------------


def test_request_without_root_never_matches_nor_stores():
    p, pool = make()
    tokens = toks(13)
    seed(pool, tokens)
    p.add_request("e", None)
    assert p.match("e", tokens, 0) == 0
    p.on_alloc("e", gpu(4), 0)
    p.on_scheduled("e", tokens, gpu(4), True, 13)
    plan = p.take_plan()
    assert plan.store is None
    assert plan.is_empty()
    assert pool.num_used == 3
    assert p.on_finished("e") is False


def test_salted_requests_do_not_share():
    p, pool = make()
    tokens = toks(13)
    salted = request_root(ROOT, cache_salt="tenant-a")
    confirm(p, prefill(p, "a", tokens, gpu(4), root=salted))
    assert probe(p, tokens, root=salted) == 12
    assert probe(p, tokens, root=ROOT) == 0
    assert probe(p, tokens, root=request_root(ROOT, cache_salt="tenant-b")) == 0


# ---- preemption ----------------------------------------------------------------


def test_on_preempted_resets_blocks_and_drains():
    p, pool = make()
    tokens = toks(13)
    p.add_request("a", ROOT)
    p.on_scheduled("a", tokens, gpu(4), True, 8)
    first = p.take_plan()
    assert first.store.gpu_blocks == [100, 101]
    p.on_preempted("a")
    plan = p.take_plan()
    assert plan.drain_stores is True
    assert not plan.is_empty()
    assert p.take_plan().drain_stores is False  # one-shot
    # Resumed with new GPU blocks: stored blocks are not stored again, the
    # rest are read from the new blocks.
    p.on_scheduled("a", tokens, gpu(4, base=700), True, 13)
    plan = p.take_plan()
    assert plan.store.gpu_blocks == [702]
    confirm(p, first)
    confirm(p, plan)
    assert probe(p, tokens) == 12


def test_preempted_then_matched_again_loads_into_new_blocks():
    p, pool = make()
    tokens = toks(13)
    p.add_request("a", ROOT)
    p.on_scheduled("a", tokens, gpu(4), True, 13)
    confirm(p, p.take_plan())
    p.on_preempted("a")
    assert p.take_plan().drain_stores
    assert p.match("a", tokens, 0) == 12
    p.on_alloc("a", gpu(4, base=800), 12)
    (load,) = p.take_plan().loads
    assert load.gpu_blocks == [800, 801, 802]
    p.on_worker_report(finished_loads=["a"])
    p.on_scheduled("a", tokens, gpu(4, base=800), True, 13)
    assert p.take_plan().store is None
    assert p.on_finished("a") is False
    assert_no_leak(p, pool)


# ---- eviction ------------------------------------------------------------------


def test_eviction_when_pool_full_is_lru():
    p, pool = make(num_slots=4)
    ta, tb = toks(9, base=0), toks(9, base=1000)
    confirm(p, prefill(p, "a", ta, gpu(3)))  # 2 blocks, older
    confirm(p, prefill(p, "b", tb, gpu(3)))  # 2 blocks
    assert pool.num_used == 4
    # a is used again (loaded), so b becomes the LRU victim.
    p.add_request("ra", ROOT)
    assert p.match("ra", ta, 0) == 8
    p.on_alloc("ra", gpu(3, base=300), 8)
    p.take_plan()
    p.on_worker_report(finished_loads=["ra"])
    tc = toks(9, base=2000)
    plan = prefill(p, "c", tc, gpu(3, base=400))
    assert plan.store.gpu_blocks == [400, 401]
    confirm(p, plan)
    assert pool.stats.evicted == 2
    assert probe(p, ta) == 8
    assert probe(p, tb) == 0
    assert probe(p, tc) == 8


def test_slots_pinned_by_loads_are_never_evicted():
    p, pool = make(num_slots=4)
    ta = toks(13)  # 3 blocks
    a_slots = seed(pool, ta)
    seed(pool, toks(5, base=1000))  # 1 more block, fills the pool
    p.add_request("r", ROOT)
    assert p.match("r", ta, 0) == 12
    p.on_alloc("r", gpu(4), 12)
    p.take_plan()
    # A 3-block request wants room: only the one unpinned slot can go.
    tc = toks(13, base=5000)
    plan = prefill(p, "c", tc, gpu(4, base=600))
    assert plan.store.gpu_blocks == [600]
    assert pool.stats.evicted == 1
    for h, s in zip(hashes(ta), a_slots, strict=True):
        assert pool.ready_slot(h) == s
        assert pool.refcount(s) == 1
    # Everything else pending/pinned: a further store finds no slot.
    plan = prefill(p, "d", toks(5, base=9000), gpu(2, base=700))
    assert plan.store is None
    # Once the load is reported, its slots become evictable again.
    assert p.on_finished("c") is True
    assert p.on_finished("d") is False
    assert p.on_finished("r") is False  # load still in flight
    p.on_worker_report(stored={p.take_plan().release_after_store[0][1]: 1}, finished_loads=["r"])
    p.on_worker_report(released=["c"])
    assert_no_leak(p, pool)
    # Released at MRU by the load, chain head most recent (tails are evicted first).
    assert pool.lru_order()[-3:] == a_slots[::-1]


def test_blocks_skipped_when_pool_pinned_are_retried():
    p, pool = make(num_slots=4)
    tx = toks(17)  # 4 blocks fill the pool
    seed(pool, tx)
    p.add_request("r", ROOT)
    assert p.match("r", tx, 0) == 16
    p.on_alloc("r", gpu(5), 16)  # every slot pinned by the load
    p.take_plan()
    ta = toks(13, base=3000)
    p.add_request("a", ROOT)
    p.on_scheduled("a", ta, gpu(4, base=100), True, 8)  # blocks 0, 1: no room
    assert p.take_plan().store is None
    p.on_worker_report(finished_loads=["r"])  # room again
    p.on_scheduled("a", ta, None, False, 12)  # block 2 becomes full
    plan = p.take_plan()
    assert plan.store is not None
    confirm(p, plan)
    assert probe(p, ta + [1]) == 12  # blocks 0, 1 and 2 should all be in G2


# ---- busy ----------------------------------------------------------------------


def test_busy_property():
    p, pool = make()
    assert not p.busy
    tokens = toks(13)
    # Pending store.
    plan = prefill(p, "a", tokens, gpu(4))
    assert p.busy
    confirm(p, plan)
    assert not p.busy
    # In-flight load.
    p.add_request("b", ROOT)
    p.match("b", tokens, 0)
    p.on_alloc("b", gpu(4, base=300), 12)
    assert p.busy
    p.take_plan()
    p.on_worker_report(finished_loads=["b"])
    assert not p.busy
    # Awaiting release of a finished request.
    plan = prefill(p, "c", toks(9, base=500), gpu(3, base=400))
    assert p.on_finished("c") is True
    confirm(p, plan)
    assert p.busy
    p.on_worker_report(released=["c"])
    assert not p.busy
    # A plan with work queued but nothing in flight yet is not 'busy' by itself.
    p.on_preempted("b")
    assert not p.busy


def test_full_lifecycle_leaves_no_leaks():
    p, pool = make(num_slots=16)
    prompts = [toks(21, base=0), toks(21, base=0)[:12] + toks(9, base=50), toks(30, base=7000)]
    for round_ in range(3):
        for i, t in enumerate(prompts):
            rid = f"r{round_}-{i}"
            p.add_request(rid, ROOT)
            n = p.match(rid, t, 0)
            blocks = gpu(len(t) // BS + 1, base=1000 * (i + 1))
            p.on_alloc(rid, blocks, n)
            plan = p.take_plan()
            if plan.loads:
                p.on_worker_report(finished_loads=[rid])
            p.on_scheduled(rid, t, blocks, True, len(t))
            plan = p.take_plan()
            if p.on_finished(rid):
                assert plan.store is not None
                assert p.take_plan().release_after_store == [(rid, plan.store.batch_id)]
                confirm(p, plan)
                p.on_worker_report(released=[rid])
            elif plan.store is not None:
                raise AssertionError("finished with a store in flight but not held")
    assert p.num_tracked_requests() == 0
    assert p.stats.onboarded_blocks > 0
    assert_no_leak(p, pool)


def test_cost_rule_recomputes_a_slow_tier_and_counts_it():
    from kvbm.core.cost import OnboardCost

    host, disk = BlockPool(64, "g2"), BlockPool(64, "g3")
    cost = OnboardCost(block_size=BS, block_bytes=1 << 20)
    p = two_tiers(host, disk, cost=cost)
    tokens = toks(41)  # 10 full blocks: 4 in G2, then 6 in G3
    hs = hashes(tokens)
    for pool, idx in ((host, range(4)), (disk, range(4, 10))):
        for i in idx:
            pool.commit(pool.reserve(hs[i]))
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 10 * BS  # nothing measured yet: load it all
    cost.observe_step(10_000, 1.0)
    cost.observe_load("G3", 1e6, 1.0)  # a crawling disk: 1 s per block
    assert p.match("r", tokens, 0) == 4 * BS  # G2 only; G3's blocks are recomputed
    p.on_alloc("r", gpu(11), 4 * BS)
    assert p.stats.cost_skipped_disk_blocks == 6 and p.stats.cost_skipped_host_blocks == 0
    assert p.take_plan().loads[0].slots("G3") == []
    assert all(disk.refcount(s) == 0 for s in range(disk.num_slots))  # nothing pinned in G3


# ---- lazy hashing in match (issue 13 item 3: a cheaper match) -------------------------
def test_a_miss_hashes_only_the_first_window():
    p, _ = make()
    tokens = toks(400 * BS + 1)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 0
    assert len(p._requests["r"].hashes) <= 16  # not the 400 blocks of the prompt
    # ...and the rest is hashed as it is computed, the same chain as hashing at once.
    p.on_alloc("r", gpu(401), 0)
    p.on_scheduled("r", tokens, gpu(401), True, len(tokens))
    assert p._requests["r"].hashes == hashes(tokens)


@pytest.mark.parametrize("host_blocks,disk_blocks", [(0, 0), (15, 0), (16, 0), (41, 30), (0, 70), (47, 152), (199, 0)])
def test_match_across_windows_and_tiers(host_blocks, disk_blocks):
    """G2 run then G3 continuation, ending anywhere relative to the doubling windows."""
    host, disk = BlockPool(400, "g2"), BlockPool(400, "g3")
    p = two_tiers(host, disk)
    tokens = toks(200 * BS + 1)
    seed(host, tokens, blocks=set(range(host_blocks)))
    seed(disk, tokens, blocks=set(range(host_blocks, host_blocks + disk_blocks)) | {150, 151})  # unreachable
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == (host_blocks + disk_blocks) * BS
    p.on_alloc("r", gpu(201), (host_blocks + disk_blocks) * BS)
    plan = p.take_plan()
    if host_blocks + disk_blocks:
        (load,) = plan.loads
        assert len(load.slots("G2")) == host_blocks and len(load.slots("G3")) == disk_blocks
        if disk_blocks:
            assert load.parts[-1].hashes == hashes(tokens)[host_blocks : host_blocks + disk_blocks]
    assert p.stats.lookup_blocks == 200  # blocks asked for, however far hashing went


def test_eagle_hit_drops_its_last_block_like_vllm():
    """With an EAGLE/MTP drafter, vLLM recomputes the last block of its own hit (the drafter's
    KV at that block's last position was written with the next token); the chain's hit ends
    one block before what it holds, so the total hit is the large-pool oracle's."""
    pool = BlockPool(64, "g2")
    p = Planner([g2(64)], BS, indexes={"G2": pool}, drop_last_hit_block=True)
    tokens = toks(33)  # 8 full blocks, all held
    seed(pool, tokens)
    assert probe(p, tokens, 0) == 7 * BS
    # vLLM held blocks 0-3 and dropped block 3: the chain serves 3..6, not 3..7
    assert probe(p, tokens, 12) == 4 * BS
    # nothing beyond what vLLM holds after its drop: no hit
    seed_only = BlockPool(64, "g2")
    q = Planner([g2(64)], BS, indexes={"G2": seed_only}, drop_last_hit_block=True)
    seed(seed_only, tokens, blocks={0, 1, 2, 3})
    assert probe(q, tokens, 12) == 0
    assert probe(q, tokens, 0) == 3 * BS
