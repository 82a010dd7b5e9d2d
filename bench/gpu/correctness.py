#!/usr/bin/env python3
"""kvbm inside real vLLM on a GPU: the same tokens as vLLM with a pool that keeps every prefix.

    python bench/gpu/correctness.py --out out/gpu-correctness      # on a CUDA machine with vLLM

A multi-user, multi-round chat (each round's prompt is the user's previous prompt
plus a new turn) runs through several engines at once, one process each, on one
GPU: the oracle (vLLM with a GPU pool large enough to keep every prefix), vLLM
with a small pool alone, vLLM's own ``OffloadingConnector`` with the small pool,
and kvbm with the small pool on every tier combination, eager and with CUDA
graphs. Why the oracle is the large-pool run and not a cache-less one: on a GPU
a prefix hit changes the shape of the bf16 computation (fewer tokens computed),
so only a run that hits the same prefixes is expected to give identical greedy
tokens; kvbm must then hit exactly as much (the same cached-token count).

The negative control (kvbm, host tier): the same prompt loaded from G2 before
and after G2 is overwritten with noise must give different tokens.

Prints one table and writes ``summary.json``; exit status 1 when any kvbm run
hits less than its oracle, a kvbm run whose loads all run inside the step (G2 by
default, every tier with ``load_mode=sync``) differs from it, or the negative
control does not bite, or a ``-layer-`` run (in-step loads landing layer by layer, each
attention layer waiting for its own) never landed a load layer by layer ("layered" counts
the steps that did). Runs with asynchronous loads are printed for comparison
(vLLM's own ``OffloadingConnector`` loads asynchronously too).
``tests/test_gpu_vllm.py`` runs this under ``pytest -m gpu``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "tests" / "engine_runner.py"
BLOCK = 16  # --block (the CPU backend needs multiples of 32, for a smoke run without a GPU)
USERS = 12
ROUNDS = 3
SMALL_POOL_TOKENS = 8192  # 4 concurrent ~2,000-token conversations: a third of the working set
LARGE_POOL_TOKENS = 131072


MAX_BATCHED_TOKENS = 0  # --max-num-batched-tokens (0: vLLM's default)
MAX_NUM_SEQS = 4  # --max-num-seqs: 1 makes every batch one request (no bf16 batch effects)
SPECULATIVE: dict | None = None  # --eagle: the speculative_config every engine runs with
VOCAB = 4000  # token ids drawn from [10, VOCAB); lowered to the model's vocabulary in main()


def conversations(seed: int = 7) -> list[list[list[int]]]:
    """Per round, per user: the prompt (token ids). Round r extends round r-1's prompt."""
    rng = random.Random(seed)

    def words(n: int) -> list[int]:
        return [rng.randrange(10, VOCAB) for _ in range(n)]

    system = words(512)
    histories = [list(system) for _ in range(USERS)]
    rounds = []
    for r in range(ROUNDS):
        for u in range(USERS):
            histories[u] += words(300 + 13 * u) + (words(100) if r else [])  # a turn, then an answer
        rounds.append([list(h) for h in histories])
    return rounds


def phases(negative: bool) -> list[dict]:
    out = [{"type": "generate", "prompts": prompts, "max_tokens": 32} for prompts in conversations()]
    neg = conversations(seed=99)[0][0][:645]
    out.append({"type": "generate", "prompts": [neg], "max_tokens": 32})
    if negative:
        out += [
            {"type": "generate", "prompts": [neg], "max_tokens": 32, "reset_prefix_cache": True},
            {"type": "corrupt_host"},
            {"type": "generate", "prompts": [neg], "max_tokens": 32, "reset_prefix_cache": True},
        ]
    return out


