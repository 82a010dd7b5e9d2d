"""Does ``kvbm plan`` predict what kvbm really does? Predicted vs measured hit rates, side by side.

For each workload shape, at three G2 sizes and one G2+G3 size: start real vLLM + kvbm (``kvbm serve``, CPU) with
``DYN_KVBM_TRACE_FILE`` set, run the workload, read kvbm's hit counters from its /metrics and vLLM's
prompt-token sources from vLLM's /metrics (both cover everything the server saw, warm-up included,
as does the trace), stop the server; then replay the trace that server wrote through ``kvbm plan``'s
simulator at the same sizes. The goal: predicted within 3 percentage points of measured at each size.

Shapes:
* chat: the README demo (``kvbm demo``): LMBenchmark's multi-round chat, 3 users at a time, 6 in all,
  3 rounds, ~2,100-token conversations, vLLM's pool shrunk to 40 blocks of 128 tokens.
* documents: RAG-like: 16 shared ~660-token documents picked with Zipf popularity, one new question
  each, single round, 60 requests.

Each server run takes the heavy-run lock (``--lock``) on its own, so other agents' vLLM runs interleave;
do not wrap this script in ``flock`` on the same lock. ``--replay-only`` re-reads the traces and
measurements of an earlier run (``--out``) and only replays them.

    PYTHONPATH=$PWD .venv/bin/python bench/plan_validate.py [--shapes chat,documents] [--out out/plan_validate]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvbm.config import env_var  # noqa: E402
from kvbm.tools.bench.server import VllmServer, free_port, parse_samples, scrape  # noqa: E402
from kvbm.tools.bench.workload import OpenAIStreamClient, WorkloadSpec, filler_text, run_benchmark  # noqa: E402
from kvbm.tools.plan.simulate import ReplaySettings, SizePoint, gpu_pass, replay  # noqa: E402
from kvbm.tools.plan.trace import read_trace  # noqa: E402

GPU_BLOCKS = 40
ENGINE_ARGS = ["--enable-prefix-caching", "--block-size", "128", "--max-model-len", "4096", "--enforce-eager",
               "--seed", "0", "--num-gpu-blocks-override", str(GPU_BLOCKS), "--max-num-seqs", "4"]
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
       env_var("log_summary_secs"): "0"}
#: G2 sizes (blocks) per shape: below, around and above the knee of each shape's curve; then G2+G3
#: (disk filter on) at the smallest.
SIZES = {"chat": ["50", "70", "100", "50+80"], "documents": ["44", "52", "72", "44+60"]}


# ---- workloads --------------------------------------------------------------------------


def run_chat(url: str, model: str) -> int:
    """kvbm demo's workload, exactly (see kvbm/tools/bench/demo.py)."""
    spec = WorkloadSpec(num_users=3, num_rounds=3, system_prompt_words=300, chat_history_words=1700,
                        answer_tokens=16, qps=0.3, duration=None, max_users=6, warmup_users=6)
    warm, result = run_benchmark(url, model, spec, progress=False)
    errors = warm.errors + result.errors
    if errors:
        raise RuntimeError(f"{len(errors)} request(s) failed, e.g. {errors[0]}")
    return len(warm.records) + len(result.records)


def run_documents(url: str, model: str, *, docs: int = 16, words: int = 660, requests: int = 60,
                  qps: float = 0.6, answer: int = 8, seed: int = 0) -> int:
    """Shared documents with Zipf popularity, each request one document plus a new question."""
    texts = [filler_text(words, f"{seed}:doc:{d}") for d in range(docs)]
    rng = random.Random(seed)
    picks = rng.choices(range(docs), weights=[1 / (d + 1) for d in range(docs)], k=requests)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        async with OpenAIStreamClient(url, model) as client:

            async def one(i: int, doc: int) -> None:
                await asyncio.sleep(max(0.0, t0 + i / qps - loop.time()))
                content = f"Read this document: {texts[doc]}\nQuestion {i}: what does it say about {i % 7} things?"
                await client.ask([{"role": "user", "content": content}], answer)

            await asyncio.gather(*(one(i, d) for i, d in enumerate(picks)))
        return requests

    return asyncio.run(main())


WORKLOADS = {"chat": run_chat, "documents": run_documents}


# ---- one measured run -------------------------------------------------------------------


