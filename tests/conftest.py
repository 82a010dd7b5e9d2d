"""Shared fixtures: the locally built model and a runner for real vLLM engines."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RUNNER = Path(__file__).with_name("engine_runner.py")

# Same settings on both sides of every comparison (see docs/testing.md):
# vLLM reserves a core when a connector is configured, which changes bf16
# rounding on a 2-core machine unless the reservation is pinned.
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}

BLOCK = 128  # vLLM's CPU attention needs multiples of 32


@pytest.fixture(scope="session")
def model_path() -> str:
    from kvbm.demo.tiny_model import build_model

    return str(build_model(preset="test"))


def engine_args(model: str, **overrides) -> dict:
    args = {
        "model": model,
        "block_size": BLOCK,
        "max_model_len": 4096,
        "enforce_eager": True,
        "seed": 0,
        "max_num_seqs": 8,
    }
    args.update(overrides)
    return args


def run_engine(tmp_path: Path, name: str, engine: dict, phases: list[dict], kvbm: dict | None,
               env: dict | None = None, timeout: float = 600) -> list[dict]:
    """Run phases on a fresh engine in a subprocess; return per-phase results."""
    spec = tmp_path / f"{name}.spec.json"
    out = tmp_path / f"{name}.out.json"
    spec.write_text(json.dumps({"engine": engine, "phases": phases, "kvbm": kvbm}))
    proc_env = {**os.environ, **ENGINE_ENV, **(env or {})}
    proc = subprocess.run(
        [sys.executable, str(RUNNER), str(spec), str(out)],
        cwd=ROOT, env=proc_env, capture_output=True, text=True, timeout=timeout,
    )
    log = tmp_path / f"{name}.log"
    log.write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-60:])
        raise AssertionError(f"engine runner {name} failed (rc={proc.returncode}), log {log}:\n{tail}")
    return json.loads(out.read_text())


def token_prompt(rng: random.Random, n: int, vocab: int = 1500) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]
