"""Run one workload against several server configurations, side by side.

Each configuration gets a fresh ``kvbm serve`` process on the same machine,
one after the other, with identical engine arguments and environment; only
what the configuration adds differs (the kvbm connector and its tiers, or
extra vLLM options). Each one gets the same warm-up and the same measured
run, byte for byte, so the table's ratios compare servers, not prompts.

Where each prompt token came from is read from vLLM's own Prometheus
counters (``vllm:prompt_tokens_by_source``: computed, vLLM's prefix cache
"G1", or an external connector such as kvbm), scraped just before and just
after the measured run so the warm-up does not count. kvbm's own exporter
(``metrics``, see config) is scraped too when it answers; it adds per-tier
transfer counts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvbm.config import PREFIX, env_var
from kvbm.tools.bench.server import VllmServer, free_port, parse_samples, scrape
from kvbm.tools.bench.workload import WorkloadResult, WorkloadSpec, run_benchmark

logger = logging.getLogger(__name__)

# Same settings on every side: vLLM reserves an extra core when a connector is
# configured, which on small machines changes the thread count and with it
# both speed and bf16 rounding. Both CPU-only variables are ignored on GPUs.
COMMON_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
#: vLLM's prefix cache is on by default in V1; say so, so the baseline is never a cache-less strawman.
COMMON_ARGS = ["--enable-prefix-caching"]
BUILTIN_NAMES = ("vllm", "kvbm-host", "kvbm-host+disk", "floor")
#: The floor's KV space on CPU (GiB; ignored on GPUs, where vLLM takes its usual share of memory).
FLOOR_CPU_KVCACHE_GIB = "8"


@dataclass
class Configuration:
    """One server setup: kvbm's settings (None = no kvbm), extra vLLM arguments, extra env."""

    name: str
    kvbm: dict | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    #: vLLM keeps its whole KV pool (the --gpu-blocks shrink does not apply): the floor,
    #: what a hit costs when everything fits on the GPU.
    full_pool: bool = False

    @classmethod
    def parse(cls, text: str) -> Configuration:
        """``NAME=ARGS``: ARGS are vLLM arguments; ``VAR=VALUE`` words among them are env vars.

        Any of kvbm's variables (see config) attaches kvbm to that server, e.g.
        ``big-g2=<the cpu_cache_gb variable>=16`` or
        ``vllm-offload=--kv-offloading-size 8``.
        """
        name, sep, rest = text.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", name):
            raise ValueError(f"--config {text!r}: expected NAME=ARGS with a NAME of letters, digits, . _ + -")
        config = cls(name)
        for word in shlex.split(rest):
            var, eq, value = word.partition("=")
            if eq and re.fullmatch(r"[A-Z_][A-Z0-9_]*", var):
                if var.startswith(PREFIX):
                    config.kvbm = config.kvbm or {}
                config.env[var] = value
            else:
                config.extra_args.append(word)
        return config


def builtin_configurations(names: list[str], cpu_cache_gb: float, disk_cache_gb: float | None = None,
                           disk_dir: str | None = None) -> list[Configuration]:
    """The standard sides: vLLM alone, + kvbm's host tier, + kvbm's host and disk tiers.

    The disk configuration keeps the host tier's size, so the difference
    between the two kvbm columns is what the disk adds.
    """
    disk = {"disk_cache_gb": disk_cache_gb if disk_cache_gb is not None else 2 * cpu_cache_gb}
    if disk_dir:
        disk["disk_cache_dir"] = disk_dir
    table = {
        "vllm": Configuration("vllm"),
        "kvbm-host": Configuration("kvbm-host", kvbm={"cpu_cache_gb": cpu_cache_gb}),
        "kvbm-host+disk": Configuration("kvbm-host+disk", kvbm={"cpu_cache_gb": cpu_cache_gb, **disk}),
        "floor": Configuration("floor", env={"VLLM_CPU_KVCACHE_SPACE": FLOOR_CPU_KVCACHE_GIB}, full_pool=True),
    }
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown configuration(s) {unknown}; built-ins are {list(table)} (add others with --config)")
    return [table[n] for n in names]


def _flatten(text: str | None) -> dict[str, float]:
    """Metric values by name (summed over labels), plus ``name{source=...}`` per source label."""
    values: dict[str, float] = {}
    for name, labels, value in parse_samples(text or ""):
        if name.endswith("_created"):
            continue
        values[name] = values.get(name, 0.0) + value
        if "source" in labels:
            key = f"{name}{{source={labels['source']}}}"
            values[key] = values.get(key, 0.0) + value
    return values


