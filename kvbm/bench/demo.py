"""The README's main job: vLLM alone vs vLLM + kvbm on a locally built model.

Sized for a small CPU machine: prompts of ~2K tokens take about a second to
prefill, and vLLM's own KV pool holds only a couple of users' conversations,
so every round evicts the others' KV from G1; kvbm keeps it in G2.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from kvbm.bench.compare import Configuration, format_table, run_compare
from kvbm.bench.workload import WorkloadSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=6, help="conversations (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="questions per user (default: %(default)s)")
    parser.add_argument("--history-words", type=int, default=600, help="initial history per user")
    parser.add_argument("--system-words", type=int, default=300, help="shared system prompt length")
    parser.add_argument("--gpu-blocks", type=int, default=40,
                        help="vLLM's own KV pool in blocks of 128 tokens (default: %(default)s)")
    parser.add_argument("--cpu-cache-gb", type=float, default=1.0, help="kvbm host tier (default: %(default)s)")
    parser.add_argument("--preset", default="demo", help="local model preset (default: %(default)s)")
    parser.add_argument("--model", default=None, help="use this model path instead of building one")
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="CSV and server logs go here")


def run(args: argparse.Namespace) -> int:
    from kvbm.demo.tiny_model import build_model

    started = time.monotonic()
    model = args.model or str(build_model(preset=args.preset))
    spec = WorkloadSpec(users=args.users, rounds=args.rounds, system_prompt_words=args.system_words,
                        history_words=args.history_words, question_words=30, answer_tokens=16)
    engine_args = ["--block-size", "128", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
                   "--num-gpu-blocks-override", str(args.gpu_blocks), "--max-num-seqs", "4"]
    configs = [
        Configuration("vllm"),
        Configuration("vllm+kvbm", kvbm={"cpu_cache_gb": args.cpu_cache_gb}),
    ]
    outcomes = run_compare(model, configs, spec, engine_args, args.out)
    print()
    print(format_table(outcomes))
    base, kvbm = (o.result.summary()["ttft_mean"] for o in outcomes)
    print(f"\nmean TTFT with kvbm is {kvbm / base:.2f}x vLLM alone; "
          f"CSVs and logs in {args.out}; total {time.monotonic() - started:.0f}s")
    return 0
