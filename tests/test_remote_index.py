"""G4's index (RemoteIndex) under the planner, on a fake store; and G4 in the leader's runtime
against a real redis-server (the chain it builds, a clear error when Redis is unreachable, a
stalled Redis that never holds a scheduler step)."""

from __future__ import annotations

import threading
import time

import pytest

from kvbm.config import ConfigError, KvbmConfig, parse_remote_url
from kvbm.core.planner import Planner
from kvbm.core.tiers import HOST, REMOTE, Tier, standard_chain
from kvbm.runtime.sizing import TierPlan, TierSizes
from kvbm.storage.remote_index import RemoteIndex, remote_key
from tests.test_chain import BS, ROOT, complete, hashes, prefill, toks


class FakeStore:
    """What RemoteIndex needs of a RemoteStore: blocks other servers stored, and a count of round trips."""

    def __init__(self, blocks=(), fail: bool = False) -> None:
        self.blocks = set(blocks)
        self.lookups = 0
        self.fail = fail

    def contains_prefix(self, hs) -> int:
        self.lookups += 1
        if self.fail:
            raise RuntimeError("boom")
        return next((i for i, h in enumerate(hs) if h not in self.blocks), len(hs))


class GatedStore(FakeStore):
    """A FakeStore whose answers wait for ``gate``: a Redis that stalls until it is let go."""

    def __init__(self, blocks=()) -> None:
        super().__init__(blocks)
        self.gate = threading.Event()

    def contains_prefix(self, hs) -> int:
        self.gate.wait(30)
        return super().contains_prefix(hs)


def g2_g4(store: FakeStore, g2: int = 8, g4_filter: int | None = None, **index) -> Planner:
    chain = [Tier("G2", HOST, g2, sync_load=True), Tier("G4", REMOTE, 0, filter_threshold=g4_filter, shared=True)]
    return Planner(chain, BS, indexes={"G4": RemoteIndex(store, **index)})


def until_known(p: Planner, rid: str, tokens, timeout: float = 30.0) -> int:
    """Ask as vLLM does, a step at a time, until the answer is known (never forever)."""
    deadline = time.monotonic() + timeout
    while True:
        p.index("G4").begin_step()
        answer = p.match(rid, tokens, 0)
        if answer is not None:
            return answer
        assert time.monotonic() < deadline, "the G4 answer never came"
        time.sleep(0.01)


def test_standard_chain_puts_g4_last_and_shared():
    chain = standard_chain(8, 16, remote=True, remote_filter_threshold=3)
    assert [(t.name, t.medium, t.shared, t.filter_threshold, t.sync_load) for t in chain][-1] == \
        ("G4", REMOTE, True, 3, False)
    (alone,) = standard_chain(0, 0, remote=True)
    assert alone.filter_threshold is None  # the first tier gets every block written through


def test_one_round_trip_for_the_rest_of_a_prompt_and_none_for_repeated_asks():
    tokens = toks(4 * 40 + 1)  # 40 full blocks: more than the planner's first hashing window
    store = FakeStore(hashes(tokens))
    p = g2_g4(store)
    p.add_request("r", ROOT)
    for _ in range(5):  # vLLM asks again at every step while the request waits
        assert p.match("r", tokens, 0) == 40 * BS
    assert store.lookups == 1
    p.on_alloc("r", toks(41, 100), 40 * BS)
    (op,) = p.take_plan().loads
    (part,) = op.parts
    assert part.tier == "G4" and part.hashes == hashes(tokens) and not op.sync
    p.add_request("s", ROOT)  # another request for the same prefix, within the cache's life
    assert p.match("s", tokens, 0) == 40 * BS and store.lookups == 1


def test_g2_run_first_then_g4_continues_it():
    tokens = toks(4 * 6 + 1)
    hs = hashes(tokens)
    store = FakeStore(hs)  # other servers hold the whole prompt
    p = g2_g4(store)
    for b in (0, 1):
        p.index("G2").commit(p.index("G2").reserve(hs[b]))
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 6 * BS
    p.on_alloc("r", toks(7, 100), 6 * BS)
    (op,) = p.take_plan().loads
    assert [(part.tier, len(part.slots)) for part in op.parts] == [("G2", 2), ("G4", 4)]
    assert op.parts[1].hashes == hs[2:6]
    p.on_worker_report(finished_loads=["r"])
    assert p.stats.tier("G4").loaded_blocks == 4 and not p.busy