#: name -> (eager, large GPU pool, kvbm settings or None, other kv_transfer_config or None).
#: In-step G2 loads land layer by layer where layerwise_loads is "on" (the -layer-
#: runs must really have done so: their "layered" count must be > 0).
#: kvbm loads from G2 inside the step (DYN_KVBM_LOAD_MODE=auto), from G3 asynchronously unless
#: "sync"; an asynchronous load schedules the request a step later than the oracle does, which
#: changes the batch (and on a GPU the bf16 rounding) without any byte of KV being different.
_G2 = {"cpu_cache_gb": 0.5}
#: G2 smaller than the working set (~24K tokens), no disk filter: later rounds hit both tiers.
_G2G3 = {"cpu_cache_override_num_blocks": 11000 // BLOCK, "disk_cache_gb": 0.5, "disable_disk_offload_filter": True}
_G3 = {"disk_cache_gb": 0.5}
CONFIGS: dict[str, tuple[bool, bool, dict | None, dict | None]] = {
    "oracle-eager": (True, True, None, None),
    "oracle-graphs": (False, True, None, None),
    # The oracle once more: whether vLLM alone gives the same tokens twice in graph mode (where a
    # kernel's bf16 rounding may follow the batch, a difference here is vLLM's, not kvbm's).
    "oracle-graphs-again": (False, True, None, None),
    "vllm-small-eager": (True, False, None, None),
    "native-offload-eager": (True, False, None, {
        "kv_connector": "OffloadingConnector", "kv_role": "kv_both",
        "kv_connector_extra_config": {"cpu_bytes_to_use": 2e9}}),
    "kvbm-host-eager": (True, False, {**_G2, "layerwise_loads": "off"}, None),
    "kvbm-host-graphs": (False, False, {**_G2, "layerwise_loads": "off"}, None),
    # kvbm on, with the oracle's large GPU pool (it stores; nothing is evicted, so it never loads):
    # whether kvbm's mere presence changes vLLM's graph-mode tokens (no byte of KV loaded).
    "kvbm-host-large-graphs": (False, True, {**_G2, "layerwise_loads": "off"}, None),
    # Layer-wise in-step loads (layerwise_loads "on"): each attention layer waits for its own layer.
    "kvbm-host-layer-eager": (True, False, {**_G2, "layerwise_loads": "on"}, None),
    "kvbm-host-layer-graphs": (False, False, {**_G2, "layerwise_loads": "on"}, None),
    "kvbm-host-async-eager": (True, False, {**_G2, "load_mode": "async"}, None),
    "kvbm-host+disk-eager": (True, False, _G2G3, None),
    "kvbm-host+disk-sync-eager": (True, False, {**_G2G3, "load_mode": "sync"}, None),
    "kvbm-disk-eager": (True, False, _G3, None),
    "kvbm-disk-sync-eager": (True, False, {**_G3, "load_mode": "sync"}, None),
}


def strict(name: str) -> bool:
    """kvbm runs whose loads are all inside the step: they must match the oracle token for token."""
    kvbm = CONFIGS[name][2]
    if kvbm is None:
        return False
    mode = kvbm.get("load_mode", "auto")
    return mode == "sync" or (mode == "auto" and "disk_cache_gb" not in kvbm)


def spec(name: str, model: str, disk_dir: Path, block: int) -> dict:
    eager, large, kvbm, transfer = CONFIGS[name]
    config = json.loads((Path(model) / "config.json").read_text())
    # Under vLLM's hybrid manager a pool block is one layer's page, shared by the groups (one per
    # full-attention layer's worth of layers): the same tokens per group need that many more.
    layer_types = config.get("layer_types") or []
    groups = len(layer_types) // max(1, layer_types.count("full_attention")) if layer_types else 1
    if "mamba_d_state" in config:
        groups = 1  # a Mamba group keeps a block or two per request, not one per block of tokens
    pool = (LARGE_POOL_TOKENS if large else SMALL_POOL_TOKENS) // block * groups
    if kvbm is not None and "cpu_cache_override_num_blocks" in kvbm:
        kvbm = {**kvbm, "cpu_cache_override_num_blocks": kvbm["cpu_cache_override_num_blocks"] * BLOCK // block
                * groups}
    engine = {
        "model": model, "block_size": block, "max_model_len": 4096, "seed": 0, "max_num_seqs": MAX_NUM_SEQS,
        **({"max_num_batched_tokens": MAX_BATCHED_TOKENS} if MAX_BATCHED_TOKENS else {}),
        "enforce_eager": eager, "num_gpu_blocks_override": pool, "enable_prefix_caching": True,
        # A fixed KV budget skips vLLM's memory profiling, which assumes no other process
        # on the GPU changes its memory use meanwhile (these engines start side by side).
        "kv_cache_memory_bytes": 4 << 30, "gpu_memory_utilization": 0.05,
    }
    if SPECULATIVE is not None:
        engine["speculative_config"] = SPECULATIVE
    if "mamba_d_state" in config:
        # A Mamba hybrid: vLLM's GPU default for models with Mamba prefix caching is "all" mode;
        # kvbm stores the "align" mode's per-block state (docs/models.md).
        engine["mamba_cache_mode"] = "align"
    if not any(Path(model).glob("*.safetensors")):
        engine["load_format"] = "dummy"  # a config-only preset (e.g. gpu-mla): seeded random weights
    if kvbm is not None and ("disk_cache_gb" in kvbm):
        kvbm = {**kvbm, "disk_cache_dir": str(disk_dir / name)}
    return {"engine": engine, "kvbm": kvbm, "transfer": transfer,
            "phases": phases(negative=name == "kvbm-host-eager")}


def run_all(model: str, out: Path, names: list[str], timeout: float, block: int) -> dict[str, list[dict] | str]:
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for i, name in enumerate(names):
        (out / f"{name}.spec.json").write_text(json.dumps(spec(name, model, out / "disk", block)))
        (out / "disk" / name).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "HF_HUB_OFFLINE": "1",
               "VLLM_CACHE_ROOT": str(out / "vllm-cache" / name), "DYN_KVBM_LOG_LEVEL": "INFO",
               "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        log = open(out / f"{name}.log", "w")
        procs[name] = subprocess.Popen(
            [sys.executable, str(RUNNER), str(out / f"{name}.spec.json"), str(out / f"{name}.out.json")],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        if i + 1 < len(names):
            time.sleep(2)  # stagger imports a little
    results: dict[str, list[dict] | str] = {}
    deadline = time.monotonic() + timeout
    for name, proc in procs.items():
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
        path = out / f"{name}.out.json"
        if proc.returncode == 0 and path.exists():
            results[name] = json.loads(path.read_text())
        else:
            tail = (out / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
            results[name] = f"failed (rc={proc.returncode}):\n" + "\n".join(tail)
    return results


def compare(results: dict[str, list[dict] | str]) -> tuple[list[dict], bool]:
    """One row per configuration against its oracle (same eager/graphs mode)."""
    rows, ok = [], True
    for name, result in results.items():
        oracle_name = "oracle-eager" if name.endswith("eager") else "oracle-graphs"
        oracle = results.get(oracle_name)
        if isinstance(result, str) or isinstance(oracle, str) or oracle is None:
            rows.append({"config": name, "error": result if isinstance(result, str) else f"{oracle_name} failed"})
            ok = ok and not name.startswith("kvbm")
            continue
        n = ROUNDS + 1  # the conversation rounds and the first negative-control prompt
        ours = [o for phase in result[:n] for o in phase["outputs"]]
        theirs = [o for phase in oracle[:n] for o in phase["outputs"]]
        diffs = sum(a != b for a, b in zip(ours, theirs))
        # where they differ: (round, prompt, cached tokens here / in the oracle) - a difference at
        # an equal hit is bf16 rounding of another batch, one at an unequal hit a different plan
        where = [(r, i, c, oc) for r in range(n) for i, (a, b, c, oc) in enumerate(zip(
            result[r]["outputs"], oracle[r]["outputs"], result[r]["cached"], oracle[r]["cached"])) if a != b]
        cached = sum(c for phase in result[:n] for c in phase["cached"])
        oracle_cached = sum(c for phase in oracle[:n] for c in phase["cached"])
        state = result[n - 1].get("kvbm", {})
        stats = state.get("stats", {})
        row = {"config": name, "outputs": len(ours), "differ": diffs, "cached_tokens": cached,
               "oracle_cached_tokens": oracle_cached, "g2_hit_blocks": stats.get("host_hit_blocks", 0),
               "g3_hit_blocks": stats.get("disk_hit_blocks", 0), "layered_steps": state.get("layered_steps", 0),
               "differ_at": where, "cached_by_round": [sum(phase["cached"]) for phase in result[:n]],
               "oracle_cached_by_round": [sum(phase["cached"]) for phase in oracle[:n]],
               "loads": "in-step" if name.startswith("kvbm") and strict(name) else (
                   "async" if name.startswith(("kvbm", "native")) else "-")}
        if name == "kvbm-host-eager" and len(result) > n + 2:
            clean, corrupt = result[n]["outputs"], result[n + 2]["outputs"]
            row["negative_control"] = "bites" if clean != corrupt else "DOES NOT BITE"
            ok = ok and clean != corrupt
        again = results.get("oracle-graphs-again")
        if oracle_name == "oracle-graphs" and name != "oracle-graphs-again" and isinstance(again, list):
            # vLLM alone may give other tokens in another engine (graph mode): a second oracle
            # engine says which; a run equal to either oracle, token for token, is right.
            other = [o for phase in again[:n] for o in phase["outputs"]]
            row["differ_vs_again"] = sum(a != b for a, b in zip(ours, other))
            if row["differ_vs_again"] == 0:
                diffs = 0
        if name.startswith("kvbm"):  # every kvbm run hits as much as the oracle
            ok = ok and cached == oracle_cached and (diffs == 0 or not strict(name))
        if "-layer-" in name and not row["layered_steps"]:
            row["negative_control"] = "NO LAYER-WISE STEP"
            ok = False
        rows.append(row)
    return rows, ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/gpu-correctness"))
    parser.add_argument("--model", default=None, help="model path (default: build --preset)")
    parser.add_argument("--preset", default="gpu", help="kvbm.tools.demo.tiny_model preset to build: 'gpu' (full "
                        "attention), 'gpu-swa' (5 sliding-window layers to 1 full, vLLM's hybrid manager) "
                        "'gpu-mla' (DeepSeek-V2-shaped MLA) or 'gpu-mamba' (Granite-4.0-H-shaped Mamba-2 hybrid)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of: " + ", ".join(CONFIGS))
    parser.add_argument("--timeout", type=float, default=540.0)
    parser.add_argument("--block", type=int, default=BLOCK, help="tokens per block (default: %(default)s)")
    parser.add_argument("--eagle", type=int, default=0, metavar="N",
                        help="speculative decoding with an EAGLE draft head (random weights) proposing N tokens, "
                             "oracle and kvbm alike (Llama presets)")
    parser.add_argument("--max-num-seqs", type=int, default=4,
                        help="requests per batch (default: %(default)s); 1 takes batch composition out of the "
                             "comparison, for kernels whose bf16 rounding depends on it (Mamba's chunked scan)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=0,
                        help="tokens per step (default: vLLM's); the block size makes every prefill chunk one "
                             "block, so a Mamba scan is chunked alike with and without a hit (bf16 rounding "
                             "depends on the chunking)")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from kvbm.tools.demo.tiny_model import build_model

        model = str(build_model(preset=args.preset))
    global VOCAB, SPECULATIVE, MAX_NUM_SEQS, MAX_BATCHED_TOKENS
    MAX_NUM_SEQS, MAX_BATCHED_TOKENS = args.max_num_seqs, args.max_num_batched_tokens
    if args.eagle:
        from kvbm.tools.demo.tiny_model import build_eagle_draft

        SPECULATIVE = {"method": "eagle", "model": str(build_eagle_draft(model)), "num_speculative_tokens": args.eagle}
    VOCAB = min(VOCAB, json.loads((Path(model) / "config.json").read_text())["vocab_size"])
    names = [n for n in args.configs.split(",") if n]
    started = time.monotonic()
    results = run_all(model, args.out, names, args.timeout, args.block)
    rows, ok = compare(results)
    drafting = "" if SPECULATIVE is None else f"EAGLE drafting {args.eagle} tokens, "
    print(f"GPU correctness: {USERS} users x {ROUNDS} rounds, {drafting}block {args.block}, small pool "
          f"{SMALL_POOL_TOKENS} tokens, oracle pool {LARGE_POOL_TOKENS}; {time.monotonic() - started:.0f} s")
    print(f"{'config':26} {'loads':>7} {'differ/outputs':>15} {'cached tokens':>14} {'oracle':>8} {'G2 hits':>8} "
          f"{'G3 hits':>8} {'layered':>8}  notes")
    for row in rows:
        if "error" in row:
            print(f"{row['config']:26} ERROR {row['error']}")
            continue
        print(f"{row['config']:26} {row['loads']:>7} {row['differ']:>7}/{row['outputs']:<7} {row['cached_tokens']:>14} "
              f"{row['oracle_cached_tokens']:>8} {row['g2_hit_blocks']:>8} {row['g3_hit_blocks']:>8} "
              f"{row['layered_steps']:>8}  "
              f"{row.get('negative_control', '')}"
              + (f"vs oracle-graphs-again {row['differ_vs_again']}/{row['outputs']}"
                 if "differ_vs_again" in row else ""))
        if row["differ_at"] or row["cached_by_round"] != row["oracle_cached_by_round"]:
            print(f"{'':26} cached by round {row['cached_by_round']} (oracle {row['oracle_cached_by_round']}); "
                  f"differ at (round, prompt, cached, oracle cached): {row['differ_at'][:8]}")
    (args.out / "summary.json").write_text(json.dumps({"rows": rows, "ok": ok}, indent=1))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