#: The reference's six kvbm counters, exported untyped under their plain names (see docs/metrics.md).
KVBM_PLAIN_COUNTERS = frozenset({
    "kvbm_matched_tokens", "kvbm_offload_blocks_d2h", "kvbm_offload_blocks_h2d", "kvbm_offload_blocks_d2d",
    "kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d",
})


def _is_cumulative(key: str) -> bool:
    name = key.split("{", 1)[0]
    return name.endswith(("_total", "_count", "_sum", "_bucket")) or name in KVBM_PLAIN_COUNTERS


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters as increases over the run; everything else (gauges) as its final value."""
    return {k: v - before.get(k, 0.0) if _is_cumulative(k) else v for k, v in after.items()}


@dataclass
class Outcome:
    """What one configuration did: its run, the metrics over that run, or why it failed."""

    config: Configuration
    result: WorkloadResult | None = None
    warmup: WorkloadResult | None = None
    #: vLLM's metrics over the measured run (counters as deltas).
    vllm: dict[str, float] = field(default_factory=dict)
    #: kvbm's exporter over the measured run, or None when it did not answer.
    kvbm: dict[str, float] | None = None
    #: vLLM's own KV pool in tokens (from ``vllm:cache_config_info``).
    pool_tokens: int | None = None
    startup_s: float = math.nan
    error: str | None = None

    def token_sources(self) -> dict[str, float] | None:
        """Fractions of the run's prompt tokens: computed, from vLLM's prefix cache, from kvbm."""
        m = self.vllm
        by_source = {s: m.get(f"vllm:prompt_tokens_by_source_total{{source={s}}}") for s in
                     ("local_compute", "local_cache_hit", "external_kv_transfer")}
        if all(v is not None for v in by_source.values()):
            total = sum(by_source.values())
            if total > 0:
                return {"computed": by_source["local_compute"] / total, "g1": by_source["local_cache_hit"] / total,
                        "external": by_source["external_kv_transfer"] / total}
        prompts = m.get("vllm:prompt_tokens_total")
        if not prompts:
            return None  # older vLLM: fall back to hit counters over prompt tokens
        g1 = m.get("vllm:prefix_cache_hits_total", 0.0) / prompts
        ext = m.get("vllm:external_prefix_cache_hits_total", 0.0) / prompts
        return {"computed": max(0.0, 1 - g1 - ext), "g1": g1, "external": ext}


def _kvbm_value(metrics: dict[str, float], name: str) -> float | None:
    for key in (f"{name}_total", name):
        if key in metrics:
            return metrics[key]
    return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)


def run_compare(model: str, configs: list[Configuration], spec: WorkloadSpec, engine_args: list[str],
                out_dir: Path, env: dict[str, str] | None = None, *, progress: bool | None = None,
                startup_timeout: float = 900.0) -> list[Outcome]:
    """Start each configuration in turn, run warm-up and workload, keep CSVs, logs and metrics.

    A configuration that fails (a server that does not start, an option the
    platform lacks) is reported in its column; the others still run.
    """
    preflight(model, configs, engine_args, env)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _stop_on_sigterm():
        outcomes = [_run_one(model, config, spec, engine_args, out_dir, env, progress, startup_timeout)
                    for config in configs]
    _write_summary_json(outcomes, spec, out_dir / "summary.json")
    return outcomes


def preflight(model: str, configs: list[Configuration], engine_args: list[str],
              env: dict[str, str] | None = None) -> None:
    """Validate every configuration's kvbm settings before the first server starts (else a typo in the
    last one shows up as a failed column after the others ran for minutes); raises ConfigError."""
    from kvbm.config import ConfigError
    from kvbm.preflight import check_vllm_args

    for config in configs:
        server = VllmServer(model, [*COMMON_ARGS, *engine_args, *config.extra_args],
                            env={**COMMON_ENV, **(env or {}), **config.env},
                            kvbm_extra_config=dict(config.kvbm) if config.kvbm is not None else None)
        try:
            check_vllm_args(server.argv, server.env)
        except ConfigError as e:
            raise ConfigError(f"configuration {config.name!r}: {e}") from None


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """Turn SIGTERM into SystemExit so ``finally`` blocks stop the servers (they run in their own sessions)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_one(model: str, config: Configuration, spec: WorkloadSpec, engine_args: list[str], out_dir: Path,
             env: dict[str, str] | None, progress: bool | None, startup_timeout: float) -> Outcome:
    """One configuration: start its server, measure, stop it; failures end up in ``Outcome.error``."""
    from tqdm import tqdm

    outcome = Outcome(config)
    log = out_dir / f"{_safe(config.name)}.server.log"
    server_env = {**COMMON_ENV, **(env or {}), **config.env}
    kvbm_config = dict(config.kvbm) if config.kvbm is not None else None
    scratch = None
    metrics_url = None
    if kvbm_config is not None:
        wants_disk = any(kvbm_config.get(k) or server_env.get(env_var(k))
                         for k in ("disk_cache_gb", "disk_cache_override_num_blocks"))
        if wants_disk and "disk_cache_dir" not in kvbm_config and env_var("disk_cache_dir") not in server_env:
            # A fresh directory per run: a disk tier left by an earlier run must not serve this one.
            scratch = tempfile.mkdtemp(prefix=f"kvbm-bench-{_safe(config.name)}-")
            kvbm_config["disk_cache_dir"] = scratch
        if env_var("metrics") not in server_env:
            server_env[env_var("metrics")] = "1"
            server_env[env_var("metrics_port")] = str(free_port())
        if server_env.get(env_var("metrics"), "").lower() in ("1", "true", "yes", "on"):
            metrics_url = f"http://127.0.0.1:{server_env.get(env_var('metrics_port'), '6880')}/metrics"
    if config.full_pool:
        engine_args = _without_pool_override(engine_args)
    server = VllmServer(model, [*COMMON_ARGS, *engine_args, *config.extra_args], env=server_env,
                        log_path=log, kvbm_extra_config=kvbm_config)
    logger.info("[%s] starting vLLM (log: %s)", config.name, log)
    started = time.monotonic()
    try:
        with tqdm(desc=f"[{config.name}] starting vLLM", bar_format="{desc} {elapsed}", disable=(
                None if progress is None else not progress), leave=False) as bar:
            server.start(timeout=startup_timeout, on_poll=lambda _: bar.refresh())
        outcome.startup_s = time.monotonic() - started
        logger.info("[%s] ready in %.0fs", config.name, outcome.startup_s)
        outcome.warmup, outcome.result = _measure(server, spec, config.name, progress, metrics_url, outcome)
    except Exception as exc:  # noqa: BLE001 - one failed configuration must not hide the others
        outcome.error = f"{type(exc).__name__}: {exc}"
        cause = _root_cause(server.log_tail(400))
        if cause:
            outcome.error += f"\n  server said: {cause}"
        logger.error("[%s] failed: %s", config.name, outcome.error)
        logger.debug("[%s] end of the server log:\n%s", config.name, server.log_tail(30))
    finally:
        server.stop()
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    if outcome.result is not None:
        outcome.result.write_csv(out_dir / f"{_safe(config.name)}.csv")
        if outcome.warmup is not None:
            outcome.warmup.write_csv(out_dir / f"{_safe(config.name)}.warmup.csv")
        s = outcome.result.summary()
        logger.info("[%s] %d requests in %.0fs: mean TTFT %.3fs, p90 %.3fs%s", config.name, s["requests"],
                    s["duration"], s["ttft_mean"], s["ttft_p90"],
                    f" ({s['errors']:.0f} failed)" if s["errors"] else "")
    return outcome


