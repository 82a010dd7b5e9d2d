"""G4, the tier shared by servers, inside real vLLM against real redis-server processes.

Every output is compared with vLLM alone (greedy, same prompt). Each "server"
is a separate engine process with its own G1/G2: server A serves the first
turn of some conversations, server B (fresh) continues them and loads A's
blocks from Redis; a server of another identity (dtype), or a request with
another cache salt, never hits them. The same through a 3-node Redis Cluster
with a node killed while B runs, and a server that starts while Redis is down
and sees it killed and restarted: served throughout, G4 back by itself. And a
Redis that stalls (SIGSTOP) mid-run: the scheduler never waits for it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import BLOCK, _need_redis, engine_args, run_engine, token_prompt

pytestmark = pytest.mark.slow

rng = random.Random(15)
FIRST = {name: token_prompt(rng, 4 * BLOCK + 40) for name in "ABC"}  # first turns: 4 full blocks each
NEXT = {name: token_prompt(rng, 60) for name in "ABC"}  # the user's next message
MAX_TOKENS = 8


def gen(name: str, turn: int = 1, salt: str | None = None, reset: bool = True) -> dict:
    return {"type": "generate", "prompts": [None], "name": name, "turn": turn, "salts": [salt],
            "reset_prefix_cache": reset, "max_tokens": MAX_TOKENS}


def barrier(directory: Path, name: str) -> dict:
    return {"type": "barrier", "dir": str(directory), "name": name}


@pytest.fixture(scope="module")
def engine(model_path):
    return engine_args(model_path, num_gpu_blocks_override=40)


@pytest.fixture(scope="module")
def reference(engine, tmp_path_factory):
    """vLLM alone: first turns, then second turns (first turn + its answer + the next message)."""
    tmp = tmp_path_factory.mktemp("g4_ref")
    firsts = run_engine(tmp, "first", engine, [{"type": "generate", "prompts": [FIRST[n]], "max_tokens": MAX_TOKENS}
                                               for n in FIRST], kvbm=None)
    prompts = {(n, 1): FIRST[n] for n in FIRST}
    outputs = {(n, 1): r["outputs"][0] for n, r in zip(FIRST, firsts)}
    for n in FIRST:
        prompts[(n, 2)] = FIRST[n] + outputs[(n, 1)] + NEXT[n]
    seconds = run_engine(tmp, "second", engine, [{"type": "generate", "prompts": [prompts[(n, 2)]],
                                                 "max_tokens": MAX_TOKENS} for n in FIRST], kvbm=None)
    outputs.update({(n, 2): r["outputs"][0] for n, r in zip(FIRST, seconds)})
    return prompts, outputs


def run(tmp_path: Path, name: str, engine: dict, phases: list[dict], kvbm: dict, reference,
        events: dict[str, Callable[[], None]] | None = None) -> list[tuple[dict, dict]]:
    """Run a server; at each barrier, the test's action, then go. Outputs must equal vLLM alone."""
    prompts, outputs = reference
    for phase in phases:
        if phase["type"] == "generate":
            phase["prompts"] = [prompts[(phase["name"], phase["turn"])]]
    pending = dict(events or {})
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(run_engine, tmp_path, name, engine, phases, kvbm)
        while pending and not future.done():
            for point, action in list(pending.items()):
                if (tmp_path / f"{point}.reached").exists():
                    action()
                    (tmp_path / f"{point}.go").touch()
                    del pending[point]
            time.sleep(0.05)
        results = future.result()
    for phase, result in zip(phases, results):
        if phase["type"] == "generate":
            assert result["outputs"][0] == outputs[(phase["name"], phase["turn"])], (name, phase["name"])
    return list(zip(phases, results))


def g4(result: dict, counter: str) -> int:
    return result["kvbm"]["tiers"].get("G4", {}).get(counter, 0)


def delta(pairs, i: int, counter: str) -> int:
    return g4(pairs[i][1], counter) - (g4(pairs[i - 1][1], counter) if i else 0)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    from tests.redis_procs import RedisServer

    _need_redis()
    server = RedisServer(str(tmp_path_factory.mktemp("redis")), extra=["--maxmemory-policy", "allkeys-lru"])
    yield server.url
    server.kill()


def settings(url: str, namespace: str, **extra) -> dict:
    # Every block committed in G2 goes on to G4 (no repeat needed), so B finds A's first turns.
    return {"cpu_cache_override_num_blocks": 64, "remote_url": url, "remote_namespace": namespace,
            "disable_remote_offload_filter": True, **extra}


def test_server_b_continues_what_server_a_served(engine, reference, redis_url, tmp_path):
    kvbm = settings(redis_url, "ab")
    a = run(tmp_path, "server_a", engine, [gen(n) for n in "ABC"], kvbm, reference)
    assert g4(a[-1][1], "spilled_blocks") == 3 * 4  # every first-turn block reached Redis
    assert a[-1][1]["kvbm"]["remote"]["up"]

    b = run(tmp_path, "server_b", engine, [gen(n, turn=2) for n in "ABC"] + [gen("A", turn=2, salt="other")],
            kvbm, reference)
    for i in range(3):
        assert delta(b, i, "hit_blocks") == 4  # A's first turn, loaded from G4 by another process
        assert b[i][1]["cached"] == [4 * BLOCK]
    assert g4(b[2][1], "loaded_blocks") == 3 * 4
    assert delta(b, 3, "hit_blocks") == 0  # another cache salt: other hashes, never A's blocks
    assert b[-1][1]["kvbm"]["stats"]["failed_loads"] == 0

    fp32 = run(tmp_path, "server_fp32", {**engine, "dtype": "float32"}, [gen("A", turn=2)], kvbm, reference)
    assert g4(fp32[0][1], "hit_blocks") == 0  # another identity: other keys


