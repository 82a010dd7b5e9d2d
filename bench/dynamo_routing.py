"""Routing multi-turn chats across two kvbm workers behind NVIDIA Dynamo: who finds the cached prefix?

Three fleets, run one after the other on the same workload (two ``dynamo.vllm`` workers with kvbm,
vLLM's own pool too small to keep the conversations, kvbm's G2 large enough for all of them):

* ``round-robin``       Dynamo's frontend with ``--router-mode round-robin``;
* ``kv, vLLM events``   ``--router-mode kv``, kvbm's tier events off (``DYN_KVBM_KV_EVENTS=0``): the router
                        sees only what vLLM's G1 holds;
* ``kv, kvbm events``   ``--router-mode kv`` with kvbm's G2 events (the default).

For the turns after the first it prints the time to first token (streamed), the share of turns sent to a
worker that had served the conversation before (whose G2 holds its prefix: a local load instead of a
prefill), and the share of their prompt tokens the router counted as cached. Ratios are side by side from
one run; absolute times depend on the machine. Needs the Dynamo environment (scripts/setup_dynamo.sh).

    .venv-dynamo/bin/python bench/dynamo_routing.py [--preset demo] [--conversations 8] [--turns 4]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from kvbm.tools.demo.tiny_model import build_model  # noqa: E402
from kvbm.tools.fleet import DynamoFleet, Worker  # noqa: E402

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu").split()
CACHED = "dynamo_component_router_kv_selected_cached_prefix_tokens_total"


def stream_ttft(fleet: DynamoFleet, messages: list[dict], max_tokens: int) -> tuple[float, str, int]:
    """(seconds to the first content chunk, reply text, serving worker id)."""
    body = {"model": fleet.model, "messages": messages, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "nvext": {"extra_fields": ["worker_id"]}}
    request = urllib.request.Request(f"{fleet.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    text, worker = [], None
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or ():
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    first = first or time.perf_counter()
                    text.append(piece)
            ids = (chunk.get("nvext") or {}).get("worker_id")
            if ids:
                worker = ids.get("decode_worker_id")
    return (first or time.perf_counter()) - start, "".join(text), worker


def run(label: str, args: argparse.Namespace, model: str, router_mode: str, kvbm_events: bool) -> dict:
    env = {"DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "512", "DYN_KVBM_LOG_SUMMARY_SECS": "0",
           "DYN_KVBM_KV_EVENTS": "1" if kvbm_events else "0"}
    workers = [Worker(args=["--max-model-len", str(args.max_model_len), "--num-gpu-blocks-override",
                            str(args.g1_blocks)], env=env) for _ in range(2)]
    common = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
              "VLLM_CPU_OMP_THREADS_BIND": "nobind", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="kvbm-dynamo-bench-") as tmp, \
            DynamoFleet(sys.executable, model, Path(tmp), workers, router_mode=router_mode, env=common) as fleet:
        fleet.start()
        fleet.wait_ready(timeout=1200)
        rng = random.Random(args.seed)
        convs = [[{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(args.words))}]
                 for _ in range(args.conversations)]
        served: list[set] = [set() for _ in convs]
        ttft, home = [], 0
        cached_before = None
        for turn in range(args.turns):
            if turn == 1:
                cached_before = fleet.metrics().get(CACHED, 0.0)
            for i, conv in enumerate(convs):
                if turn:
                    conv.append({"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(30))})
                seconds, reply, worker = stream_ttft(fleet, conv, args.max_tokens)
                conv.append({"role": "assistant", "content": reply})
                if turn:
                    ttft.append(seconds)
                    home += worker in served[i]
                served[i].add(worker)
        cached = fleet.metrics().get(CACHED, 0.0) - (cached_before or 0.0)
        later = len(ttft)
        return {"label": label, "ttft_mean": statistics.mean(ttft), "ttft_p50": statistics.median(ttft),
                "home_share": home / later, "cached_tokens_per_turn": cached / later}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="demo", help="kvbm.tools.demo.tiny_model preset [demo]")
    parser.add_argument("--conversations", type=int, default=7,
                        help="an odd count: round-robin then moves a conversation between workers each turn")
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--words", type=int, default=300, help="words of a conversation's first message")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--g1-blocks", type=int, default=25, help="vLLM's own KV pool per worker (blocks)")
    parser.add_argument("--max-model-len", type=int, default=3072)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    model = str(build_model(preset=args.preset))
    results = [run("round-robin", args, model, "round-robin", True),
               run("kv, vLLM events", args, model, "kv", False),
               run("kv, kvbm events", args, model, "kv", True)]
    base = results[0]["ttft_mean"]
    print(f"{args.conversations} conversations x {args.turns} turns, 2 workers, G1 {args.g1_blocks} blocks each; "
          f"later turns ({args.conversations * (args.turns - 1)}):")
    print(f"{'fleet':<18} {'TTFT mean':>10} {'TTFT p50':>9} {'vs RR':>6} {'to a holder':>12} "
          f"{'router-cached tok/turn':>23}")
    for r in results:
        print(f"{r['label']:<18} {r['ttft_mean'] * 1000:>8.0f}ms {r['ttft_p50'] * 1000:>7.0f}ms "
              f"{r['ttft_mean'] / base:>6.2f} {r['home_share']:>12.0%} {r['cached_tokens_per_turn']:>23.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
