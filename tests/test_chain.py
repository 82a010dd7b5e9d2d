"""A tier chain of three, the third a tier kvbm has never heard of (an in-memory dict).

Proves that a new tier is data: the planner, the plan runner and the transfer
executor are used as they are, with a chain G2 (host) -> G3 (disk) -> G9
(the tests' own medium), first through the planner alone, then end to end
on CPU (real bytes through the torch copy engine, a real disk file and the
dict), no vLLM.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvbm.core.cost import OnboardCost
from kvbm.core.hashing import engine_root, extend_hashes
from kvbm.core.planner import Planner, StepPlan
from kvbm.core.pool import BlockPool
from kvbm.core.tiers import DISK, HOST, Tier
from kvbm.storage.disk import DiskArena
from kvbm.storage.host import HostArena
from kvbm.transfer.executor import TransferExecutor
from kvbm.transfer.layout import describe_kv_caches
from kvbm.transfer.media import DiskMedium
from kvbm.transfer.runner import PlanRunner
from tests.test_executor import DictMedium

BS = 4
ROOT = engine_root("chain-test")
MEM = "mem"  # the third tier's medium: nothing in kvbm knows this word


def chain(g2: int = 8, g3: int = 8, g9: int = 8, g9_filter: int | None = None, g9_sync: bool = False) -> list[Tier]:
    return [Tier("G2", HOST, g2, sync_load=True), Tier("G3", DISK, g3),
            Tier("G9", MEM, g9, filter_threshold=g9_filter, sync_load=g9_sync)]


def toks(n: int, base: int = 0) -> list[int]:
    return list(range(base, base + n))


def hashes(tokens) -> list[bytes]:
    return extend_hashes([], tokens, BS, ROOT)


def complete(p: Planner, plan: StepPlan | None = None) -> None:
    """Report every copy of the plan done, as healthy workers would, until nothing is left."""
    plan = plan or p.take_plan()
    while not plan.is_empty():
        stored = {s.batch_id: p.world_size for s in plan.spills}
        if plan.store is not None:
            stored[plan.store.batch_id] = p.world_size
        p.on_worker_report(stored=stored, finished_loads=[op.req_id for op in plan.loads])
        plan = p.take_plan()


def prefill(p: Planner, rid: str, tokens) -> StepPlan:
    p.add_request(rid, ROOT)
    p.match(rid, tokens, 0)
    p.on_alloc(rid, [], 0)
    p.on_scheduled(rid, tokens, toks(len(tokens) // BS + 1, 100), True, len(tokens))
    return p.take_plan()


def seed(pool, hs, blocks) -> list[int]:
    slots = []
    for b in blocks:
        slots.append(pool.reserve(hs[b]))
        pool.commit(slots[-1])
    return slots


# ---- the planner alone ---------------------------------------------------------------


def test_blocks_travel_down_the_whole_chain():
    p = Planner(chain(), BS)
    plan = prefill(p, "a", toks(13))  # 3 full blocks
    assert plan.store.tier == "G2" and plan.store.hashes == []  # host rows carry no hash
    p.on_worker_report(stored={plan.store.batch_id: 1})
    (spill,) = p.take_plan().spills
    assert (spill.src, spill.dst, len(spill.dst_slots)) == ("G2", "G3", 3)
    assert all(p.index("G2").refcount(s) == 1 for s in spill.src_slots)  # read by the copy: pinned
    p.on_worker_report(stored={spill.batch_id: 1})
    assert all(p.index("G2").refcount(s) == 0 for s in spill.src_slots)
    (spill,) = p.take_plan().spills
    assert (spill.src, spill.dst) == ("G3", "G9") and spill.hashes == hashes(toks(13))
    p.on_worker_report(stored={spill.batch_id: 1})
    assert [p.stats.tier(t).spilled_blocks for t in ("G2", "G3", "G9")] == [0, 3, 3]
    assert p.stats.tier("G2").stored_blocks == 3 and not p.busy
    assert p.take_plan().is_empty()


def test_a_prefix_is_matched_across_three_tiers_in_order():
    p = Planner(chain(g2=16, g3=16, g9=16), BS)
    tokens = toks(29)  # 7 full blocks: 2 in G2, 2 in G3, 3 in G9
    hs = hashes(tokens)
    s2 = seed(p.index("G2"), hs, [0, 1])
    s3 = seed(p.index("G3"), hs, [2, 3])
    s9 = seed(p.index("G9"), hs, [4, 5, 6, 1])  # block 1 also in G9: the G2 run comes first
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 7 * BS
    assert p.load_is_async("r")  # G9 loads asynchronously
    p.on_alloc("r", toks(8, 50), 7 * BS)
    (op,) = p.take_plan().loads
    assert [(part.tier, part.slots) for part in op.parts] == [("G2", s2), ("G3", s3), ("G9", s9[:3])]
    assert op.parts[0].hashes == [] and op.parts[2].hashes == hs[4:7]
    assert op.gpu_blocks == toks(7, 50) and not op.sync
    assert p.load_sources("r") == {"G2": 2, "G3": 2, "G9": 3}
    assert [p.stats.tier(t).hit_blocks for t in ("G2", "G3", "G9")] == [2, 2, 3]
    p.on_worker_report(finished_loads=["r"])
    assert p.stats.onboarded_blocks == 7 and not p.busy


def test_the_third_tier_filter_and_sightings():
    """G9 admits blocks seen twice: a G2 hit is a sighting, carried from the deepest tier holding it."""
    p = Planner(chain(g9_filter=2), BS)
    tokens = toks(9)  # 2 blocks
    complete(p, prefill(p, "a", tokens))  # G2, then G3; G9 refuses (seen once)
    assert p.index("G9").num_used == 0 and p.stats.filter_rejections == 2
    p.on_finished("a")
    p.add_request("b", ROOT)
    assert p.match("b", tokens, 0) == 2 * BS
    p.on_alloc("b", [7, 8, 9], 2 * BS)  # a G2 hit: the second sighting
    plan = p.take_plan()
    (spill,) = plan.spills
    assert (spill.src, spill.dst, spill.hashes) == ("G3", "G9", hashes(tokens))
    complete(p, plan)
    assert p.index("G9").num_used == 2 and p.stats.tier("G9").spilled_blocks == 2


def test_a_loaded_block_is_one_sighting_not_two():
    """A hit is one sighting (in on_alloc); the step that runs the request then finds the loaded
    blocks READY in G2 but does not count them again: they were loaded, not computed again. A
    block the same request computes again after a preemption is a sighting."""
    p = Planner(chain(g9_filter=2), BS)
    tokens = toks(9)  # 2 blocks
    complete(p, prefill(p, "a", tokens))
    p.on_finished("a")
    hs = hashes(tokens)
    assert p.filter.frequencies(hs) == [1, 1]
    p.add_request("b", ROOT)
    assert p.match("b", tokens, 0) == 2 * BS
    p.on_alloc("b", [7, 8, 9], 2 * BS)
    assert p.filter.frequencies(hs) == [2, 2]
    p.on_scheduled("b", tokens, [7, 8, 9], True, len(tokens))
    assert p.filter.frequencies(hs) == [2, 2]  # before: [4, 4] (a doubling filter counted the load twice)
    p.on_preempted("b")
    p.on_scheduled("b", tokens, [10, 11, 12], True, len(tokens))  # recomputed: a sighting
    assert p.filter.frequencies(hs) == [4, 4]


def test_a_failed_spill_into_the_third_tier_frees_both_ends():
    p = Planner(chain(), BS)
    plan = prefill(p, "a", toks(9))
    p.on_worker_report(stored={plan.store.batch_id: 1})
    p.on_worker_report(stored={p.take_plan().spills[0].batch_id: 1})  # G2 -> G3
    (spill,) = p.take_plan().spills  # G3 -> G9: fails
    p.on_worker_report(failed_batches=[spill.batch_id])
    assert p.index("G9").num_used == 0 and p.stats.failed_stores == 2
    assert all(p.index("G3").refcount(s) == 0 for s in spill.src_slots)
    assert not p.busy


def test_bad_blocks_of_the_third_tier_are_dropped_and_recomputed():
    p = Planner(chain(g2=2, g3=2), BS)
    tokens = toks(13)
    hs = hashes(tokens)
    slots = seed(p.index("G9"), hs, [0, 1, 2])
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 3 * BS
    p.on_alloc("r", [1, 2, 3, 4], 3 * BS)
    p.take_plan()
    p.on_worker_report(finished_loads=["r"], failed_loads=["r"], bad_slots={"G9": [slots[1]]})
    assert p.stats.tier("G9").bad_blocks == 1 and p.stats.failed_loads == 1
    assert p.index("G9").ready_slot(hs[1]) is None and p.index("G9").ready_slot(hs[0]) == slots[0]


def test_the_cost_rule_runs_per_tier_of_the_chain():
    cost = OnboardCost(block_size=BS, block_bytes=1 << 20)
    p = Planner(chain(g2=16, g3=16, g9=16), BS, cost=cost)
    tokens = toks(25)  # 6 blocks: 2 per tier
    hs = hashes(tokens)
    for tier, blocks in (("G2", [0, 1]), ("G3", [2, 3]), ("G9", [4, 5])):
        seed(p.index(tier), hs, blocks)
    cost.observe_step(10_000, 1.0)
    cost.observe_load("G9", 1e6, 1.0)  # a crawling third tier
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 4 * BS  # G2 and G3 load, G9's part is recomputed
    p.on_alloc("r", toks(7), 4 * BS)
    assert p.stats.tier("G9").cost_skipped_blocks == 2
    assert [part.tier for part in p.take_plan().loads[0].parts] == ["G2", "G3"]


class SharedIndex:
    """A G4-like index: hash-addressed, shared (nothing to pin), answering a whole prefix per call."""

    def __init__(self) -> None:
        self.name, self.num_slots, self.version = "G4", 0, 0
        self.stats = BlockPool(1).stats
        self.keys: dict[bytes, int] = {}
        self.calls: list[tuple[int, int | None]] = []

    def match_prefix(self, hashes, start=0, stop=None):
        self.calls.append((start, stop))
        out = []
        for h in hashes[start:stop]:
            if h not in self.keys:
                break
            out.append(self.keys[h])
        return out

    def ready_slot(self, h):
        return self.keys.get(h)

    def contains(self, h):
        return h in self.keys

    def reserve(self, h):
        return None if h in self.keys else len(self.keys)

    def commit(self, slot): ...
    def commit_many(self, slots): ...
    def drop(self, slot): ...
    def acquire(self, slots): ...
    def release(self, slots): ...
    def touch(self, slots): ...
    def restore(self, entries): return 0

    @property
    def num_used(self):
        return len(self.keys)


def test_a_shared_tier_is_asked_once_for_the_rest_of_the_prompt():
    g4 = SharedIndex()
    tiers = [Tier("G2", HOST, 8, sync_load=True), Tier("G4", "remote", 0, shared=True)]
    p = Planner(tiers, BS, indexes={"G4": g4})
    tokens = toks(200 * BS + 1)
    hs = hashes(tokens)
    g4.keys = {h: i for i, h in enumerate(hs[:150])}
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 150 * BS
    assert g4.calls == [(0, 200)]  # one lookup to the end of the prompt, not one per window


# ---- end to end on CPU: planner -> plan -> runner -> executor -> report -> planner -------


BLOCK_BYTES = 2 * (2 * BS * 8) * 4  # 2 layers of [2, BS, 8] float32


class Rank:
    """One worker rank's side, driven as vLLM drives it, with a fake forward pass."""

    NUM_BLOCKS = 64

    def __init__(self, tmp_path) -> None:
        self.cache = {f"layer.{i}": torch.zeros((self.NUM_BLOCKS, 2, BS, 8), dtype=torch.float32) for i in range(2)}
        layout, views = describe_kv_caches(self.cache, self.NUM_BLOCKS)
        self.g9 = DictMedium()
        disk = DiskMedium(DiskArena(str(tmp_path / "g3"), 2, layout.block_bytes, file_tag="chain"),
                          delete_on_close=True)
        executor = TransferExecutor(layout, views, host=HostArena(2, layout.block_bytes, pin=False),
                                    media={"G3": disk, "G9": self.g9})
        self.runner = PlanRunner(executor, CAPACITIES)

    def compute(self, gpu_block: int, token_block: list[int]) -> None:
        for t in self.cache.values():
            t[gpu_block] = torch.tensor(token_block, dtype=torch.float32).sum() + torch.arange(t[0].numel()).view(
                t[0].shape)

    def kv(self, gpu_block: int) -> list[torch.Tensor]:
        return [t[gpu_block].clone() for t in self.cache.values()]


