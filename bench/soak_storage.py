"""Soak: many requests through real vLLM + kvbm (G2 + G3) with random aborts and disk faults.

Issue 13's proof that the storage side holds up over time: every request that
completes must produce the same greedy tokens as vLLM alone, memory must stay
flat, and at the end no slot may be left pinned, pending or lost.

* Workload (seeded): requests share a pool of "documents" (2-5 blocks of 32
  tokens, a few of them hot) plus a short unique tail; up to 12 new tokens
  each. vLLM's own cache (G1) holds 128 blocks, kvbm's G2 32 and G3 1,024, and
  every G2 block is spilled to disk (filter off), so hits come from both G2
  and G3. vLLM's prefix cache is reset every few waves so kvbm must serve.
* Faults: ``DYN_KVBM_DISK_FAULT_INJECTION`` makes the G3 arena fail or corrupt
  a share of its block reads and writes (kvbm.storage.disk.FaultInjector;
  off unless set). Each must end as a recompute, never as wrong tokens.
* Aborts: a share of requests is aborted at a random step (also mid-load).
* Reference: the same requests through vLLM alone (no aborts), in float32 so
  that batch shape cannot change rounding (see docs: bf16 on AVX2-only CPUs).

Each side runs in a fresh subprocess (in-process engine, like the tests).
Prints the comparison, RSS over time, kvbm's counters and the final block
accounting; exits 1 on any token mismatch or leak.

Run (starts real engines, so under the shared lock):
``flock /tmp/kvbm-heavy.lock python bench/soak_storage.py [--requests 1000] [--seed 0]``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BLOCK = 32
ENGINE_ENV = {  # same settings as tests/conftest.py: both sides identical
    "HF_HUB_OFFLINE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_NUM_OF_RESERVED_CPU": "1",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
WAVE = 16  # requests submitted together
RESET_EVERY = 3  # waves between resets of vLLM's own prefix cache
#: vLLM's own pool (G1). Every request of a wave may sit in an asynchronous kvbm
#: load at once, holding its blocks without running; 48 blocks (3 per request)
#: let vLLM 0.32's scheduler wedge (see _stalled), so give them room for all.
G1_BLOCKS = 128
STALL_STEPS = 5000  # engine steps without a finished request: report and stop


def workload(n: int, seed: int, abort_share: float) -> list[dict]:
    rng = random.Random(seed)
    docs = [[rng.randrange(3, 2000) for _ in range(BLOCK * rng.randint(2, 5))] for _ in range(64)]
    weights = [1.0 / (i + 1) ** 0.6 for i in range(len(docs))]  # a few hot documents, a long tail
    requests = []
    for i in range(n):
        doc = rng.choices(docs, weights)[0]
        tail = [rng.randrange(3, 2000) for _ in range(rng.randint(1, 30))]
        requests.append({
            "id": f"r{i}",
            "prompt": doc + tail,
            "max_tokens": rng.randint(2, 12),
            "abort_at": rng.randint(1, 6) if rng.random() < abort_share else None,
        })
    return requests


# ---- one side, in its own process ------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _accounting(llm) -> dict:
    """kvbm's books at the end: every slot free or evictable, nothing pinned or in flight."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    planner = scheduler.connector._leader.runtime.inspect_planner()
    books: dict = {"busy": planner.busy, "tracked_requests": planner.num_tracked_requests(),
                   "vllm_requests": len(scheduler.requests), "pending_batches": len(planner._pending),
                   "loading": len(planner._loading)}
    for name, pool in (("G2", planner.host), ("G3", planner.disk)):
        states = [pool.state(s).name for s in range(pool.num_slots)]
        refs = sum(pool.refcount(s) for s in range(pool.num_slots))
        free, lru = set(pool._free), set(pool.lru_order())
        consistent = all((s in free) != (s in lru) for s in range(pool.num_slots))
        books[name] = {"slots": pool.num_slots, "used": pool.num_used, "pinned_refs": refs,
                       "pending": states.count("PENDING"), "ready": states.count("READY"),
                       "free": len(free), "free_xor_evictable": consistent,
                       "stored": pool.stats.stored, "evicted": pool.stats.evicted, "dropped": pool.stats.dropped}
    disk = get_kv_transfer_group()._worker.runner.executor.media["G3"].arena
    books["disk_io"] = disk.stats()
    hook = disk._fault_hook
    books["faults_injected"] = dict(hook.injected) if hook is not None else {}
    books["stats"] = planner.stats.as_dict()
    return books