def test_cluster_with_a_node_killed_while_serving(engine, reference, fresh_redis_cluster, tmp_path):
    cluster = fresh_redis_cluster
    kvbm = settings(cluster.url, "cluster")
    a = run(tmp_path, "cluster_a", engine, [gen(n) for n in "ABC"], kvbm, reference)
    assert g4(a[-1][1], "spilled_blocks") == 3 * 4
    victims = []

    def kill_node() -> None:
        """Kill the primary holding most of B's and C's blocks: those B did not read yet (idle for
        as long as this engine took to start, while A's were just read)."""
        def unread(node) -> int:
            keys = node.cli("--scan", "--pattern", "cluster:*").split()
            return sum(int(node.cli("OBJECT", "IDLETIME", key)) >= 3 for key in keys)

        victims.append(max(cluster.primaries, key=unread))
        victims[0].kill()

    phases = [gen("A", turn=2), barrier(tmp_path, "kill"), gen("B", turn=2), gen("C", turn=2)]
    b = run(tmp_path, "cluster_b", engine, phases, kvbm, reference, events={"kill": kill_node})
    assert delta(b, 0, "hit_blocks") == 4  # every node up: G4 serves
    state = b[-1][1]["kvbm"]
    assert f"127.0.0.1:{victims[0].port}" in state["remote"]["down_nodes"]
    # The dead node's keys are misses (identical tokens, checked by run): B and C found fewer blocks.
    assert g4(b[-1][1], "hit_blocks") - g4(b[1][1], "hit_blocks") < 2 * 4


def test_redis_down_at_start_then_killed_and_restarted(engine, reference, tmp_path):
    """G4 alone (no G2), started with Redis down (DYN_KVBM_REMOTE_OPTIONAL), then Redis comes up,
    is killed and restarted empty: every request is served, G4 comes back by itself."""
    from tests.redis_procs import RedisServer, free_port

    _need_redis()
    port = free_port()
    kvbm = {"remote_url": f"redis://127.0.0.1:{port}", "remote_optional": True, "remote_timeout_secs": 0.5}
    servers: list[RedisServer] = []

    def start() -> None:
        servers.append(RedisServer(str(tmp_path / f"redis{len(servers)}"), port=port,
                                   extra=["--maxmemory-policy", "allkeys-lru"]))

    phases = [
        gen("A"),  # Redis down: served, nothing stored
        barrier(tmp_path, "start"), {"type": "wait_remote"},
        gen("A"), gen("A"),  # stored, then loaded from G4
        barrier(tmp_path, "kill"), gen("B"), gen("A"),  # down again: served, misses
        barrier(tmp_path, "restart"), {"type": "wait_remote"},
        gen("C"), gen("C"),  # back: stored and loaded again
    ]
    try:
        pairs = run(tmp_path, "faults", engine, phases, kvbm, reference,
                    events={"start": start, "kill": lambda: servers[-1].kill(), "restart": start})
    finally:
        for server in servers:
            server.kill()
    assert g4(pairs[0][1], "hit_blocks") == 0 and g4(pairs[0][1], "stored_blocks") == 0
    assert pairs[2][1]["up"] and pairs[9][1]["up"]
    assert delta(pairs, 4, "hit_blocks") == 4  # the second A came from Redis
    state = pairs[7][1]["kvbm"]
    assert state["remote"]["down_episodes"] >= 2  # down at start, and killed
    assert state["stats"]["failed_loads"] <= 1  # a load that failed is not retried from a stale lookup
    assert delta(pairs, 11, "hit_blocks") == 4  # G4 is back, empty, and fills again


def test_redis_stalled_mid_run_never_holds_the_engine(engine, reference, tmp_path):
    """G4 alone; Redis SIGSTOPped (connections accepted, nothing answered) between requests:
    lookups are "not known yet" for a few steps, then misses; every request is served with
    vLLM's own tokens, and G4 serves again after SIGCONT."""
    from tests.redis_procs import RedisServer

    _need_redis()
    server = RedisServer(str(tmp_path / "redis"), extra=["--maxmemory-policy", "allkeys-lru"])
    kvbm = {"remote_url": server.url, "remote_timeout_secs": 1.0}
    phases = [
        gen("A"), gen("A"),  # stored, then loaded from G4
        barrier(tmp_path, "stop"), gen("B"), gen("A"),  # stalled: served, computed
        barrier(tmp_path, "cont"), {"type": "wait_remote"},
        gen("C"), gen("C"),  # back: stored and loaded again
    ]
    try:
        pairs = run(tmp_path, "stalled", engine, phases, kvbm, reference,
                    events={"stop": server.pause, "cont": server.resume})
    finally:
        server.resume()
        server.kill()
    assert delta(pairs, 1, "hit_blocks") == 4  # healthy: the second A from Redis
    stalled = pairs[4][1]["kvbm"]
    assert stalled["g4_lookups"]["deferred"] >= 1  # asked again next step, not waited for
    assert not stalled["remote"]["up"]  # the lookup thread (or a store) hit the timeout
    assert pairs[6][1]["up"]
    assert delta(pairs, 8, "hit_blocks") == 4  # G4 is back
