"""kvbm's request trace inside real vLLM: written while serving, read back by ``kvbm plan``, replayed.

One engine with kvbm and ``trace_file`` set serves three rounds of chat
conversations, one request at a time, that overflow vLLM's own pool; the
trace must list every request with its lengths and one hash per full block,
and replaying it must reproduce the G2 hits the engine really had.
"""

from __future__ import annotations

import json
import random

import pytest

from kvbm.tools.plan.simulate import ReplaySettings, SizePoint, gpu_pass, replay
from kvbm.tools.plan.trace import read_trace
from tests.conftest import BLOCK, engine_args, run_engine, token_prompt

pytestmark = pytest.mark.slow

G1_BLOCKS = 24
G2_BLOCKS = 30
MAX_TOKENS = 8

rng = random.Random(77)
SYSTEM = token_prompt(rng, 2 * BLOCK)
TURNS = [[token_prompt(rng, 150 + 40 * i) for _ in range(3)] for i in range(6)]


def round_prompts(r: int) -> list[list[int]]:
    return [SYSTEM + [t for turn in conv[: r + 1] for t in turn] for conv in TURNS]


# One request at a time: the replay must then match the engine exactly (a burst larger than
# vLLM's pool is modelled approximately, see docs/plan.md).
PHASES = [{"type": "generate", "prompts": [prompt], "max_tokens": MAX_TOKENS}
          for r in range(3) for prompt in round_prompts(r)]


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan_trace")
    path = tmp / "trace.jsonl"
    engine = engine_args(model_path, num_gpu_blocks_override=G1_BLOCKS, max_model_len=2048)
    results = run_engine(tmp, "kvbm", engine, PHASES,
                         kvbm={"cpu_cache_override_num_blocks": G2_BLOCKS, "trace_file": str(path)})
    return path, results[-1]["kvbm"]["stats"]


def test_trace_lists_every_request_without_tokens(served):
    path, _ = served
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    header, records = lines[0], lines[1:]
    assert header["kvbm_trace"] == 1 and header["block_size"] == BLOCK
    assert header["gpu_blocks"] == G1_BLOCKS and header["host_blocks"] == G2_BLOCKS
    assert header["bytes_per_block"] > 0 and header["load_mode"] == "auto" and header["max_num_batched_tokens"] > 0
    sent = sorted(len(p) for phase in PHASES for p in phase["prompts"])
    assert sorted(r["prompt"] for r in records) == sent
    for r in records:
        assert set(r) == {"t", "end", "prompt", "output", "served", "hashes"}  # no text, no token ids
        assert r["output"] == MAX_TOKENS and r["end"] >= r["t"]
        assert len(r["hashes"]) == (r["prompt"] + r["output"] - 1) // BLOCK
        assert all(isinstance(h, str) and int(h, 16) >= 0 for h in r["hashes"])


def test_trace_reads_back_and_predicts_the_engine(served):
    path, stats = served
    trace = read_trace(path, progress=False)
    assert len(trace.requests) == sum(len(phase["prompts"]) for phase in PHASES)
    assert (trace.block_size, trace.gpu_blocks) == (BLOCK, G1_BLOCKS)
    # The same system prompt opens every conversation: one block id shared by all requests.
    assert len({r.blocks[0] for r in trace.requests}) == 1
    settings = ReplaySettings(load_mode=trace.load_mode, chunk_tokens=trace.max_num_batched_tokens)
    served: list[tuple[int, int]] = []
    result = replay(trace, gpu_pass(trace, G1_BLOCKS), SizePoint(G2_BLOCKS), settings, served=served)
    assert stats["host_hit_blocks"] > 0
    assert (result.host_hit_blocks, result.looked_up_blocks) == (stats["host_hit_blocks"], stats["lookup_blocks"])
    assert served == [r.served for r in trace.requests]  # request by request
