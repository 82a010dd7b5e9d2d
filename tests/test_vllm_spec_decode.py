"""Speculative decoding (n-gram) with kvbm inside real vLLM: same tokens, hits served.

A step of speculative decoding computes KV for draft tokens that may be rejected; kvbm must
never keep a block holding one. kvbm stores only blocks whose every token is in the request's
accepted tokens (drafts are not, until verified), so a block is written once its tokens are
final. The random-weight model repeats itself, which is what an n-gram drafter feeds on: most
steps carry drafts, many are accepted, some rejected.
"""

from __future__ import annotations

import random

import pytest

from tests.conftest import BLOCK, engine_args, run_engine, token_prompt

pytestmark = [pytest.mark.slow]

rng = random.Random(99)
PROMPTS = [token_prompt(rng, 3 * BLOCK + 40 + 30 * i) for i in range(4)]
PHASES = [
    {"type": "generate", "prompts": PROMPTS, "max_tokens": 96},
    # vLLM's own cache dropped: every full prompt block must come back from G2
    {"type": "generate", "prompts": PROMPTS, "max_tokens": 96, "reset_prefix_cache": True},
    # the conversation goes on: prompt + the reply (its blocks were written during decoding)
    {"type": "generate", "prompts": "FOLLOW", "max_tokens": 32, "reset_prefix_cache": True},
    {"type": "corrupt_host"},
    {"type": "generate", "prompts": PROMPTS[:1], "max_tokens": 96, "reset_prefix_cache": True},
]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _phases(replies: list[list[int]] | None) -> list[dict]:
    phases = [dict(p) for p in PHASES]
    phases[2]["prompts"] = [p + r for p, r in zip(PROMPTS, replies)] if replies else PROMPTS
    return phases


@pytest.fixture(scope="module")
def runs(model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("spec_decode")
    engine = engine_args(model_path, dtype="float32", speculative_config=SPEC)
    first = run_engine(tmp, "probe", engine_args(model_path, dtype="float32"), PHASES[:1], kvbm=None)
    phases = _phases(first[0]["outputs"])
    base = run_engine(tmp, "baseline", engine, phases, kvbm=None)
    ours = run_engine(tmp, "kvbm", engine, phases, kvbm={"cpu_cache_override_num_blocks": 400})
    return base, ours, (tmp / "kvbm.log").read_text()


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_same_tokens_as_vllm_alone(runs, phase):
    base, ours, _ = runs
    assert ours[phase]["outputs"] == base[phase]["outputs"]


def test_drafting_really_ran(runs):
    _, _, log = runs
    assert "ngram" in log.lower()


def test_hits_served_after_reset(runs):
    base, ours, _ = runs
    assert sum(base[1]["cached"]) == 0
    assert ours[1]["cached"] == [(len(p) - 1) // BLOCK * BLOCK for p in PROMPTS]
    # the follow-up (prompt + reply) reaches into blocks written while decoding with drafts
    follow = [len(p) + len(r) for p, r in zip(PROMPTS, ours[0]["outputs"])]
    assert ours[2]["cached"] == [(n - 1) // BLOCK * BLOCK for n in follow]
    assert any(n // BLOCK > len(p) // BLOCK for n, p in zip(follow, PROMPTS))
    assert sum(base[2]["cached"]) == 0


def test_negative_control_bites(runs):
    base, ours, _ = runs
    assert ours[4]["cached"][0] > 0
    assert ours[4]["outputs"] != base[4]["outputs"]
