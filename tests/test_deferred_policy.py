"""The spill policy deferred (Planner.defer_policy, run by LeaderRuntime on a thread of its own
while the engine runs the step): the same spills as deciding at once, a step later; never a
block that left its slot meanwhile; and the leader never lets the planner see two threads."""

from __future__ import annotations

import threading
import time

from kvbm.config import KvbmConfig
from kvbm.core.hashing import engine_root
from kvbm.core.planner import Planner, StepPlan
from kvbm.core.pool import BlockPool
from kvbm.core.tiers import DISK, HOST, Tier
from kvbm.runtime.leader import EngineInfo, LeaderRuntime
from kvbm.runtime.sizing import TierPlan, TierSizes

BS = 4
ROOT = engine_root("deferred-policy-test|bs=4")


def planner(host_slots: int = 16, defer: bool = False) -> tuple[Planner, BlockPool, BlockPool]:
    host, disk = BlockPool(host_slots, "G2"), BlockPool(64, "G3")
    p = Planner([Tier("G2", HOST, host_slots, sync_load=True), Tier("G3", DISK, 64)], BS,
                indexes={"G2": host, "G3": disk})
    p.defer_policy = defer
    return p, host, disk


def stored(p: Planner, rid: str, base: int, blocks: int) -> StepPlan:
    """A request computes ``blocks`` full blocks in one step; the workers report the store."""
    tokens = list(range(base, base + blocks * BS + 1))
    gpu = list(range(100 + base, 100 + base + blocks + 1))
    p.add_request(rid, ROOT)
    p.match(rid, tokens, 0)
    p.on_alloc(rid, gpu, 0)
    p.on_scheduled(rid, tokens, gpu, True, len(tokens))
    plan = p.take_plan()
    assert plan.store is not None
    p.on_worker_report(stored={plan.store.batch_id: 1})
    return plan


def spills(plan: StepPlan) -> list[tuple[list[int], list[int], list[bytes]]]:
    return [(s.src_slots, s.dst_slots, s.hashes) for s in plan.spills]


def test_deferred_spills_equal_deciding_at_once_a_step_later():
    now, now_host, _ = planner()
    later, later_host, _ = planner(defer=True)
    for p in (now, later):
        stored(p, "r", 0, 6)
    decided = now.take_plan()
    assert later.has_deferred and later.take_plan().spills == []  # not decided yet
    later.run_deferred()
    assert not later.has_deferred
    assert spills(later.take_plan()) == spills(decided) and len(decided.spills[0].hashes) == 6
    assert [now_host.refcount(s) for s in range(16)] == [later_host.refcount(s) for s in range(16)]  # sources pinned


def test_a_committed_batch_stays_for_its_decision():
    """G2 holds 4 blocks, all of the first request's batch: pinned until the deferred policy has
    decided, the next request's store cannot evict them first (that store is dropped, as with a
    G2 full of pinned blocks); the spills then hold them until they are written."""
    p, host, disk = planner(host_slots=4, defer=True)
    first = stored(p, "a", 0, 4)
    p.take_plan()
    assert [host.refcount(s) for s in range(4)] == [1] * 4
    tokens = list(range(1000, 1000 + 4 * BS + 1))
    p.add_request("b", ROOT)
    p.match("b", tokens, 0)
    p.on_alloc("b", list(range(200, 205)), 0)
    p.on_scheduled("b", tokens, list(range(200, 205)), True, len(tokens))
    assert p.take_plan().store is None  # nothing evictable in G2
    p.run_deferred()
    plan = p.take_plan()
    assert sorted(plan.spills[0].src_slots) == sorted(first.store.slots) and len(plan.spills[0].hashes) == 4
    assert [host.refcount(s) for s in range(4)] == [1] * 4  # now the spill's
    p.on_worker_report(stored={plan.spills[0].batch_id: 1})
    # the spill's commit goes with the policy too: its blocks stay visible in G2 (pinned) meanwhile
    assert disk.match_prefix(plan.spills[0].hashes) == [] and [host.refcount(s) for s in range(4)] == [1] * 4
    p.run_deferred()
    assert len(disk.match_prefix(plan.spills[0].hashes)) == 4
    assert [host.refcount(s) for s in range(4)] == [0] * 4 and disk.num_used == 4


def test_a_block_dropped_before_the_decision_is_not_spilled():
    p, host, disk = planner(host_slots=8, defer=True)
    first = stored(p, "a", 0, 4)
    p.take_plan()
    bad = first.store.slots[1]
    p.on_worker_report(bad_slots={"G2": [bad]})
    p.run_deferred()
    plan = p.take_plan()
    assert sorted(plan.spills[0].src_slots) == sorted(s for s in first.store.slots if s != bad)
    p.on_worker_report(stored={plan.spills[0].batch_id: 1})
    p.run_deferred()
    assert all(host.refcount(s) == 0 for s in range(8)) and bad in host._free and disk.num_used == 3


def runtime(policy_thread: bool = True) -> LeaderRuntime:
    cfg = KvbmConfig()
    engine = EngineInfo(block_size=BS, world_size=1, engine_id=None, block_bytes=1024, gpu_blocks=64,
                        storage_key="k", max_num_batched_tokens=256)
    return LeaderRuntime(cfg, TierPlan.configured(cfg, TierSizes(16, 64, 1024)), engine, identity="deferred",
                         policy_thread=policy_thread)


def test_the_leader_runs_the_policy_on_its_thread_and_waits_for_it_before_any_other_call():
    rt = runtime()
    try:
        assert rt.planner.defer_policy
        ran: list[str] = []
        real = rt.planner.run_deferred

        def slow(pause=None):
            time.sleep(0.2)  # longer than the calls below take: they must wait for it
            real(pause)
            ran.append(threading.current_thread().name)

        rt.planner.run_deferred = slow  # type: ignore[method-assign]
        rt.add_request("r", ROOT)
        rt.planner._deferred.append((lambda: None, ()))
        rt.end_step()
        assert ran == []  # end_step handed the plan out without waiting
        rt.match("r", list(range(9)), 0)
        assert len(ran) == 1 and ran[0].startswith("kvbm-spill-policy")
    finally:
        rt.close()


def test_without_the_thread_or_a_second_tier_the_policy_runs_inside_the_calls():
    for rt in (runtime(policy_thread=False), LeaderRuntime(
            KvbmConfig(), TierPlan.configured(KvbmConfig(), TierSizes(16, 0, 1024)),
            EngineInfo(block_size=BS, world_size=1, engine_id=None, block_bytes=1024, gpu_blocks=64,
                       storage_key="k", max_num_batched_tokens=256), identity="g2-only")):
        try:
            assert not rt.planner.defer_policy and rt._policy is None
        finally:
            rt.close()