def _without_pool_override(args: list[str]) -> list[str]:
    """``args`` minus ``--num-gpu-blocks-override N`` (either spelling)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--num-gpu-blocks-override":
            skip = True
        elif not arg.startswith("--num-gpu-blocks-override="):
            out.append(arg)
    return out


def _root_cause(log: str) -> str | None:
    """The last exception line in a server log ("ValueError: ..."), the reason users need to see;
    kvbm's own refusal (``kvbm serve: error: ...``, printed last by the server) wins."""
    refusals = [line.split("kvbm serve: error: ", 1)[1] for line in log.splitlines() if "kvbm serve: error: " in line]
    if refusals:
        return refusals[-1] if len(refusals[-1]) < 400 else refusals[-1][:400] + "..."
    pattern = re.compile(r"(?:^|\]\s|\s)([A-Za-z_][\w.]*(?:Error|Exception)): (.+)$")
    causes = [f"{m.group(1)}: {m.group(2)}" for line in log.splitlines() if (m := pattern.search(line))]
    generic = ("Engine core initialization failed", "RuntimeError: vLLM server exited")
    specific = [c for c in causes if not any(g in c for g in generic)]
    picked = (specific or causes or [None])[-1]
    return picked if picked is None or len(picked) < 400 else picked[:400] + "..."