def _stalled(llm) -> dict:
    """What a wedged engine looks like: seen once with a 48-block G1, where every
    block was held by requests whose kvbm loads had finished (or failed) but that
    vLLM's scheduler never promoted: the head of its KV-holding queue could not
    allocate its remaining tokens and nothing was running to free blocks."""
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    planner = scheduler.connector._leader.runtime.inspect_planner() if scheduler.connector is not None else None
    return {
        "requests": {rid: str(r.status) for rid, r in scheduler.requests.items()},
        "finished_recving": sorted(getattr(scheduler, "finished_recving_kv_req_ids", ())),
        "free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
        "kvbm_loading": sorted(planner._loading) if planner else [],
        "kvbm_busy": planner.busy if planner else False,
    }


def run_side(spec_path: str, out_path: str) -> None:
    os.environ.update(ENGINE_ENV)
    from kvbm.platform import prepare_cpu_process

    prepare_cpu_process()
    from vllm import LLM, SamplingParams

    spec = json.loads(Path(spec_path).read_text())
    args = dict(spec["engine"])
    if spec["kvbm"] is not None:
        args["kv_transfer_config"] = {
            "kv_connector": "DynamoConnector", "kv_role": "kv_both",
            "kv_connector_module_path": "kvbm.vllm_integration.connector",
            "kv_connector_extra_config": spec["kvbm"],
        }
    llm = LLM(**args)
    engine = llm.llm_engine
    requests = spec["requests"]
    outputs: dict[str, list[int]] = {}
    aborted: list[str] = []
    rss: list[tuple[int, float]] = []
    started = time.monotonic()
    for w, lo in enumerate(range(0, len(requests), WAVE)):
        wave = requests[lo : lo + WAVE]
        if w % RESET_EVERY == 0:
            llm.reset_prefix_cache()  # idle between waves: G1 hits must now come from kvbm
        for r in wave:
            sp = SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True)
            engine.add_request(r["id"], {"prompt_token_ids": r["prompt"]}, sp)
        abort_at = {r["id"]: r["abort_at"] for r in wave if spec["aborts"] and r["abort_at"] is not None}
        step = idle = 0
        while engine.has_unfinished_requests():
            idle += 1
            for out in engine.step():
                if out.finished:
                    outputs[out.request_id] = list(out.outputs[0].token_ids)
                    idle = 0
            if idle > STALL_STEPS:
                Path(out_path).write_text(json.dumps({"stalled": _stalled(llm)}))
                sys.exit(f"engine made no progress for {STALL_STEPS} steps; state in {out_path}")
            step += 1
            due = [rid for rid, at in abort_at.items() if at == step and rid not in outputs]
            if due:
                engine.abort_request(due)
                aborted.extend(due)
        if w == 0 or (lo + WAVE) % 100 < WAVE or lo + WAVE >= len(requests):
            rss.append((min(lo + WAVE, len(requests)), round(_rss_mb(), 1)))
    connector = engine.engine_core.engine_core.scheduler.connector
    deadline = time.monotonic() + 60
    while connector is not None and connector.has_pending_push_work() and time.monotonic() < deadline:
        engine.step()  # let the last background disk writes report
        time.sleep(0.005)
    result = {"outputs": outputs, "aborted": aborted, "rss_mb": rss, "seconds": time.monotonic() - started}
    if connector is not None:
        result["books"] = _accounting(llm)
    Path(out_path).write_text(json.dumps(result))
    engine.engine_core.shutdown()  # as a server does on exit: kvbm closes and removes its G3 file


