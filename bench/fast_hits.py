#!/usr/bin/env python3
"""What a kvbm hit costs, side by side in one run: in-step vs asynchronous loads, the floor,
no reuse at all, and a slow disk with and without the load-or-recompute rule.

    python bench/fast_hits.py                   # all three parts (about 15 minutes on 2 CPU cores)
    python bench/fast_hits.py --parts hits      # one part: hits, no-reuse, slow-tier

* ``hits``: the README demo's workload (LMBenchmark multi-round QA on the local
  demo model, vLLM's pool shrunk below the users' conversations) through vLLM
  alone, vLLM + kvbm with asynchronous loads (``DYN_KVBM_LOAD_MODE=async``),
  vLLM + kvbm as shipped (G2 loads inside the step), the same with in-step
  loads landing layer by layer (``DYN_KVBM_LAYERWISE_LOADS=on``; on CPU each
  layer is copied when its attention asks: nothing overlaps),
  and the floor: vLLM with a pool large enough for everything. The table's "later-turn TTFT vs floor" row
  is what a hit costs beyond a GPU prefix hit.
* ``no-reuse``: no prompt shares a prefix; kvbm can only add work (its stores).
* ``slow-tier``: disk-only kvbm whose G3 reads are slowed by a test-only delay
  (``DYN_KVBM_DISK_FAULT_INJECTION=read_delay_ms=N``), with the rule off
  (``DYN_KVBM_ONBOARD_POLICY=always``: every hit is loaded) and on (``cost``).

Every part prints ``kvbm bench compare``'s table; CSVs, logs and plots go under ``--out``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvbm.tools.bench.cli import report  # noqa: E402
from kvbm.tools.bench.compare import Configuration, builtin_configurations, run_compare  # noqa: E402
from kvbm.tools.bench.workload import WorkloadSpec  # noqa: E402

#: The demo's engine (kvbm/tools/bench/demo.py): 128-token blocks, vLLM's pool shrunk to 5,120 tokens.
ENGINE = ["--block-size", "128", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
          "--num-gpu-blocks-override", "40", "--max-num-seqs", "4"]


def demo_spec(**overrides) -> WorkloadSpec:
    base = {"num_users": 3, "num_rounds": 3, "system_prompt_words": 300, "chat_history_words": 1700,
            "answer_tokens": 16, "qps": 0.3, "duration": None, "max_users": 6, "warmup_users": 6}
    return WorkloadSpec(**{**base, **overrides})


def part_hits(model: str, out: Path) -> None:
    vllm, kvbm, floor = builtin_configurations(["vllm", "kvbm-host", "floor"], 1.0)
    asynchronous = Configuration("kvbm-async", kvbm={"cpu_cache_gb": 1.0, "load_mode": "async"})
    kvbm.name = "kvbm-in-step"
    layered = Configuration("kvbm-layer", kvbm={"cpu_cache_gb": 1.0, "layerwise_loads": "on"})
    outcomes = run_compare(model, [vllm, asynchronous, kvbm, layered, floor], demo_spec(), ENGINE, out / "hits",
                           progress=False)
    report(outcomes, out / "hits", True, "demo model: hits (in-step vs async) and the floor")


def part_no_reuse(model: str, out: Path) -> None:
    # Every user asks once, with a context of its own and no shared system prompt.
    spec = demo_spec(num_rounds=1, system_prompt_words=0, warmup_users=0, max_users=24, qps=0.4)
    outcomes = run_compare(model, builtin_configurations(["vllm", "kvbm-host"], 1.0), spec, ENGINE,
                           out / "no-reuse", progress=False)
    report(outcomes, out / "no-reuse", True, "demo model: no reuse")


def part_slow_tier(model: str, out: Path, delay_ms: float) -> None:
    slow = {"disk_cache_gb": 2.0, "disk_fault_injection": f"read_delay_ms={delay_ms:g}"}
    configs = [
        Configuration("vllm"),
        Configuration("kvbm-slow-g3-always", kvbm={**slow, "onboard_policy": "always", "load_mode": "async"}),
        Configuration("kvbm-slow-g3-cost", kvbm={**slow, "onboard_policy": "cost", "load_mode": "async"}),
    ]
    outcomes = run_compare(model, configs, demo_spec(), ENGINE, out / "slow-tier", progress=False)
    report(outcomes, out / "slow-tier", True, f"demo model: G3 reads slowed by {delay_ms:g} ms per block")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="hits,no-reuse,slow-tier")
    parser.add_argument("--model", default=None, help="model path (default: build the demo preset)")
    parser.add_argument("--out", type=Path, default=Path("out/fast-hits"))
    parser.add_argument("--delay-ms", type=float, default=1000.0, help="slow-tier: added per G3 block read")
    args = parser.parse_args()
    if args.model is None:
        from kvbm.tools.demo.tiny_model import build_model

        args.model = str(build_model(preset="demo"))
    started = time.monotonic()
    parts = {"hits": lambda: part_hits(args.model, args.out),
             "no-reuse": lambda: part_no_reuse(args.model, args.out),
             "slow-tier": lambda: part_slow_tier(args.model, args.out, args.delay_ms)}
    for name in args.parts.split(","):
        print(f"\n===== {name}", flush=True)
        parts[name]()
    print(f"\ntotal {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
