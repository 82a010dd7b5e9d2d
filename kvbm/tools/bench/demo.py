"""The README's main job: vLLM alone vs vLLM + kvbm on a locally built model.

It is ``kvbm bench compare`` with settings sized for a small CPU machine:
the "demo" model prefills a couple of thousand tokens in about a second on
two cores, and vLLM's own KV pool is shrunk to 40 blocks (5,120 tokens), less
than the active users' conversations, so between two questions of one user
the others' requests evict its KV from vLLM's pool; kvbm keeps it in host
memory (G2) and loads it back instead of recomputing it. The workload is
LMBenchmark's multi-round QA scaled down: bounded by a number of users rather
than a duration so both sides answer the same requests, and at a rate vLLM
alone sustains on 2 cores, so its TTFT is prefill rather than queueing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-users", type=int, default=3, help="users active at once (default: %(default)s)")
    parser.add_argument("--num-rounds", type=int, default=3, help="questions per user (default: %(default)s)")
    parser.add_argument("--max-users", type=int, default=6, help="user sessions in all (default: %(default)s)")
    parser.add_argument("--qps", type=float, default=0.3, help="overall request rate (default: %(default)s)")
    parser.add_argument("--system-prompt", type=int, default=300, metavar="WORDS",
                        help="shared system prompt, in words (~1 token each) (default: %(default)s)")
    parser.add_argument("--chat-history", type=int, default=1700, metavar="WORDS",
                        help="per-user context, in words (default: %(default)s)")
    parser.add_argument("--answer-len", type=int, default=16, metavar="TOKENS",
                        help="tokens per answer (default: %(default)s)")
    parser.add_argument("--warmup-users", type=int, default=6,
                        help="users whose conversation openings are sent before the run (default: %(default)s)")
    parser.add_argument("--gpu-blocks", type=int, default=40,
                        help="vLLM's own KV pool in blocks of 128 tokens (default: %(default)s)")
    parser.add_argument("--cpu-cache-gb", type=float, default=1.0, help="kvbm host tier (default: %(default)s)")
    parser.add_argument("--disk", action="store_true",
                        help="also run vLLM + kvbm with host and disk tiers (adds about a minute)")
    parser.add_argument("--preset", default="demo", help="local model preset (default: %(default)s)")
    parser.add_argument("--model", default=None, help="use this model path instead of building one")
    parser.add_argument("--out", type=Path, default=Path("out/demo"),
                        help="CSVs, server logs and plots go here (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvbm.config import ConfigError
    from kvbm.tools.bench.cli import report
    from kvbm.tools.bench.compare import builtin_configurations, preflight, run_compare
    from kvbm.tools.bench.workload import WorkloadSpec
    from kvbm.tools.demo.tiny_model import build_model

    started = time.monotonic()
    names = ["vllm", "kvbm-host"] + (["kvbm-host+disk"] if args.disk else [])
    configs = builtin_configurations(names, args.cpu_cache_gb)
    try:  # before building the model and starting vLLM: a bad setting is one line, at once
        preflight(args.model or "MODEL", configs, [])
    except ConfigError as exc:
        print(f"kvbm demo: error: {exc}", file=sys.stderr)
        return 2
    model = args.model or str(build_model(preset=args.preset))
    spec = WorkloadSpec(
        num_users=args.num_users, num_rounds=args.num_rounds, system_prompt_words=args.system_prompt,
        chat_history_words=args.chat_history, answer_tokens=args.answer_len, qps=args.qps, duration=None,
        max_users=args.max_users, warmup_users=args.warmup_users,
    )
    engine_args = ["--block-size", "128", "--max-model-len", "4096", "--enforce-eager", "--seed", "0",
                   "--num-gpu-blocks-override", str(args.gpu_blocks), "--max-num-seqs", "4"]
    print(f"kvbm demo: {', '.join(names)} on {model}\n  workload: {spec.describe()}", flush=True)
    outcomes = run_compare(model, configs, spec, engine_args, args.out,
                           progress=False if args.no_progress else None)
    report(outcomes, args.out, True, f"demo model, {spec.num_users} users, {spec.qps:g} QPS")
    if all(o.result is not None for o in outcomes):
        base = outcomes[0].result.summary()["ttft_mean"]
        kvbm = outcomes[1].result.summary()["ttft_mean"]
        print(f"\nmean TTFT with kvbm is {kvbm / base:.2f}x vLLM alone ({kvbm:.3f}s vs {base:.3f}s); "
              f"total {time.monotonic() - started:.0f}s")
        return 0
    print(f"\nsome configurations failed; see the logs in {args.out}; total {time.monotonic() - started:.0f}s")
    return 1