def step(p: Planner, rank: Rank, computed: dict[int, list[int]] | None = None) -> tuple[set, set, set]:
    """One engine step as vLLM runs it (one rank); returns what vLLM hears: (finished sending,
    finished receiving, failed receiving). As kvbm's leader does, in-step loads count as
    finished for the planner once reported, and failures once finished."""
    plan = p.take_plan()
    rank.runner.check(CAPACITIES)
    rank.runner.start_step(plan)
    for gpu_block, token_block in (computed or {}).items():  # the forward pass
        rank.compute(gpu_block, token_block)
    rank.runner.store(plan)
    released, finished, failed = rank.runner.results()
    report = rank.runner.take_report()
    if report is not None:
        done = finished | set(report.sync_loaded)
        p.on_worker_report(report.stored, report.failed_batches, done, (failed | report.failed_loads) & done,
                           released, report.bad_slots)
    return released, finished, failed


def settle(p: Planner, rank: Rank) -> None:
    for _ in range(400):
        step(p, rank)
        if not p.busy and p._plan.is_empty():
            return
        time.sleep(0.005)
    raise AssertionError("kvbm never settled")


CAPACITIES = {"G2": 2, "G3": 2, "G9": 8}


def small_chain(g9_sync: bool = False) -> list[Tier]:
    return [Tier("G2", HOST, 2, sync_load=True), Tier("G3", DISK, 2), Tier("G9", MEM, 8, sync_load=g9_sync)]