def _measure(server: VllmServer, spec: WorkloadSpec, name: str, progress: bool | None, metrics_url: str | None,
             outcome: Outcome) -> tuple[WorkloadResult, WorkloadResult]:
    """Warm-up, scrape, measured run, scrape: the metrics deltas cover the measured run only."""
    before: dict[str, dict[str, float]] = {}

    def snapshot() -> None:
        before["vllm"] = _flatten(server.metrics_text())
        before["kvbm"] = _flatten(scrape(metrics_url)) if metrics_url else {}

    warm, result = run_benchmark(server.url, server.model, spec, label=name, progress=progress,
                                 before_run=snapshot)
    text = server.metrics_text()
    outcome.vllm = _delta(before["vllm"], _flatten(text))
    for sample_name, labels, _ in parse_samples(text):
        if sample_name == "vllm:cache_config_info" and labels.get("num_gpu_blocks", "").isdigit():
            outcome.pool_tokens = int(labels["num_gpu_blocks"]) * int(labels.get("block_size") or 0)
    kvbm_after = scrape(metrics_url) if metrics_url else None
    outcome.kvbm = _delta(before["kvbm"], _flatten(kvbm_after)) if kvbm_after else None
    return warm, result


def _write_summary_json(outcomes: list[Outcome], spec: WorkloadSpec, path: Path) -> None:
    data = {"workload": spec.__dict__, "configurations": []}
    for o in outcomes:
        data["configurations"].append({
            "name": o.config.name, "kvbm": o.config.kvbm, "extra_args": o.config.extra_args, "env": o.config.env,
            "error": o.error, "startup_s": o.startup_s, "pool_tokens": o.pool_tokens,
            "summary": o.result.summary() if o.result else None, "token_sources": o.token_sources(),
            "vllm_metrics": {k: v for k, v in o.vllm.items() if k.startswith(("vllm:prompt", "vllm:prefix",
                                                                             "vllm:external"))},
            "kvbm_metrics": o.kvbm,
        })
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def _ratio(value: float, base: float | None) -> str:
    if base is None or not base or math.isnan(base) or math.isnan(value):
        return ""
    return f" ({value / base:.2f}x)"


def format_table(outcomes: list[Outcome]) -> str:
    """One column per configuration; TTFT and throughput with ratios to the first (the baseline)."""
    ok = [o for o in outcomes if o.result is not None]
    base = outcomes[0].result.summary() if outcomes and outcomes[0].result is not None else None
    summaries = {id(o): o.result.summary() for o in ok}
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell) -> None:
        cells = []
        for o in outcomes:
            if o.result is None:
                cells.append("failed" if label == "requests" else "-")
            else:
                cells.append(cell(o, summaries[id(o)]))
        rows.append((label, cells))

    row("requests", lambda o, s: f"{s['requests']:.0f}" + (f" ({s['errors']:.0f} failed)" if s["errors"] else ""))
    for key, label in (("ttft_mean", "TTFT mean"), ("ttft_p50", "TTFT p50"), ("ttft_p90", "TTFT p90"),
                       ("ttft_p99", "TTFT p99")):
        row(label, lambda o, s, key=key: f"{s[key]:.3f}s" + (_ratio(s[key], base[key]) if base and o is not
                                                              outcomes[0] else ""))
    if any(s["later_ttft_mean"] == s["later_ttft_mean"] for s in summaries.values()):  # not all NaN
        for key, label in (("later_ttft_mean", "later-turn TTFT mean"), ("later_ttft_p90", "later-turn TTFT p90")):
            row(label, lambda o, s, key=key: f"{s[key]:.3f}s" + (_ratio(s[key], base[key]) if base and o is not
                                                                  outcomes[0] else ""))
        floor = next((o for o in ok if o.config.full_pool), None)
        if floor is not None:
            fs = summaries[id(floor)]
            def vs_floor(o: Outcome, s: dict) -> str:
                if o is floor:
                    return "-"
                mean, p90 = (s[k] / fs[k] for k in ("later_ttft_mean", "later_ttft_p90"))
                return f"{mean:.2f}x / {p90:.2f}x"

            row("  vs floor (mean / p90)", vs_floor)
    for key, label in (("input_tok_s", "input tokens/s"), ("output_tok_s", "output tokens/s")):
        row(label, lambda o, s, key=key: f"{s[key]:.0f}" + (_ratio(s[key], base[key]) if base and o is not
                                                             outcomes[0] else ""))

    def source(o: Outcome, key: str) -> str:
        sources = o.token_sources()
        return "?" if sources is None else f"{100 * sources[key]:.1f}%"

    row("prompt tokens computed", lambda o, s: source(o, "computed"))
    row("  from vLLM prefix (G1)", lambda o, s: source(o, "g1"))
    row("  from kvbm / connector", lambda o, s: source(o, "external"))
    if any(o.kvbm for o in ok):
        def kv(o: Outcome, *names: str) -> str:
            if not o.kvbm:
                return "-"
            values = [_kvbm_value(o.kvbm, n) for n in names]
            return " / ".join("?" if v is None else f"{v:.0f}" for v in values)

        row("kvbm onboard host/disk", lambda o, s: kv(o, "kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d"))
        row("kvbm offload G1>G2/G2>G3", lambda o, s: kv(o, "kvbm_offload_blocks_d2h", "kvbm_offload_blocks_h2d"))

        def rate(o: Outcome) -> str:
            if not o.kvbm:
                return "-"
            looked = _kvbm_value(o.kvbm, "kvbm_lookup_blocks")
            if looked is not None:  # over the measured run only
                hits = [_kvbm_value(o.kvbm, n) for n in ("kvbm_host_hit_blocks", "kvbm_disk_hit_blocks")]
                rates = [None if h is None else h / max(looked, 1.0) for h in hits]
            else:  # the exporter's gauges cover its last requests, warm-up included
                rates = [_kvbm_value(o.kvbm, n) for n in ("kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate")]
            return " / ".join("?" if v is None else f"{100 * v:.0f}%" for v in rates)

        row("kvbm hit rate host/disk", lambda o, s: rate(o))
    row("server start", lambda o, s: f"{o.startup_s:.0f}s")

    names = [o.config.name for o in outcomes]
    first = max(len(label) for label, _ in rows) + 2
    widths = [max(len(n), *(len(cells[i]) for _, cells in rows)) + 2 for i, n in enumerate(names)]
    lines = ["".ljust(first) + "".join(n.rjust(w) for n, w in zip(names, widths))]
    lines.append("-" * len(lines[0]))
    for label, cells in rows:
        lines.append(label.ljust(first) + "".join(c.rjust(w) for c, w in zip(cells, widths)))
    for o in outcomes:
        if o.error:
            lines.append(f"{o.config.name}: {o.error}")
    note = working_set_note(outcomes)
    if note:
        lines.append(note)
    return "\n".join(lines)