# ---- the comparison ---------------------------------------------------------------
def _side(name: str, tmp: Path, spec: dict) -> dict:
    spec_path, out_path, log_path = tmp / f"{name}.spec.json", tmp / f"{name}.out.json", tmp / f"{name}.log"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, **ENGINE_ENV, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    env.update(spec.get("env", {}))
    print(f"# {name}: {len(spec['requests'])} requests ...", flush=True)
    with open(log_path, "w") as log:
        rc = subprocess.run([sys.executable, __file__, "--side", str(spec_path), str(out_path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-40:])
        sys.exit(f"{name} failed (rc={rc}), log {log_path}:\n{tail}")
    return json.loads(out_path.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--abort-share", type=float, default=0.1)
    ap.add_argument("--faults", default="read_error=0.02,read_corrupt=0.02,write_error=0.02,write_corrupt=0.02",
                    help="DYN_KVBM_DISK_FAULT_INJECTION rates (the seed is added)")
    ap.add_argument("--side", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        run_side(*args.side)
        return

    from kvbm.tools.demo.tiny_model import build_model

    model = str(build_model(preset="test"))
    requests = workload(args.requests, args.seed, args.abort_share)
    engine = {"model": model, "block_size": BLOCK, "max_model_len": 512, "enforce_eager": True, "seed": 0,
              "max_num_seqs": 8, "num_gpu_blocks_override": G1_BLOCKS, "dtype": "float32"}
    with tempfile.TemporaryDirectory(prefix="kvbm-soak-") as tmp_dir:
        tmp = Path(tmp_dir)
        kvbm = {"cpu_cache_override_num_blocks": 32, "disk_cache_override_num_blocks": 1024,
                "disable_disk_offload_filter": True, "disk_cache_dir": str(tmp / "g3"),
                "disk_fault_injection": f"{args.faults},seed={args.seed}", "log_summary_secs": 0,
                # The tiny model recomputes faster than G3 loads, so the default cost rule
                # would skip most disk hits; the soak is about serving them.
                "onboard_policy": "always"}
        ref = _side("vllm", tmp, {"engine": engine, "kvbm": None, "requests": requests, "aborts": False})
        got = _side("kvbm", tmp, {"engine": engine, "kvbm": kvbm, "requests": requests, "aborts": True})
        leftovers = sorted(p.name for p in (tmp / "g3").iterdir()) if (tmp / "g3").exists() else []

    done = {rid: toks for rid, toks in got["outputs"].items() if rid not in set(got["aborted"])}
    mismatches = [rid for rid, toks in done.items() if toks != ref["outputs"].get(rid)]
    books = got["books"]
    s = books["stats"]
    print(f"\nrequests {len(requests)}: completed {len(done)}, aborted {len(got['aborted'])} "
          f"(vLLM alone completed {len(ref['outputs'])})")
    print(f"token mismatches vs vLLM alone: {len(mismatches)}" + (f"  {mismatches[:10]}" if mismatches else ""))
    print(f"time: vLLM alone {ref['seconds']:.1f} s, kvbm {got['seconds']:.1f} s")
    print("RSS MB (requests done: MB), kvbm side: " + ", ".join(f"{n}: {mb:.0f}" for n, mb in got["rss_mb"]))
    print("RSS MB, vLLM alone:                   " + ", ".join(f"{n}: {mb:.0f}" for n, mb in ref["rss_mb"]))
    print(f"hits: G2 {s['host_hit_blocks']} blocks, G3 {s['disk_hit_blocks']} blocks; onboarded "
          f"G2 {s['onboarded_host_blocks']}, G3 {s['onboarded_disk_blocks']}; failed loads {s['failed_loads']}, "
          f"bad disk blocks {s['bad_disk_blocks']}, failed stores {s['failed_stores']}, spilled {s['spilled_blocks']}")
    print(f"faults injected: {books['faults_injected']}")
    io = books["disk_io"]
    print(f"disk I/O: {io['blocks_written']:.0f} written, {io['blocks_read']:.0f} read verified; failures: "
          f"write {io['write_failures']:.0f}, read {io['read_failures']:.0f}, checksum {io['checksum_failures']:.0f}, "
          f"mismatch {io['mismatches']:.0f}")
    for tier in ("G2", "G3"):
        b = books[tier]
        print(f"{tier}: {b['slots']} slots, {b['ready']} ready, {b['free']} free, {b['pending']} pending, "
              f"{b['pinned_refs']} pinned refs, free-xor-evictable {b['free_xor_evictable']}; "
              f"stored {b['stored']}, evicted {b['evicted']}, dropped {b['dropped']}")
    print(f"planner: busy {books['busy']}, tracked requests {books['tracked_requests']}, "
          f"pending batches {books['pending_batches']}, loads in flight {books['loading']}; "
          f"vLLM requests left {books['vllm_requests']}")
    print(f"G3 files left after exit: {leftovers or 'none'}")
    leak = (books["busy"] or books["tracked_requests"] or books["pending_batches"] or books["loading"]
            or any(books[t]["pinned_refs"] or books[t]["pending"] or not books[t]["free_xor_evictable"]
                   for t in ("G2", "G3")))
    hits_both = s["host_hit_blocks"] > 0 and s["disk_hit_blocks"] > 0
    faults = sum(books["faults_injected"].values())
    print(f"\nverdict: mismatches {len(mismatches)}, leak {bool(leak)}, hits from G2 and G3 {hits_both}, "
          f"faults injected {faults}")
    if mismatches or leak or not hits_both or leftovers:
        sys.exit(1)


if __name__ == "__main__":
    main()
