"""KV events for kvbm's tiers (kvbm.runtime.events, in vLLM's schema): a real
planner and pools, real vLLM requests and vLLM's own G1 block pool as the reference for block identity."""

from __future__ import annotations

import pytest

pytest.importorskip("vllm")

from vllm.distributed.kv_events import BlockRemoved, BlockStored  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.utils.hashing import sha256  # noqa: E402
from vllm.v1.core.block_pool import BlockPool as VllmBlockPool  # noqa: E402
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash, maybe_convert_block_hash  # noqa: E402
from vllm.v1.request import Request  # noqa: E402

from kvbm.core.hashing import engine_root, request_root  # noqa: E402
from kvbm.core.planner import Planner  # noqa: E402
from kvbm.core.pool import BlockPool  # noqa: E402
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier  # noqa: E402
from kvbm.runtime.events import EngineEvents  # noqa: E402
from kvbm.vllm_integration.compat import kv_event_schema  # noqa: E402

BS = 4
ROOT = request_root(engine_root("events-test"))
init_none_hash(sha256)
HASHER = get_request_block_hasher(BS, sha256)


def vllm_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=1), None, block_hasher=HASHER)


class Rig:
    """A planner over G2 (and G3 when asked) with the recorder attached, driving requests like the leader."""

    def __init__(self, host: int = 8, disk: int = 0, remote: bool = False, loose: int = 1024) -> None:
        chain = [Tier("G2", HOST, host)]
        indexes = {"G2": BlockPool(host, "G2")}
        if disk:
            chain.append(Tier("G3", DISK, disk))
            indexes["G3"] = BlockPool(disk, "G3")
        self.planner = Planner(chain, BS, indexes=indexes)
        self.requests: dict[str, Request] = {}
        self.recorder = EngineEvents(self.planner.chain, BS, self.requests, kv_event_schema(), loose_blocks=loose)
        self.planner.set_listener(self.recorder.tiers)

    def run(self, rid: str, tokens: list[int], gpu: list[int], confirm: bool = True, fail: bool = False):
        request = self.requests[rid] = vllm_request(rid, tokens)
        p = self.planner
        p.add_request(rid, ROOT)
        p.match(rid, tokens, 0)
        p.on_alloc(rid, gpu, 0)
        p.on_scheduled(rid, tokens, gpu, True, len(tokens))
        plan = p.take_plan()
        if confirm and plan.store is not None:
            if fail:
                p.on_worker_report(failed_batches=[plan.store.batch_id])
            else:
                p.on_worker_report(stored={plan.store.batch_id: 1})
        spills = p.take_plan().spills
        while spills:  # report spills (G2 -> G3) as done, as the workers would
            p.on_worker_report(stored={s.batch_id: 1 for s in spills})
            spills = p.take_plan().spills
        p.on_finished(rid)
        return request


def stored(events, medium=None):
    return [e for e in events if isinstance(e, BlockStored) and (medium is None or e.medium == medium)]


def removed(events, medium=None):
    return [e for e in events if isinstance(e, BlockRemoved) and (medium is None or e.medium == medium)]


def test_g2_store_matches_vllm_own_block_events():
    """Hashes, parents, tokens and block size are exactly those of vLLM's own BlockStored for the blocks."""
    rig = Rig()
    tokens = list(range(100, 114))  # 3 full blocks and a partial one
    request = rig.run("a", tokens, [0, 1, 2, 3])
    ours = stored(rig.recorder.take_events())
    assert [e.medium for e in ours] == ["CPU"] * 3

    gpu_pool = VllmBlockPool(16, True, BS, enable_kv_cache_events=True)
    blocks = gpu_pool.get_new_blocks(3)
    gpu_pool.cache_full_blocks(vllm_request("a", tokens), blocks, 0, 3, BS, 0)
    reference = stored(gpu_pool.take_events())
    flat = [(h, e.token_ids[i * BS:(i + 1) * BS]) for e in reference for i, h in enumerate(e.block_hashes)]
    assert [e.block_hashes[0] for e in ours] == [h for h, _ in flat]
    assert [e.token_ids for e in ours] == [t for _, t in flat] == [tokens[i * BS:(i + 1) * BS] for i in range(3)]
    assert ours[0].parent_block_hash is None
    assert [e.parent_block_hash for e in ours[1:]] == [e.block_hashes[0] for e in ours[:-1]]
    assert {e.block_size for e in ours} == {BS}
    assert request.block_hashes  # vLLM hashed it


def test_nothing_announced_before_commit_or_after_a_failed_store():
    rig = Rig()
    rig.run("a", list(range(8)), [0, 1], confirm=False)
    assert rig.recorder.take_events() == []
    rig2 = Rig()
    rig2.run("a", list(range(8)), [0, 1], fail=True)
    assert rig2.recorder.take_events() == []
    assert rig2.recorder.tiers.num_blocks == 2  # loose (bounded), not held by any tier


