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
    from kvbm.tools.demo.tiny_model import build_model

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


# ---- real Redis for the G4 tests (tests/redis_procs.py) ------------------------------


def _need_redis() -> None:
    from tests.redis_procs import REDIS_CLI, REDIS_SERVER

    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli not installed (apt-get install redis-server redis-tools)")
    pytest.importorskip("redis", reason="the redis client is not installed (pip install redis)")


@pytest.fixture
def redis_factory(tmp_path: Path):
    """Start redis-server processes on free loopback ports: ``redis_factory(password=..., extra=[...])``."""
    from tests.redis_procs import RedisServer

    _need_redis()
    servers: list[RedisServer] = []

    def start(**kwargs) -> RedisServer:
        server = RedisServer(str(tmp_path / f"redis{len(servers)}"), **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.kill()


@pytest.fixture
def redis_server(redis_factory):
    """One single-node Redis (allkeys-lru, no persistence)."""
    return redis_factory(extra=["--maxmemory-policy", "allkeys-lru"])


def _cluster(directory: Path, replicas: int = 0):
    from tests.redis_procs import RedisCluster3

    _need_redis()
    cluster = RedisCluster3(str(directory), replicas=replicas)
    yield cluster
    cluster.kill()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A 3-node Redis Cluster (3 primaries, no replicas, full coverage not required), shared by a
    module's tests (creating one takes seconds): tests that kill nodes use ``fresh_redis_cluster``."""
    yield from _cluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture
def fresh_redis_cluster(tmp_path: Path):
    """A 3-node Redis Cluster of this test's own."""
    yield from _cluster(tmp_path / "cluster")


@pytest.fixture
def replicated_redis_cluster(tmp_path: Path):
    """A Redis Cluster of 3 primaries with one replica each, of this test's own."""
    yield from _cluster(tmp_path / "cluster", replicas=1)
