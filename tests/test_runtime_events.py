"""The vLLM-free halves of the adapter (kvbm.runtime.events, kvbm.runtime.groups, LeaderRuntime's hit split),
driven with plain values: no vLLM import."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvbm.core.groups import SINGLE_FULL
from kvbm.core.hashing import engine_root, request_root
from kvbm.core.planner import Planner
from kvbm.core.pool import BlockPool
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier
from kvbm.runtime.events import RequestBlocks, TierEvent, TierEventRecorder
from kvbm.runtime.groups import kv_groups
from kvbm.runtime.leader import LeaderRuntime

BS = 4
ROOT = request_root(engine_root("runtime-events-test"))


def test_recorder_emits_neutral_records_with_the_engines_hashes():
    planner = Planner([Tier("G2", HOST, 8)], BS, indexes={"G2": BlockPool(8, "G2")})
    tokens = list(range(10))  # two full blocks
    requests = {"a": RequestBlocks(("h0", "h1"), tokens, 3, "ad")}
    recorder = TierEventRecorder(planner.chain, BS, requests.get, convert=str.upper)
    planner.set_listener(recorder)
    planner.add_request("a", ROOT)
    planner.match("a", tokens, 0)
    planner.on_alloc("a", [0, 1, 2], 0)
    planner.on_scheduled("a", tokens, [0, 1, 2], True, len(tokens))
    planner.on_worker_report(stored={planner.take_plan().store.batch_id: 1})
    assert recorder.take_events() == [
        TierEvent(True, "CPU", ["H0"], None, [0, 1, 2, 3], BS, 3, "ad"),
        TierEvent(True, "CPU", ["H1"], "H0", [4, 5, 6, 7], BS, 3, "ad"),
    ]
    assert recorder.stored == {"G2": 2} and recorder.take_events() == []


def test_requests_the_source_does_not_know_are_not_announced():
    planner = Planner([Tier("G2", HOST, 8)], BS, indexes={"G2": BlockPool(8, "G2")})
    recorder = TierEventRecorder(planner.chain, BS, lambda req_id: None)
    planner.set_listener(recorder)
    planner.add_request("a", ROOT)
    planner.match("a", list(range(8)), 0)
    planner.on_alloc("a", [0, 1], 0)
    planner.on_scheduled("a", list(range(8)), [0, 1], True, 8)
    planner.on_worker_report(stored={planner.take_plan().store.batch_id: 1})
    assert recorder.take_events() == [] and recorder.num_blocks == 0


@pytest.mark.parametrize("media, hit, expected", [
    ({}, 0, {}),
    ({}, 32, {HOST: 32}),  # no load in flight: all host
    ({HOST: 2}, 32, {HOST: 32}),
    ({HOST: 1, DISK: 2}, 10, {HOST: 4, DISK: 6}),  # 3.33 + 6.67: rounding goes to the first medium
    ({HOST: 1, DISK: 1, REMOTE: 1}, 16, {HOST: 6, DISK: 5, REMOTE: 5}),
])
def test_hit_tokens_by_medium_add_up_to_the_hit(media, hit, expected):
    runtime = SimpleNamespace(load_media=lambda req_id: dict(media))
    split = LeaderRuntime.hit_tokens_by_medium(runtime, "r", hit)
    assert split == expected and sum(split.values()) == hit


class FullAttentionSpec:
    block_size = BS


class SlidingWindowSpec:
    block_size = BS
    sliding_window = 9


class MambaSpec:
    block_size = BS
    mamba_cache_mode = "none"


def test_groups_by_spec_class_name():
    assert kv_groups([FullAttentionSpec()], [["l0"]], BS) == SINGLE_FULL
    groups = kv_groups([FullAttentionSpec(), SlidingWindowSpec()], [["l0"], ["l1"]], BS)
    assert [g.window_blocks for g in groups] == [None, 3]
    with pytest.raises(ValueError, match=r"group 1 of this model \(l1, l2, l3 and 1 more\) is MambaSpec"):
        kv_groups([FullAttentionSpec(), MambaSpec()], [["l0"], ["l1", "l2", "l3", "l4"]], BS)


def test_finished_loads_reach_the_planner_in_the_order_vllm_reported_them():
    """Releasing a finished load's slots orders the LRU (hence later evictions): in the order vLLM
    reported the loads, not a set's order, which changes with the interpreter's hash seed."""
    from kvbm.config import KvbmConfig
    from kvbm.core.plan import WorkerReport
    from kvbm.runtime.leader import EngineInfo
    from kvbm.runtime.sizing import TierPlan, TierSizes

    cfg = KvbmConfig()
    engine = EngineInfo(block_size=BS, world_size=1, engine_id=None, block_bytes=1024, gpu_blocks=16,
                        storage_key="k", max_num_batched_tokens=64)
    runtime = LeaderRuntime(cfg, TierPlan.configured(cfg, TierSizes(8, 0, 1024)), engine, identity="order-test")
    seen: list[list[str]] = []
    runtime.apply = lambda report, finished, failed, released: seen.append(list(finished))  # type: ignore[method-assign]
    report = WorkerReport()
    report.sync_loaded.update({"r7": 1, "r2": 1, "r30": 1})
    runtime.workers_reported(report, ["r9", "r1", "r5", "r12"], (), ())
    runtime.close()
    assert seen == [["r9", "r1", "r5", "r12", "r7", "r2", "r30"]]