def through_the_handshake(tmp_path) -> tuple[Planner, Rank]:
    """The chain as a server builds it: the leader's handshake sends it (G9 included) to the
    rank, which builds each tier's storage from the table of media, "mem" added by this test."""
    import uuid

    from kvbm.config import load_config
    from kvbm.runtime.handshake import LeaderHandshake
    from kvbm.runtime.sizing import configured_chain
    from kvbm.runtime.worker import MEDIA, RankInfo, WorkerRuntime

    cfg = load_config({"cpu_cache_override_num_blocks": 2, "disk_cache_override_num_blocks": 2,
                       "disk_cache_dir": str(tmp_path / "g3"), "disable_disk_offload_filter": True,
                       "leader_worker_init_timeout_secs": 60}, environ={})
    rank = Rank.__new__(Rank)
    rank.cache = {f"layer.{i}": torch.zeros((Rank.NUM_BLOCKS, 2, BS, 8), dtype=torch.float32) for i in range(2)}
    rank.g9 = DictMedium()
    engine_id = str(uuid.uuid4())
    worker = WorkerRuntime(cfg, RankInfo(0, 1, engine_id, "chain-test", Rank.NUM_BLOCKS),
                           media={**MEDIA, MEM: lambda ctx, tier: rank.g9})
    worker.register_kv_caches(rank.cache)
    joined = LeaderHandshake(cfg, 1, engine_id, chain_of=lambda sizes: (
        *configured_chain(cfg, sizes), Tier("G9", MEM, 8))).start().wait()
    rank.runner = worker.runner
    assert joined.plan.chain == tuple(small_chain())
    return Planner(joined.plan.chain, BS), rank