def test_blocks_spill_to_g4_once_and_never_over_another_servers_blocks():
    tokens = toks(4 * 3 + 1)
    hs = hashes(tokens)
    store = FakeStore([hs[0]])  # another server stored block 0 (this server saw it in a lookup)
    p = g2_g4(store)
    plan = prefill(p, "a", tokens)
    p.on_worker_report(stored={plan.store.batch_id: 1})
    (spill,) = p.take_plan().spills
    assert (spill.src, spill.dst, spill.hashes) == ("G2", "G4", hs[1:3])  # block 0 is known in G4
    p.on_worker_report(stored={spill.batch_id: 1})
    assert p.index("G4").contains(hs[1]) and p.stats.tier("G4").spilled_blocks == 2
    plan = prefill(p, "b", tokens)  # computed again: nothing is stored twice
    complete(p, plan)
    assert p.stats.tier("G4").spilled_blocks == 2


def test_g4_filter_admits_only_repeated_blocks():
    tokens = toks(4 * 2 + 1)
    p = g2_g4(FakeStore(), g2=2, g4_filter=2)
    complete(p, prefill(p, "a", tokens))
    assert p.stats.tier("G4").spilled_blocks == 0 and p.stats.filter_rejections == 2
    p.add_request("b", ROOT)
    assert p.match("b", tokens, 0) == 2 * BS  # a G2 hit: a second sighting
    p.on_alloc("b", toks(3, 100), 2 * BS)
    complete(p)
    assert p.stats.tier("G4").spilled_blocks == 2


def test_a_block_evicted_before_its_load_is_a_failed_load_and_asked_again():
    tokens = toks(4 * 3 + 1)
    hs = hashes(tokens)
    store = FakeStore(hs)
    p = g2_g4(store)
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 3 * BS
    p.on_alloc("r", toks(4, 100), 3 * BS)
    (op,) = p.take_plan().loads
    store.blocks.clear()  # Redis evicted them meanwhile: the worker's reads fail
    p.on_worker_report(finished_loads=["r"], failed_loads=["r"], bad_slots={"G4": set(op.parts[0].slots)})
    assert p.stats.failed_loads == 1 and p.stats.tier("G4").bad_blocks == 3
    assert not p.index("G4").contains(hs[0])
    assert p.match("r", tokens, 0) == 0 and store.lookups == 2  # not the cached answer: asked again


def test_errors_are_misses():
    tokens = toks(4 * 3 + 1)
    p = g2_g4(FakeStore(hashes(tokens), fail=True))
    p.add_request("r", ROOT)
    assert p.match("r", tokens, 0) == 0
    assert p.index("G4").lookup_errors == 1


def test_bounded_memory_and_forgotten_addresses_invalidate_matches():
    hs = hashes(toks(4 * 20 + 1))
    index = RemoteIndex(FakeStore(hs), max_known=8, max_lookups=2)
    assert len(index.match_prefix(hs, 0, 20)) == 8  # never more than it can remember
    index.match_prefix(hs, 10, 20)
    assert index.num_used == 8 and index.stats.evicted == 8
    assert index.ready_slot(hs[0]) is None and index.ready_slot(hs[17]) is not None
    version = index.version
    index.match_prefix(hs, 1, 20), index.match_prefix(hs, 2, 20)
    assert len(index._lookups) == 2 and index.version != version


def test_a_lookup_not_answered_in_time_is_asked_again_next_step():
    tokens = toks(4 * 6 + 1)
    store = GatedStore(hashes(tokens))
    p = g2_g4(store, wait_s=0.001)
    try:
        p.add_request("r", ROOT)
        assert p.match("r", tokens, 0) is None  # not known yet: vLLM skips the request this step
        p.index("G4").begin_step()
        assert p.match("r", tokens, 0) is None and p.index("G4").deferred == 2
        p.on_alloc("r", [], 0)  # what vLLM does not do for a skipped request: harmless anyway
        store.gate.set()
        assert until_known(p, "r", tokens) == 6 * BS
        assert store.lookups == 1  # the same lookup, picked up: one round trip
        p.on_alloc("r", toks(7, 100), 6 * BS)
        (op,) = p.take_plan().loads
        assert [(part.tier, len(part.slots)) for part in op.parts] == [("G4", 6)]
        p.add_request("s", ROOT)  # cached like any answer
        assert p.match("s", tokens, 0) == 6 * BS and store.lookups == 1
    finally:
        store.gate.set()
        p.index("G4").close()


def test_local_hits_are_served_while_g4_is_out():
    tokens = toks(4 * 6 + 1)
    hs = hashes(tokens)
    store = GatedStore(hs)
    p = g2_g4(store, wait_s=0.001)
    try:
        for b in (0, 1):
            p.index("G2").commit(p.index("G2").reserve(hs[b]))
        p.add_request("r", ROOT)
        assert p.match("r", tokens, 0) == 2 * BS  # G2's run now; only G4's continuation is unknown
        p.on_alloc("r", toks(7, 100), 2 * BS)
        (op,) = p.take_plan().loads
        assert [(part.tier, len(part.slots)) for part in op.parts] == [("G2", 2)] and op.sync
        store.gate.set()
        p.add_request("s", ROOT)  # a later request gets both once G4 answered
        assert until_known(p, "s", tokens) == 6 * BS
    finally:
        store.gate.set()
        p.index("G4").close()