@contextlib.contextmanager
def heavy_lock(path: str) -> Iterator[None]:
    """The shared lock that serializes vLLM runs on this machine ('' for none)."""
    if not path:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _totals(text: str | None) -> dict[str, float]:
    values: dict[str, float] = {}
    for name, labels, value in parse_samples(text or ""):
        key = f"{name}{{source={labels['source']}}}" if "source" in labels else name
        values[key] = values.get(key, 0.0) + value
    return values


def run_name(shape: str, g2_blocks: int, g3_blocks: int = 0) -> str:
    return f"{shape}-g2-{g2_blocks}" + (f"-g3-{g3_blocks}" if g3_blocks else "")


def measure(shape: str, g2_blocks: int, g3_blocks: int, model: str, out: Path, lock: str) -> dict:
    """Serve the shape with kvbm at these sizes and a trace on; kvbm's and vLLM's counters at the end."""
    name = run_name(shape, g2_blocks, g3_blocks)
    trace = out / f"{name}.trace.jsonl"
    trace.unlink(missing_ok=True)
    port = free_port()
    env = {**ENV, env_var("metrics"): "1", env_var("metrics_port"): str(port), env_var("metrics_host"): "127.0.0.1"}
    kvbm = {"cpu_cache_override_num_blocks": g2_blocks, "trace_file": str(trace)}
    if g3_blocks:
        disk_dir = out / f"{name}.g3"
        disk_dir.mkdir(exist_ok=True)
        kvbm.update(disk_cache_override_num_blocks=g3_blocks, disk_cache_dir=str(disk_dir))
    server = VllmServer(model, ENGINE_ARGS, env=env, log_path=out / f"{name}.server.log", kvbm_extra_config=kvbm)
    with heavy_lock(lock):
        started = time.monotonic()
        print(f"[{name}] serving ...", flush=True)
        try:
            server.start(timeout=900)
            sent = WORKLOADS[shape](server.url, server.model)
            counters = _totals(scrape(f"http://127.0.0.1:{port}/metrics"))
            vllm = _totals(server.metrics_text())
        finally:
            server.stop()
    sources = {s: vllm.get(f"vllm:prompt_tokens_by_source_total{{source={s}}}", 0.0)
               for s in ("local_compute", "local_cache_hit", "external_kv_transfer")}
    total = sum(sources.values()) or 1.0
    looked = counters.get("kvbm_lookup_blocks_total", 0.0)
    host_hits = counters.get("kvbm_host_hit_blocks_total", 0.0)
    disk_hits = counters.get("kvbm_disk_hit_blocks_total", 0.0)
    measured = {
        "shape": shape, "g2_blocks": g2_blocks, "g3_blocks": g3_blocks, "requests": sent, "trace": trace.name,
        "seconds": time.monotonic() - started, "host_hit_blocks": host_hits, "disk_hit_blocks": disk_hits,
        "looked_up_blocks": looked, "host_hit_rate": host_hits / looked if looked else 0.0,
        "disk_hit_rate": disk_hits / looked if looked else 0.0,
        "g1_share": sources["local_cache_hit"] / total, "kvbm_share": sources["external_kv_transfer"] / total,
        "computed_share": sources["local_compute"] / total, "prompt_tokens": total,
    }
    (out / f"{name}.measured.json").write_text(json.dumps(measured, indent=2) + "\n")
    print(f"[{name}] {sent} requests in {measured['seconds']:.0f}s", flush=True)
    return measured


def predict(measured: dict, out: Path) -> dict:
    """Replay the run's own trace with kvbm plan's simulator at the run's sizes."""
    trace = read_trace(out / measured["trace"], progress=False)
    point = SizePoint(measured["g2_blocks"], measured.get("g3_blocks", 0))
    settings = ReplaySettings(load_mode=trace.load_mode or "auto", chunk_tokens=trace.max_num_batched_tokens)
    served: list[tuple[int, int]] = []
    result = replay(trace, gpu_pass(trace, trace.gpu_blocks or GPU_BLOCKS), point, settings, served=served)
    f = result.fractions(trace.block_size)
    logged = [r.served for r in trace.requests]
    same = sum(a == b for a, b in zip(logged, served)) if None not in logged else None
    return {"requests": len(trace.requests), "host_hit_rate": result.host_hit_rate,
            "disk_hit_rate": result.disk_hit_rate, "g1_share": f["g1"],
            "kvbm_share": f["g2"] + f["g3"], "computed_share": f["computed"],
            "host_hit_blocks": result.host_hit_blocks, "looked_up_blocks": result.looked_up_blocks,
            "prompt_tokens": result.prompt_tokens, "same_per_request": same}


