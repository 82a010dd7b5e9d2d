"""``kvbm plan TRACE``: how big should G2 and G3 be for this traffic?"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from kvbm.config import MAX_COUNT, MAX_GB, MAX_SECONDS, KvbmConfig, env_var
from kvbm.core.tiers import LOAD_MODES

logger = logging.getLogger(__name__)

_DEFAULTS = KvbmConfig()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = (
        "traces:\n"
        f"  kvbm's own request log: serve with {env_var('trace_file')}=/path/trace.jsonl (block hashes and lengths,\n"
        "  no text; block size, GPU pool and bytes per block come from its header)\n"
        "  or JSON lines of prompts: {\"prompt\": \"...\"} or {\"prompt_token_ids\": [...]}, optional \"timestamp\",\n"
        "  \"output_tokens\", \"end\"/\"duration\", \"cache_salt\", \"lora\" (needs --model, --gpu-blocks)\n"
        "examples:\n"
        "  kvbm plan /var/log/kvbm-trace.jsonl --model /models/Qwen3-8B\n"
        "  kvbm plan prompts.jsonl --model /models/Qwen3-8B --gpu-blocks 20000 --block-size 16 \\\n"
        "      --prefill-tokens-per-s 12000 --host-gbps 20 --disk-gbps 3"
    )
    parser.add_argument("trace", metavar="TRACE", help="kvbm's request log or a JSONL of prompts")
    g = parser.add_argument_group("model and server")
    g.add_argument("--model", default=None,
                   help="local model directory: its tokenizer (prompt text) and config.json (bytes per block)")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens per KV block (default: the trace's; 16, vLLM's GPU default, for prompt files)")
    g.add_argument("--gpu-blocks", type=int, default=None,
                   help="vLLM's own KV pool in blocks (its log: 'GPU KV cache size: N tokens' / block size); "
                        "default: the trace's")
    g.add_argument("--bytes-per-block", type=int, default=None,
                   help="one KV block's bytes over all ranks (default: the trace's, else from --model)")
    g.add_argument("--kv-dtype", default="auto", help="KV cache dtype for --model sizing (default: the model's)")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's token budget per step: longer prefills are stored in chunks (default: the trace's; "
                        "for prompt files, one step per prefill)")
    g = parser.add_argument_group("sizes")
    g.add_argument("--g2", default=None, metavar="SIZES",
                   help="G2 sizes to try, blocks or GB: e.g. 1000,4000 or 2GB,8GB (default: a log grid up to "
                        "every block of the trace)")
    g.add_argument("--g3", default=None, metavar="SIZES", help="G3 sizes to try (default: a log grid)")
    g.add_argument("--g2-for-g3", default=None, metavar="SIZE",
                   help="G2 size while sweeping G3 (default: the recommended G2)")
    g.add_argument("--host-budget-gb", type=float, default=None,
                   help="most host memory G2 may take; the recommendation stays within it")
    g.add_argument("--points", type=int, default=8, help="sizes per automatic grid (default: %(default)s)")
    g.add_argument("--no-disk", action="store_true", help="do not sweep G3")
    g.add_argument("--filter-decay-secs", type=float, default=_DEFAULTS.disk_offload_filter_decay_secs,
                   help="disk filter decay period, as the server's (default: %(default)s)")
    g.add_argument("--filter-max-entries", type=int, default=_DEFAULTS.disk_offload_filter_max_entries,
                   help="disk filter table bound (default: %(default)s)")
    g.add_argument("--load-mode", choices=sorted(LOAD_MODES), default=None,
                   help=f"the server's {env_var('load_mode')} (default: the trace's, else {_DEFAULTS.load_mode})")
    g = parser.add_argument_group("TTFT estimate (bench/transfer.py and bench/disk.py measure bandwidths)")
    g.add_argument("--prefill-tokens-per-s", type=float, default=None, help="the server's prefill rate")
    g.add_argument("--host-gbps", type=float, default=None, help="G2 -> GPU bandwidth, GB/s")
    g.add_argument("--disk-gbps", type=float, default=None, help="G3 -> GPU bandwidth, GB/s")
    g = parser.add_argument_group("run")
    g.add_argument("--limit", type=int, default=None, help="replay only the first N requests of the trace")
    g.add_argument("--jobs", type=int, default=None, help="processes replaying size points (default: CPUs)")
    g.add_argument("--out", type=Path, default=Path("out/plan"),
                   help="plan.csv, plan.json, plan.png go here (default: %(default)s)")
    g.add_argument("--no-plots", action="store_true", help="skip plan.png")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from kvbm.tools.plan.report import PlanError
    from kvbm.tools.plan.trace import TraceError

    try:
        plan = make_plan(args)
    except (TraceError, PlanError) as e:
        print(f"kvbm plan: error: {e}", file=sys.stderr)
        return 2
    print(plan.summary())
    paths = plan.write_files(args.out, plots=not args.no_plots)
    print(f"\nwrote {', '.join(str(p) for p in paths)}")
    return 0


def _positive(value: float | int | None, flag: str, most: float | None = None) -> None:
    """> 0, finite, and at most ``most``: beyond a sane bound a flag is a typo that would otherwise
    overflow a float or make the replay build pools of billions of blocks."""
    import math

    from kvbm.tools.plan.report import PlanError

    if value is None:
        return
    if not value > 0 or (isinstance(value, float) and not math.isfinite(value)):
        raise PlanError(f"{flag} must be > 0 (and finite), got {value}")
    if most is not None and value > most:
        shown = f"{len(str(value))} digits" if isinstance(value, int) and value > 10**30 else f"{value:g}"
        raise PlanError(f"{flag} {shown} is more than any server has (at most {most:,.0f})")


#: Sizes per automatic grid: each point is a whole replay of the trace.
MAX_POINTS = 64


def make_plan(args: argparse.Namespace):  # -> Plan
    """Read the trace, replay G1 once, sweep G2, then G3 at the chosen G2."""
    from kvbm.tools.plan.report import Plan, PlanError, Rates, bytes_per_block_from_model, grid, parse_sizes
    from kvbm.tools.plan.simulate import ReplaySettings, SizePoint, gpu_pass, replay, sweep
    from kvbm.tools.plan.trace import (
        MAX_BLOCK_SIZE,
        MAX_BYTES_PER_BLOCK,
        MAX_GPU_BLOCKS,
        MAX_REQUEST_TOKENS,
        read_trace,
    )

    bounds = {"block_size": MAX_BLOCK_SIZE, "gpu_blocks": MAX_GPU_BLOCKS, "bytes_per_block": MAX_BYTES_PER_BLOCK,
              "max_num_batched_tokens": MAX_REQUEST_TOKENS, "host_budget_gb": MAX_GB, "points": MAX_POINTS,
              "limit": MAX_COUNT, "jobs": 1024, "filter_decay_secs": MAX_SECONDS, "filter_max_entries": MAX_COUNT,
              "prefill_tokens_per_s": 1e12, "host_gbps": 1e6, "disk_gbps": 1e6}
    for flag, most in bounds.items():
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"), most)
    progress = False if args.no_progress else None
    started = time.perf_counter()
    trace = read_trace(args.trace, model=args.model, block_size=args.block_size, limit=args.limit,
                       progress=progress)
    read_s = time.perf_counter() - started
    bs = trace.block_size
    gpu_blocks = args.gpu_blocks or trace.gpu_blocks
    if not gpu_blocks:
        raise PlanError("how large is vLLM's own KV pool? pass --gpu-blocks N (vLLM logs 'GPU KV cache size: "
                        "T tokens'; N = T / block size). kvbm's own trace records it")
    bpb = args.bytes_per_block or trace.bytes_per_block
    if not bpb and args.model:
        bpb = bytes_per_block_from_model(args.model, bs, args.kv_dtype)
        if bpb > MAX_BYTES_PER_BLOCK:
            raise PlanError(f"{args.model}/config.json gives {bpb:,} bytes per block, more than any model has; "
                            "pass --bytes-per-block")
    if not bpb:
        logger.warning("no --model or --bytes-per-block: sizes are given in blocks only")

    gpu = gpu_pass(trace, gpu_blocks)
    everything = max(1, trace.num_block_ids)
    settings = ReplaySettings(args.filter_decay_secs, args.filter_max_entries,
                              args.load_mode or trace.load_mode or _DEFAULTS.load_mode,
                              args.max_num_batched_tokens or trace.max_num_batched_tokens)
    jobs = args.jobs or os.cpu_count() or 1
    plan_notes: list[str] = []
    budget = int(args.host_budget_gb * 1e9 // bpb) if args.host_budget_gb and bpb else None
    if args.host_budget_gb and not bpb:
        raise PlanError("--host-budget-gb needs --model or --bytes-per-block")
    # G2 starts to help around the size of vLLM's own pool (a smaller one holds little the pool does not).
    lowest = min(max(1, gpu_blocks // 2), everything)
    host_sizes = parse_sizes(args.g2, bpb, "--g2") if args.g2 else grid(lowest, everything, args.points)
    if trace.host_blocks and not args.g2:
        host_sizes = sorted(set(host_sizes) | {trace.host_blocks})  # what the server had, for comparison
    if budget:
        host_sizes = sorted({s for s in host_sizes if s <= budget} | {budget})
    host_sizes = _within(host_sizes, everything, "G2", plan_notes)  # after the budget: it may be huge
    baseline = replay(trace, gpu, SizePoint(0))
    replay_started = time.perf_counter()
    host_sweep = sweep(trace, gpu, [SizePoint(s) for s in host_sizes], settings, jobs, progress, "G2 sizes")
    plan = Plan(trace_path=str(args.trace), requests=len(trace.requests), prompt_tokens=trace.prompt_tokens,
                block_size=bs, gpu_blocks=gpu_blocks, bytes_per_block=bpb, baseline=baseline,
                host_sweep=host_sweep, rates=Rates(args.prefill_tokens_per_s, args.host_gbps, args.disk_gbps),
                gpu_shortfall=gpu.shortfall, notes=list(trace.notes) + plan_notes)
    rec = plan.recommended_host()
    if rec is not None and not args.g2:
        # Sharpen the recommendation: a few more sizes between it and the grid point below.
        i = host_sizes.index(rec.host_blocks)
        extra = [s for s in grid(host_sizes[i - 1], host_sizes[i], 5)[1:-1] if s not in host_sizes] if i else []
        if extra:
            more = sweep(trace, gpu, [SizePoint(s) for s in extra], settings, jobs, progress, "G2 refine")
            plan.host_sweep = sorted(plan.host_sweep + more, key=lambda r: r.host_blocks)
    if not args.no_disk:
        if args.g2_for_g3:
            host_for_disk = _within(parse_sizes(args.g2_for_g3, bpb, "--g2-for-g3"), everything, "G2",
                                    plan.notes)[0]
        else:
            rec = plan.recommended_host()
            host_for_disk = rec.host_blocks if rec is not None else None
        if host_for_disk is not None:
            disk_sizes = parse_sizes(args.g3, bpb, "--g3") if args.g3 else grid(lowest, everything, args.points)
            disk_sizes = _within(disk_sizes, everything, "G3", plan.notes)
            points = [SizePoint(host_for_disk, s, f) for f in (True, False) for s in disk_sizes]
            plan.disk_sweep = sweep(trace, gpu, points, settings, jobs, progress, "G3 sizes")
            plan.host_for_disk = host_for_disk
    if trace.host_blocks is not None:
        plan.notes.append(f"the server that wrote the trace had G2 {plan.size(trace.host_blocks)}, "
                          f"G3 {plan.size(trace.disk_blocks or 0)}")
    points = plan.host_sweep + plan.disk_sweep
    mean_s = sum(r.seconds for r in points) / len(points)
    plan.notes.append(
        f"read the trace in {read_s:.1f}s; replayed {len(points)} size points of {len(trace.requests):,} requests "
        f"in {time.perf_counter() - replay_started:.1f}s on {min(jobs, len(points))} process(es), "
        f"{mean_s:.1f}s per point ({len(trace.requests) / max(mean_s, 1e-9):,.0f} requests/s)")
    return plan


def _within(sizes: list[int], everything: int, tier: str, notes: list[str]) -> list[int]:
    """Sizes above every distinct block of the trace replay as that many: a larger tier holds
    nothing more, and the replay would only allocate the slots (``--g2 1000000000``: gigabytes)."""
    if sizes and sizes[-1] > everything:
        notes.append(f"{tier} sizes above {everything:,} blocks (every distinct block of the trace) replay as "
                     f"{everything:,}: a larger {tier} holds nothing more")
        return sorted({min(s, everything) for s in sizes})
    return sizes