def test_a_late_lookup_is_a_miss_and_lookups_out_are_bounded():
    prompts = [toks(4 * 3 + 1, base=100 * i) for i in range(4)]
    store = GatedStore([h for t in prompts for h in hashes(t)])
    p = g2_g4(store, wait_s=0.001, timeout_s=0.5, max_pending=2)
    index = p.index("G4")
    try:
        p.add_request("r", ROOT)
        assert p.match("r", prompts[0], 0) is None
        time.sleep(0.7)  # past timeout_s: a miss, and not asked again while cached
        index.begin_step()
        assert p.match("r", prompts[0], 0) == 0 and index.gave_up == 1
        assert p.match("r", prompts[0], 0) == 0 and index.gave_up == 1
        for i in (1, 2):  # queued behind the stuck lookup
            p.add_request(f"s{i}", ROOT)
            assert p.match(f"s{i}", prompts[i], 0) is None
        p.add_request("s3", ROOT)
        assert p.match("s3", prompts[3], 0) == 0  # too many out: a miss at once, never a wait
        assert len(index._inflight) == 2
        index.close()  # returns even with a lookup stuck in the store (a hang would hit the test's timeout)
        assert not store.gate.is_set()  # the lookup is still stuck: close did not wait for it
        time.sleep(0.7)
        p.add_request("t", ROOT)
        assert p.match("t", prompts[1], 0) == 0  # closed: misses
    finally:
        store.gate.set()
    assert store.lookups <= 1  # late and abandoned lookups never reached the store


def test_the_key_depends_on_the_identity_only():
    assert remote_key("model a") == remote_key("model a") != remote_key("model b")
    assert len(remote_key("x")) == 32


# ---- the leader's runtime, real Redis --------------------------------------------------


def runtime(url: str, **config):
    from kvbm.runtime.leader import LeaderRuntime

    cfg = KvbmConfig(remote_url=parse_remote_url("DYN_KVBM_REMOTE_URL", url), **config)
    from kvbm.runtime.leader import EngineInfo

    return LeaderRuntime(cfg, TierPlan.configured(cfg, TierSizes(8, 0, 1024, remote_key("tiny"))),
                         EngineInfo(block_size=BS, world_size=2, engine_id=None, block_bytes=512, gpu_blocks=16,
                                    storage_key="k", max_num_batched_tokens=64), identity="tiny")


def test_leader_builds_g2_then_g4_on_redis(redis_server):
    rt = runtime(redis_server.url)
    try:
        assert [t.name for t in rt.chain] == ["G2", "G4"] and rt.capacities == {"G2": 8, "G4": 0}
        assert isinstance(rt.planner.index("G4"), RemoteIndex) and rt.remote.world_size == 2
        assert rt.chain[1].filter_threshold == 2  # the disk filter's policy by default
    finally:
        rt.close()


def test_unreachable_redis_at_start_is_a_clear_error_or_optional():
    from tests.redis_procs import free_port

    pytest.importorskip("redis")
    url = f"redis://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match="DYN_KVBM_REMOTE_URL.*DYN_KVBM_REMOTE_OPTIONAL"):
        runtime(url, remote_timeout_secs=0.5)
    rt = runtime(url, remote_timeout_secs=0.5, remote_optional=True)  # starts without G4, for now
    try:
        assert not rt.remote.is_up
        rt.planner.add_request("r", ROOT)
        assert rt.match("r", toks(4 * 3 + 1), 0) == (0, False)  # a miss at once, never a hang
    finally:
        rt.close()


