"""Speculative decoding (n-gram and an EAGLE draft head) with kvbm inside real vLLM: same
tokens, hits served.

A step of speculative decoding computes KV for draft tokens that may be rejected; kvbm must
never keep a block holding one. kvbm stores only blocks whose every token is in the request's
accepted tokens (drafts are not, until verified), so a block is written once its tokens are
final. The random-weight model repeats itself, which is what an n-gram drafter feeds on: most
steps carry drafts, many are accepted, some rejected. The EAGLE head (random weights, one
layer) has a KV cache of its own in the target's group: its pages are stored and loaded with the
target's, and its proposals are mostly rejected, so every step exercises the rollback.
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
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def _phases(replies: list[list[int]] | None) -> list[dict]:
    phases = [dict(p) for p in PHASES]
    phases[2]["prompts"] = [p + r for p, r in zip(PROMPTS, replies)] if replies else PROMPTS
    return phases


@pytest.fixture(scope="module")
def follow_phases(model_path, tmp_path_factory) -> list[dict]:
    """The phases, with the follow-up turn built from a plain run's replies (shared by drafters)."""
    tmp = tmp_path_factory.mktemp("spec_probe")
    first = run_engine(tmp, "probe", engine_args(model_path, dtype="float32"), PHASES[:1], kvbm=None)
    return _phases(first[0]["outputs"])


@pytest.fixture(scope="module", params=["ngram", "eagle"])
def runs(request, model_path, follow_phases, tmp_path_factory):
    if request.param == "eagle":
        from kvbm.tools.demo.tiny_model import build_eagle_draft

        spec = {"method": "eagle", "model": str(build_eagle_draft(model_path)), "num_speculative_tokens": 2}
    else:
        spec = NGRAM
    tmp = tmp_path_factory.mktemp(f"spec_{request.param}")
    engine = engine_args(model_path, dtype="float32", speculative_config=spec)
    base = run_engine(tmp, "baseline", engine, follow_phases, kvbm=None)
    ours = run_engine(tmp, "kvbm", engine, follow_phases, kvbm={"cpu_cache_override_num_blocks": 400})
    return base, ours, (tmp / "kvbm.log").read_text(), request.param


@pytest.mark.parametrize("phase", [0, 1, 2])
def test_same_tokens_as_vllm_alone(runs, phase):
    base, ours, _, _ = runs
    assert ours[phase]["outputs"] == base[phase]["outputs"]


def test_drafting_really_ran(runs):
    _, _, log, method = runs
    assert f"method='{method}'" in log


def _hit(num_tokens: int, method: str) -> int:
    """vLLM's own hit on a prompt it holds whole: never the last token, and with an EAGLE
    drafter one block less (its KV at a block's last position was written with the next token)."""
    full = (num_tokens - 1) // BLOCK * BLOCK
    return max(0, full - BLOCK) if method == "eagle" else full


def test_hits_served_after_reset(runs):
    base, ours, _, method = runs
    assert sum(base[1]["cached"]) == 0
    assert ours[1]["cached"] == [_hit(len(p), method) for p in PROMPTS]
    # the follow-up (prompt + reply) reaches into blocks written while decoding with drafts
    follow = [len(p) + len(r) for p, r in zip(PROMPTS, ours[0]["outputs"])]
    assert ours[2]["cached"] == [_hit(n, method) for n in follow]
    assert any(n // BLOCK > len(p) // BLOCK for n, p in zip(follow, PROMPTS))
    assert sum(base[2]["cached"]) == 0


def test_negative_control_bites(runs):
    base, ours, _, _ = runs
    assert ours[4]["cached"][0] > 0
    assert ours[4]["outputs"] != base[4]["outputs"]