@pytest.mark.parametrize("built", ["directly", "through the handshake"])
def test_end_to_end_a_prefix_comes_back_from_the_third_tier(tmp_path, built):
    if built == "directly":
        rank, p = Rank(tmp_path), Planner(small_chain(), BS)
    else:
        p, rank = through_the_handshake(tmp_path)
    a = toks(4 * BS + 1)  # 4 full blocks: more than G2 and G3 hold together at the end
    p.add_request("a", ROOT)
    assert p.match("a", a, 0) == 0
    p.on_alloc("a", [], 0)
    gpu_a = [10, 11, 12, 13, 14]
    for i in range(4):  # one block per step (decode-like), so the small tiers keep up
        p.on_scheduled("a", a, gpu_a if i == 0 else None, i == 0, (i + 1) * BS)
        step(p, rank, {gpu_a[i]: a[i * BS : (i + 1) * BS]})
        settle(p, rank)
    p.on_finished("a")
    settle(p, rank)
    want = [rank.kv(b) for b in gpu_a[:4]]
    assert len(rank.g9.blocks) == 4  # every block reached the third tier
    assert p.index("G2").num_used == 2 and p.index("G3").num_used == 2
    # b asks for the same prefix: G2 and G3 lost its head to eviction, G9 holds it all.
    p.add_request("b", ROOT)
    matched = p.match("b", a, 0)
    assert matched == 4 * BS
    p.on_alloc("b", [30, 31, 32, 33, 34], matched)
    assert {k: v for k, v in p.load_sources("b").items() if v} == {"G9": 4}
    finished: set = set()
    for _ in range(400):
        finished |= step(p, rank)[1]
        if "b" in finished:
            break
        time.sleep(0.005)
    assert "b" in finished
    for i, b in enumerate([30, 31, 32, 33]):
        assert all(torch.equal(x, y) for x, y in zip(rank.kv(b), want[i])), i
    assert p.stats.tier("G9").loaded_blocks == 4 and p.stats.failed_loads == 0
    settle(p, rank)
    rank.runner.close()