def test_a_stalled_redis_never_holds_a_scheduler_step(redis_server):
    """SIGSTOPped redis-server (connections accepted, nothing answered): every ask returns at
    once, "not known yet" (None); after SIGCONT the real answer; stopped past the remote
    timeout, a miss, then hits again once Redis is back. Timings are generous bounds only."""
    import numpy as np

    from kvbm.storage.remote import RemoteStore

    prompts = [toks(4 * 5 + 1, base=1000 * i) for i in range(3)]
    for rank in range(2):  # what two TP ranks of another server stored
        with RemoteStore(redis_server.url, remote_key("tiny"), rank=rank, world_size=2) as writer:
            assert all(writer.write_blocks([(h, np.zeros(64, np.uint8)) for t in prompts for h in hashes(t)]))
    rt = runtime(redis_server.url, remote_timeout_secs=2.0, onboard_policy="always")  # whole hits, no probes

    def ask(rid: str, tokens) -> tuple[int | None, bool]:
        rt.begin_step(0)  # what vLLM's build_connector_meta does at the end of each schedule()
        # No wall-clock bound here (a busy machine stretches any): that a step never waits the 2 s
        # remote timeout shows as the None ("not known yet") answers below while Redis is stopped;
        # a step that waited would have answered the timeout's miss instead.
        return rt.match(rid, tokens, 0)

    def until_known(rid: str, tokens) -> tuple[int | None, bool]:
        deadline = time.monotonic() + 30
        while (answer := ask(rid, tokens))[0] is None:
            assert time.monotonic() < deadline, "a request waited forever"
            time.sleep(0.02)
        return answer

    hit = (5 * BS, True)  # G4 loads are asynchronous
    try:
        for rid in "abc":
            rt.planner.add_request(rid, ROOT)
        assert until_known("a", prompts[0]) == hit  # healthy
        redis_server.pause()
        assert ask("b", prompts[1]) == (None, False)
        time.sleep(0.3)
        redis_server.resume()  # within the timeout: the same lookup answers
        assert until_known("b", prompts[1]) == hit
        assert rt.remote.is_up

        redis_server.pause()
        assert ask("c", prompts[2]) == (None, False)
        assert until_known("c", prompts[2]) == (0, False)  # past the remote timeout: a miss
        # kvbm_remote_lookups_not_waited_total{outcome}; the late lookup's miss came from the store's
        # own socket timeout (kvbm_remote_errors_total) or from the index giving up: either may win
        assert rt.metrics.remote_lookups()["deferred"] >= 2
        redis_server.resume()
        deadline = time.monotonic() + 30
        while until_known("c", prompts[2]) != hit:  # the breaker lets Redis back in by itself
            assert time.monotonic() < deadline, "G4 never came back"
            time.sleep(0.1)
    finally:
        redis_server.resume()
        rt.close()
    assert rt.remote_index is None and rt.remote is None


def test_wire_carries_the_remote_key():
    from kvbm.runtime import wire
    from kvbm.runtime.wire import Beacon, Malformed

    plan = TierPlan.configured(KvbmConfig(), TierSizes(4, 0, 8192, remote_key("m")))
    beacon = Beacon("a" * 32, 1, "allocate", plan, None, ())
    assert wire.parse_beacon(wire.beacon_message(beacon)).plan == plan
    message = wire.beacon_message(beacon)
    message["plan"]["remote_key"] = "not hex"
    with pytest.raises(Malformed):
        wire.parse_beacon(message)


def test_g4_metrics_rows():
    """kvbm_remote_*: hits and blocks from the planner, errors and round trips from the leader's
    store and the workers' reports, G4 moves in kvbm_transfer_bytes_total."""
    from kvbm.metrics import CacheMetrics, exported_series, make_registry
    from kvbm.storage.remote_index import LATENCY_BUCKETS_S

    tokens = toks(4 * 3 + 1)
    p = g2_g4(FakeStore(hashes(tokens)))
    p.add_request("r", ROOT)
    p.match("r", tokens, 0)
    p.on_alloc("r", toks(4, 100), 3 * BS)
    p.take_plan()
    p.on_worker_report(finished_loads=["r"])
    metrics = CacheMetrics(p, block_bytes=100)
    metrics.on_step()
    hist = [0.0] * len(LATENCY_BUCKETS_S) + [2.0, 0.004]  # two reads, both above the last bound
    metrics.on_worker_report({"G4->G1": 300}, {"G4->G1": 0.01}, {"G4": {"timeout": 2}}, {"read": hist})
    metrics.on_worker_report({}, {}, {}, {"read": hist})
    registry = make_registry(metrics)
    assert {"kvbm_remote_hit_blocks_total", "kvbm_remote_cache_hit_rate", "kvbm_remote_up",
            "kvbm_remote_errors_total", "kvbm_remote_round_trip_seconds_bucket"} <= exported_series(registry)
    assert registry.get_sample_value("kvbm_remote_hit_blocks_total") == 3
    assert registry.get_sample_value("kvbm_remote_loaded_blocks_total") == 3
    assert registry.get_sample_value("kvbm_remote_cache_hit_rate") == 1.0
    assert registry.get_sample_value("kvbm_remote_errors_total", {"kind": "timeout"}) == 2
    assert registry.get_sample_value("kvbm_remote_round_trip_seconds_count", {"op": "read"}) == 4
    assert registry.get_sample_value("kvbm_remote_round_trip_seconds_count", {"op": "lookup"}) == 0
    assert registry.get_sample_value("kvbm_remote_lookups_not_waited_total", {"outcome": "deferred"}) == 0
    assert registry.get_sample_value("kvbm_transfer_bytes_total", {"direction": "G4->G1"}) == 300
    assert registry.get_sample_value("kvbm_tier_used_blocks", {"tier": "remote"}) == 3


def test_summary_line_says_whether_g4_is_up(redis_server):
    rt = runtime(redis_server.url)
    try:
        assert "G4 up" in rt.metrics.summary()
    finally:
        rt.close()
