"""``kvbm bench run`` and ``kvbm bench compare``.

Kept import-light (argparse only at module level) because ``kvbm --help``
builds every subcommand's parser; aiohttp, tqdm and matplotlib load only when
a benchmark actually runs.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import time
from pathlib import Path

from kvbm.config import PREFIX, env_var

logger = logging.getLogger(__name__)


def add_workload_arguments(parser: argparse.ArgumentParser, **defaults: object) -> None:
    """LMBenchmark's multi-round QA knobs, under its own option names where it has them."""
    d = {"num_users": 15, "num_rounds": 20, "system_prompt": 1000, "chat_history": 20000, "answer_len": 100,
         "qps": 1.0, "time": 100.0, "max_users": None, "warmup_users": 20, **defaults}
    g = parser.add_argument_group("workload (LMBenchmark synthetic multi-round QA)")
    g.add_argument("--num-users", type=int, default=d["num_users"], help="users active at once (default: %(default)s)")
    g.add_argument("--num-rounds", type=int, default=d["num_rounds"],
                   help="questions per user session (default: %(default)s)")
    g.add_argument("--system-prompt", type=int, default=d["system_prompt"], metavar="WORDS",
                   help="shared system prompt length in words (default: %(default)s)")
    g.add_argument("--chat-history", type=int, default=d["chat_history"], metavar="WORDS",
                   help="per-user context at the start of each conversation, in words (default: %(default)s)")
    g.add_argument("--answer-len", type=int, default=d["answer_len"], metavar="TOKENS",
                   help="tokens generated per answer (default: %(default)s)")
    g.add_argument("--qps", type=float, default=d["qps"], help="overall request rate (default: %(default)s)")
    g.add_argument("--time", type=float, default=d["time"], metavar="SECONDS",
                   help="launch requests for this long; in-flight ones are awaited (default: %(default)s; "
                        "0 = no limit, needs --max-users)")
    g.add_argument("--max-users", type=int, default=d["max_users"],
                   help="stop admitting users after this many sessions (default: no limit, until --time)")
    g.add_argument("--warmup-users", type=int, default=d["warmup_users"],
                   help="users whose conversation openings are sent before the measured run (default: %(default)s)")
    g.add_argument("--warmup-qps", type=float, default=2.0, help="warm-up launch rate (default: %(default)s)")
    g.add_argument("--init-user-id", type=int, default=1, help="first user id (default: %(default)s)")
    g.add_argument("--filler", choices=("varied", "hi"), default="varied",
                   help="prompt words: varied common words, or LMBenchmark's repeated 'hi' (default: %(default)s)")
    g.add_argument("--api", choices=("completions", "chat"), default="completions",
                   help="OpenAI endpoint; completions renders the chat as LMBenchmark does (default: %(default)s)")
    g.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask the server for exactly --answer-len tokens (vLLM's ignore_eos; default: on)")
    g.add_argument("--seed", type=int, default=0, help="seed of the prompt words (default: %(default)s)")
    g.add_argument("--no-reuse", action="store_true",
                   help="no prompt shares a prefix: one question per user, no shared system prompt, no warm-up "
                        "(what kvbm costs when it cannot help)")


def spec_from_args(args: argparse.Namespace):  # -> WorkloadSpec (import kept lazy)
    from kvbm.tools.bench.workload import WorkloadSpec

    no_reuse = getattr(args, "no_reuse", False)
    return WorkloadSpec(
        num_users=args.num_users, num_rounds=1 if no_reuse else args.num_rounds,
        system_prompt_words=0 if no_reuse else args.system_prompt,
        chat_history_words=args.chat_history, answer_tokens=args.answer_len, qps=args.qps,
        duration=args.time or None, max_users=args.max_users, warmup_users=0 if no_reuse else args.warmup_users,
        warmup_qps=args.warmup_qps, init_user_id=args.init_user_id, filler=args.filler, api=args.api,
        ignore_eos=args.ignore_eos, seed=args.seed,
    )


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    """Server-side options of ``bench compare`` (shared with ``kvbm demo``)."""
    g = parser.add_argument_group("servers (identical for every configuration)")
    g.add_argument("--vllm-args", action="append", default=[], metavar="'ARGS'",
                   help="vLLM arguments for every configuration, as one quoted string; write "
                        "--vllm-args='--max-model-len 8192' (repeatable)")
    g.add_argument("--gpu-blocks", type=int, default=None,
                   help="shrink vLLM's own KV pool to this many blocks (--num-gpu-blocks-override), so the "
                        "users' histories overflow it as on a busy server")
    g.add_argument("--env", action="append", default=[], metavar="VAR=VALUE",
                   help="environment variable for every server (repeatable)")
    g.add_argument("--out", type=Path, default=None, help="CSVs, server logs, plots and summary.json go here")
    g.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    g.add_argument("--startup-timeout", type=float, default=900.0,
                   help="seconds to wait for each server (default: %(default)s)")


def configure(parser: argparse.ArgumentParser) -> None:
    """``kvbm bench`` with its ``run`` and ``compare`` subcommands."""
    subs = parser.add_subparsers(dest="bench_command", metavar="{run,compare}", required=True)
    run = subs.add_parser(
        "run", help="run LMBenchmark's multi-round QA against an OpenAI-compatible server; CSV and summary",
        description="Multi-user, multi-round chat against URL with streamed completions (LMBenchmark's synthetic "
                    "multi-round QA). Writes LMBenchmark's CSV and prints TTFT and throughput.",
    )
    run.add_argument("url", metavar="URL", help="server base URL, e.g. http://localhost:8000")
    run.add_argument("model", metavar="MODEL", help="model name as the server knows it")
    add_workload_arguments(run)
    run.add_argument("--output", type=Path, default=Path("kvbm_bench.csv"),
                     help="CSV of the measured requests (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    compare = subs.add_parser(
        "compare", help="start vLLM alone, vLLM + kvbm (host), vLLM + kvbm (host + disk) in turn; same workload",
        description="Start each configuration in turn on this machine with identical settings, run the same "
                    "warm-up and workload against each, and print one table with ratios to the first "
                    "configuration, plus PNG plots.",
        epilog="examples:\n"
               "  kvbm bench compare Qwen/Qwen3-0.6B --qps 1\n"
               f"  kvbm bench compare MODEL --configs vllm,kvbm-host --config 'g2-16={env_var('cpu_cache_gb')}=16'\n"
               "  kvbm bench compare MODEL --config 'vllm-offload=--kv-offloading-size 8' "
               "--vllm-args='--max-model-len 32768'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_argument("model", metavar="MODEL", help="model name or path, served by each configuration")
    g = compare.add_argument_group("configurations")
    g.add_argument("--configs", default="vllm,kvbm-host,kvbm-host+disk",
                   help="built-in configurations to run, first is the baseline: vllm, kvbm-host, kvbm-host+disk, "
                        "floor (vLLM with its whole KV pool: what a hit costs when everything fits on the GPU) "
                        "(default: %(default)s; '' for none)")
    g.add_argument("--config", action="append", default=[], metavar="NAME=ARGS",
                   help="add a configuration: vLLM arguments and VAR=VALUE environment words; any "
                        f"{PREFIX}* variable attaches kvbm (repeatable)")
    g.add_argument("--cpu-cache-gb", type=float, default=4.0,
                   help="kvbm host tier (G2) for the kvbm configurations (default: %(default)s)")
    g.add_argument("--disk-cache-gb", type=float, default=None,
                   help="kvbm disk tier (G3) for kvbm-host+disk (default: twice --cpu-cache-gb)")
    g.add_argument("--disk-dir", default=None,
                   help="where the disk tier's files go (default: a temporary directory, removed after)")
    add_compare_arguments(compare)
    add_workload_arguments(compare)
    compare.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    if args.bench_command == "run":
        return _run_run(args)
    return _run_compare(args)


def _run_run(args: argparse.Namespace) -> int:
    from kvbm.tools.bench.workload import format_summary, run_benchmark

    spec = spec_from_args(args)
    print(f"kvbm bench: {spec.describe()} against {args.url}", flush=True)
    _, result = run_benchmark(args.url, args.model, spec, progress=False if args.no_progress else None)
    result.write_csv(args.output)
    summary = result.summary()
    print(format_summary(summary))
    if result.errors:
        print(f"{len(result.errors)} requests failed, e.g. {result.errors[0]}")
    print(f"CSV: {args.output}")
    return 0 if summary["requests"] else 1


def engine_args_from(args: argparse.Namespace) -> list[str]:
    """The vLLM arguments every configuration gets."""
    extra = [word for text in args.vllm_args for word in shlex.split(text)]
    if args.gpu_blocks:
        extra += ["--num-gpu-blocks-override", str(args.gpu_blocks)]
    return extra


def env_from(args: argparse.Namespace) -> dict[str, str]:
    env = {}
    for item in args.env:
        var, eq, value = item.partition("=")
        if not eq:
            raise SystemExit(f"--env {item!r}: expected VAR=VALUE")
        env[var] = value
    return env


def report(outcomes: list, out_dir: Path, plots: bool, title: str) -> list[Path]:
    """Print the table and write the plots; return the plot paths."""
    from kvbm.tools.bench.compare import format_table, write_plots

    print()
    print(format_table(outcomes))
    paths = write_plots(outcomes, out_dir, title) if plots else []
    print(f"\nCSVs, server logs and summary.json: {out_dir}")
    for path in paths:
        print(f"plot: {path}")
    return paths


def _run_compare(args: argparse.Namespace) -> int:
    from kvbm.config import ConfigError
    from kvbm.tools.bench.compare import Configuration, builtin_configurations, preflight, run_compare

    started = time.monotonic()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    try:
        configs = builtin_configurations(names, args.cpu_cache_gb, args.disk_cache_gb, args.disk_dir)
        configs += [Configuration.parse(text) for text in args.config]
    except ValueError as exc:
        raise SystemExit(f"kvbm bench compare: {exc}") from None
    if not configs:
        raise SystemExit("kvbm bench compare: no configuration to run (--configs and --config are both empty)")
    if len({c.name for c in configs}) != len(configs):
        raise SystemExit("kvbm bench compare: configuration names must be distinct")
    spec = spec_from_args(args)
    out_dir = args.out or Path("out") / "bench"
    try:
        preflight(args.model, configs, engine_args_from(args), env_from(args))
    except ConfigError as exc:
        print(f"kvbm bench compare: error: {exc}", file=sys.stderr)
        return 2
    print(f"kvbm bench compare: {', '.join(c.name for c in configs)}\n  workload: {spec.describe()}", flush=True)
    outcomes = run_compare(args.model, configs, spec, engine_args_from(args), out_dir, env_from(args),
                           progress=False if args.no_progress else None, startup_timeout=args.startup_timeout)
    model_name = Path(args.model).name if Path(args.model).exists() else args.model
    report(outcomes, out_dir, not args.no_plots, f"{model_name}, {spec.num_users} users, {spec.qps:g} QPS")
    print(f"total {time.monotonic() - started:.0f}s")
    return 0 if all(o.result is not None for o in outcomes) else 1