def test_end_to_end_a_lost_third_tier_block_is_recomputed(tmp_path):
    rank = Rank(tmp_path)
    p = Planner(small_chain(), BS)
    tokens = toks(3 * BS + 1)
    hs = hashes(tokens)
    seed(p.index("G9"), hs, [0, 1, 2])
    for b in range(2):  # block 2 was never really written: the medium lost it
        rank.g9.blocks[hs[b]] = bytes(BLOCK_BYTES)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 3 * BS
    p.on_alloc("r", [5, 6, 7, 8], 3 * BS)
    finished: set = set()
    for _ in range(400):
        _, done, failed = step(p, rank)
        finished |= done
        if "r" in finished:
            break
        time.sleep(0.005)
    assert failed == {"r"} and rank.runner.load_error_blocks() == {7}  # recompute from the lost block
    assert p.stats.tier("G9").bad_blocks == 1 and p.index("G9").ready_slot(hs[2]) is None
    rank.runner.close()


@pytest.mark.parametrize("sync", [True, False])
def test_end_to_end_load_mode_follows_the_tier(tmp_path, sync):
    rank = Rank(tmp_path)
    p = Planner(small_chain(g9_sync=sync), BS)
    tokens = toks(BS + 1)
    seed(p.index("G9"), hashes(tokens), [0])
    rank.g9.blocks[hashes(tokens)[0]] = bytes(BLOCK_BYTES)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == BS
    assert p.load_is_async("r") is not sync
    p.on_alloc("r", [3, 4], BS)
    _, finished, _ = step(p, rank)
    if sync:  # landed inside the step; vLLM is not told (it does not track in-step loads)
        assert finished == set() and not p.busy
    else:
        settle(p, rank)
    assert p.stats.tier("G9").loaded_blocks == 1
    rank.runner.close()