def test_repeat_store_is_not_announced_twice():
    rig = Rig()
    rig.run("a", list(range(12)), [0, 1, 2])
    first = rig.recorder.take_events()
    rig.run("b", list(range(12)), [3, 4, 5])  # same prefix: already in G2
    assert len(stored(first)) == 3 and rig.recorder.take_events() == []


def test_eviction_removes_from_its_medium_then_store_again():
    rig = Rig(host=2)
    a = rig.run("a", list(range(8)), [0, 1])
    rig.recorder.take_events()
    rig.run("b", list(range(50, 58)), [2, 3])  # evicts a's two blocks from G2
    events = rig.recorder.take_events()
    assert sorted(e.block_hashes[0] for e in removed(events, "CPU")) == sorted(
        maybe_convert_block_hash(h) for h in a.block_hashes[:2])
    assert len(stored(events, "CPU")) == 2
    assert events.index(removed(events)[0]) < events.index(stored(events)[-1])
    rig.run("a2", list(range(8)), [0, 1])  # a's blocks come back: announced once more
    again = rig.recorder.take_events()
    assert len(stored(again, "CPU")) == 2 and len(removed(again, "CPU")) == 2


def test_spill_to_g3_is_one_event_per_medium_and_evictions_are_per_medium():
    """G2 -> G3 adds a DISK event (no second CPU one); evicting from G2 removes only the CPU entry."""
    rig = Rig(host=2, disk=8)
    rig.run("a", list(range(8)), [0, 1])
    events = rig.recorder.take_events()
    assert len(stored(events, "CPU")) == 2 and len(stored(events, "DISK")) == 2
    assert len(stored(events)) == 4 and removed(events) == []
    rig.run("b", list(range(50, 58)), [2, 3])  # evicts a from G2; a stays in G3
    events = rig.recorder.take_events()
    assert len(removed(events, "CPU")) == 2 and removed(events, "DISK") == []
    assert len(stored(events, "CPU")) == 2 and len(stored(events, "DISK")) == 2  # b's blocks
    # Per medium, the stream never stores a block twice without removing it in between.
    rig.run("a2", list(range(8)), [0, 1])
    held: set[tuple[str, object]] = set()
    for e in events + rig.recorder.take_events():
        for h in e.block_hashes:
            key = (e.medium, h)
            if isinstance(e, BlockStored):
                assert key not in held
                held.add(key)
            else:
                held.discard(key)


def test_g4_blocks_are_forgotten_in_bounded_memory_and_announced_removed():
    chain = [Tier("G4", REMOTE, 0, shared=True)]

    class Remote(BlockPool):  # a shared tier's index as the planner sees it; it reports no evictions
        shared = True

    planner = Planner(chain, BS, indexes={"G4": Remote(64, "G4")})
    requests: dict[str, Request] = {}
    recorder = EngineEvents(planner.chain, BS, requests, kv_event_schema(), loose_blocks=2)
    planner.listener = recorder.tiers  # a shared index never reports evictions: no on_removed hook
    for i, rid in enumerate(("a", "b")):
        tokens = list(range(i * 100, i * 100 + 8))
        requests[rid] = vllm_request(rid, tokens)
        planner.add_request(rid, ROOT)
        planner.match(rid, tokens, 0)
        planner.on_alloc(rid, [0, 1], 0)
        planner.on_scheduled(rid, tokens, [0, 1], True, 8)
        plan = planner.take_plan()
        planner.on_worker_report(stored={plan.store.batch_id: 1})
    events = recorder.take_events()
    assert [e.medium for e in stored(events)] == ["REMOTE"] * 4
    assert len(removed(events, "REMOTE")) == 2  # a's blocks fell out of the bounded memory
    assert recorder.tiers.num_blocks == 2


def test_disabled_without_kv_events_config():
    class Config:
        kv_events_config = None

    rig = Rig()
    assert EngineEvents.attach(Config(), rig.planner, {}, kv_event_schema) is None


def test_requests_vllm_did_not_hash_are_not_announced():
    rig = Rig()
    rid = "x"
    tokens = list(range(8))
    rig.requests[rid] = Request(rid, tokens, SamplingParams(max_tokens=1), None)  # no block hasher
    p = rig.planner
    p.add_request(rid, ROOT)
    p.match(rid, tokens, 0)
    p.on_alloc(rid, [0, 1], 0)
    p.on_scheduled(rid, tokens, [0, 1], True, 8)
    p.on_worker_report(stored={p.take_plan().store.batch_id: 1})
    assert rig.recorder.take_events() == []