def working_set_note(outcomes: list[Outcome]) -> str | None:
    """Compare the users' conversations with vLLM's own KV pool: offloading only helps beyond it."""
    base = next((o for o in outcomes if o.result is not None and o.pool_tokens), None)
    if base is None:
        return None
    longest: dict[int, int] = {}
    for r in base.result.records:
        longest[r.user_id] = max(longest.get(r.user_id, 0), r.prompt_tokens + r.generation_tokens)
    working = sum(longest.values())
    text = (f"working set: {len(longest)} conversations, {working:,} tokens; "
            f"vLLM's own KV pool: {base.pool_tokens:,} tokens")
    if working <= base.pool_tokens:
        text += ("\nnote: everything fits vLLM's own KV pool, so offloading cannot help here; shrink the pool "
                 "(--gpu-blocks) or add users/history")
    return text


def write_plots(outcomes: list[Outcome], out_dir: Path, title: str = "") -> list[Path]:
    """TTFT CDF per configuration and TTFT over time; [] with a warning when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so no plots: pip install 'kvbm-vllm[bench]'")
        return []
    ok = [o for o in outcomes if o.result is not None and o.result.records]
    if not ok:
        return []
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for o in ok:
        ttfts = sorted(r.ttft for r in o.result.records)
        ys = [(i + 1) / len(ttfts) for i in range(len(ttfts))]
        ax.step(ttfts, ys, where="post", label=f"{o.config.name} (mean {sum(ttfts) / len(ttfts):.3f}s)")
    ax.set_xlabel("time to first token (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title(f"TTFT CDF{': ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "ttft_cdf.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for o in ok:
        recs = o.result.records
        xs = [r.launch_time - o.result.start_time for r in recs]
        ys = [r.ttft for r in recs]
        (points,) = ax.plot(xs, ys, "o", markersize=3, alpha=0.5)
        window = max(1, len(recs) // 10)
        smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1])
                  for i in range(len(ys))]
        ax.plot(xs, smooth, "-", color=points.get_color(), label=f"{o.config.name} (rolling mean)")
    ax.set_xlabel("request launch (s since the run's start)")
    ax.set_ylabel("time to first token (s)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(f"TTFT over time{': ' + title if title else ''}", fontsize=10)
    fig.tight_layout()
    paths.append(out_dir / "ttft_over_time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
