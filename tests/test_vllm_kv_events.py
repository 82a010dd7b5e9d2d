"""Real vLLM publishes kvbm's tier events with its own (kvbm.runtime.events), on vLLM's ZMQ stream."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ENGINE_ENV, token_prompt

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
RUNNER = Path(__file__).with_name("kv_events_runner.py")
ROOT = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, model: str, prompts: list[list[int]]) -> list[list]:
    spec = tmp_path / "spec.json"
    out = tmp_path / "events.json"
    spec.write_text(json.dumps({"model": model, "endpoint": f"ipc://{tmp_path}/events", "prompts": prompts,
                                "kvbm": True}))
    proc = subprocess.run([sys.executable, str(RUNNER), str(spec), str(out)], cwd=ROOT,
                          env={**os.environ, **ENGINE_ENV, "DYN_KVBM_LOG_SUMMARY_SECS": "0"},
                          capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return json.loads(out.read_text())


def test_g2_events_ride_vllms_stream_with_vllms_block_hashes(model_path: str, tmp_path: Path):
    rng = random.Random(3)
    prompts = [token_prompt(rng, 900) for _ in range(3)]  # 7 full blocks each; vLLM's pool holds two prompts
    events = run(tmp_path, model_path, prompts)
    gpu = {h for kind, medium, hashes, *_ in events if kind == "BlockStored" and medium == "GPU" for h in hashes}
    cpu_stored = [h for kind, medium, hashes, *_ in events if kind == "BlockStored" and medium == "CPU"
                  for h in hashes]
    assert len(cpu_stored) >= 14, events  # the first two prompts' blocks reached G2 and were announced
    # The same identity as vLLM's own events: every G2 block is one vLLM announced for its GPU pool.
    assert set(cpu_stored) <= gpu
    assert all(n == 128 for kind, medium, _, _, n in events if kind == "BlockStored" and medium == "CPU")
    # vLLM evicted the first prompt from its pool (GPU removals) while G2 keeps it (no CPU removal).
    assert any(kind == "BlockRemoved" and medium == "GPU" for kind, medium, *_ in events)
    assert not any(kind == "BlockRemoved" and medium == "CPU" for kind, medium, *_ in events)
    held: set[str] = set()
    for kind, medium, hashes, *_ in events:
        for h in hashes:
            if medium == "CPU" and kind == "BlockStored":
                assert h not in held, "a G2 block announced twice"
                held.add(h)