# ---- report -----------------------------------------------------------------------------


def comparison(rows: list[tuple[dict, dict]]) -> str:
    """One line per run: each quantity measured, predicted and the difference in points."""
    quantities = [("host_hit_rate", "kvbm G2 hit rate"), ("g1_share", "from vLLM cache"),
                  ("kvbm_share", "from kvbm"), ("computed_share", "computed")]
    if any(m.get("g3_blocks") for m, _ in rows):
        quantities.insert(1, ("disk_hit_rate", "kvbm G3 hit rate"))
    head = f"{'shape':<10} {'G2+G3':>7} {'reqs':>5} {'same':>5} "
    head += " ".join(f"{label:>26}" for _, label in quantities)
    sub = f"{'':<10} {'blocks':>7} {'':>5} {'':>5} " + " ".join(f"{'meas   pred   diff':>26}" for _ in quantities)
    lines = [head, sub, "-" * len(head)]
    worst = 0.0
    for m, p in rows:
        cells = []
        for key, _ in quantities:
            diff = 100 * (p[key] - m.get(key, 0.0))
            if key in ("host_hit_rate", "disk_hit_rate"):
                worst = max(worst, abs(diff))
            cells.append(f"{100 * m.get(key, 0.0):6.1f}% {100 * p[key]:6.1f}% {diff:+5.1f}pp")
        reqs = f"{m['requests']}" if m["requests"] == p["requests"] else f"{m['requests']}/{p['requests']}"
        size = f"{m['g2_blocks']}" + (f"+{m['g3_blocks']}" if m.get("g3_blocks") else "")
        same = "-" if p.get("same_per_request") is None else str(p["same_per_request"])
        lines.append(f"{m['shape']:<10} {size:>7} {reqs:>5} {same:>5} " + " ".join(f"{c:>26}" for c in cells))
    lines.append(f"largest hit-rate difference: {worst:.1f} points (goal: within 3)")
    lines.append("same: requests for which the replay loads exactly the G2/G3 blocks kvbm loaded on the server")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="chat,documents", help="comma list of %(default)s")
    parser.add_argument("--sizes", action="append", default=[], metavar="SHAPE=N,N,N",
                        help=f"G2 sizes in blocks for a shape, G2+G3 for a disk tier too, e.g. chat=50,50+100 "
                             f"(defaults: {SIZES})")
    parser.add_argument("--model", default=None, help="model directory (default: build the demo preset)")
    parser.add_argument("--out", type=Path, default=Path("out/plan_validate"))
    parser.add_argument("--lock", default="/tmp/kvbm-heavy.lock", help="lock file per server run ('' for none)")
    parser.add_argument("--replay-only", action="store_true",
                        help="do not serve: replay the traces and measurements already in --out")
    args = parser.parse_args()
    sizes = dict(SIZES)
    for item in args.sizes:
        shape, _, values = item.partition("=")
        sizes[shape] = values.split(",")
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in WORKLOADS]
    if unknown:
        parser.error(f"unknown shape(s) {unknown}; choose from {list(WORKLOADS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None and not args.replay_only:
        from kvbm.tools.demo.tiny_model import build_model

        model = str(build_model(preset="demo"))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    rows = []
    for shape in shapes:
        for size in sizes[shape]:
            g2, _, g3 = str(size).partition("+")
            g2, g3 = int(g2), int(g3 or 0)
            path = args.out / f"{run_name(shape, g2, g3)}.measured.json"
            if args.replay_only:
                if not path.exists():
                    print(f"skipping {shape} {size}: no {path}")
                    continue
                measured = json.loads(path.read_text())
            else:
                measured = measure(shape, g2, g3, model, args.out, args.lock)
            rows.append((measured, predict(measured, args.out)))
    if not rows:
        return 1
    text = comparison(rows)
    print("\n" + text)
    (args.out / "comparison.txt").write_text(text + "\n")
    worst = max(abs(p["host_hit_rate"] - m["host_hit_rate"]) for m, p in rows)
    return 0 if math.isfinite(worst) else 1


if __name__ == "__main__":
    raise SystemExit(main())
