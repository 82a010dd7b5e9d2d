"""Run one workload against vLLM alone and against vLLM + kvbm, side by side.

Each configuration gets a fresh server on the same machine with identical
engine settings; only the KV connector differs. The table shows TTFT and
where each prompt's KV came from: vLLM's own prefix cache (G1) or kvbm's
host tier (G2), read from vLLM's Prometheus counters.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvbm.bench.server import VllmServer
from kvbm.bench.workload import WorkloadResult, WorkloadSpec, run_workload

logger = logging.getLogger(__name__)

# Same settings on both sides: vLLM reserves an extra core when a connector is
# configured, which on small machines changes the thread count and with it
# both speed and bf16 rounding.
COMMON_ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}


@dataclass
class Configuration:
    name: str
    kvbm: dict | None = None  # kv_connector_extra_config, None = no kvbm
    extra_args: list[str] = field(default_factory=list)


@dataclass
class Outcome:
    config: Configuration
    result: WorkloadResult
    metrics: dict[str, float]

    def hit_rates(self) -> tuple[float, float]:
        """(G1 hit rate, kvbm hit rate) over prompt tokens looked up."""
        m = self.metrics
        g1 = m.get("vllm:prefix_cache_hits_total", 0) / max(1.0, m.get("vllm:prefix_cache_queries_total", 0))
        ext = m.get("vllm:external_prefix_cache_hits_total", 0) / max(
            1.0, m.get("vllm:external_prefix_cache_queries_total", 0)
        )
        return g1, ext


def run_compare(model: str, configs: list[Configuration], spec: WorkloadSpec, engine_args: list[str],
                out_dir: Path, env: dict[str, str] | None = None) -> list[Outcome]:
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for config in configs:
        log = out_dir / f"{config.name}.server.log"
        print(f"[{config.name}] starting vLLM (log: {log}) ...", flush=True)
        started = time.monotonic()
        server = VllmServer(model, [*engine_args, *config.extra_args], env={**COMMON_ENV, **(env or {})},
                            log_path=log, kvbm_extra_config=config.kvbm)
        with server:
            print(f"[{config.name}] ready in {time.monotonic() - started:.0f}s; running "
                  f"{spec.users} users x {spec.rounds} rounds ...", flush=True)
            result = asyncio.run(run_workload(server.url, model, spec))
            metrics = server.metrics()
        result.write_csv(out_dir / f"{config.name}.csv")
        outcomes.append(Outcome(config, result, metrics))
        summary = result.summary()
        print(f"[{config.name}] done: mean TTFT {summary['ttft_mean']:.3f}s over "
              f"{summary['requests']} requests in {result.wall_time:.0f}s", flush=True)
    return outcomes


def format_table(outcomes: list[Outcome]) -> str:
    base = outcomes[0].result.summary()
    header = (f"{'configuration':<22}{'requests':>9}{'TTFT mean':>11}{'p50':>8}{'p90':>8}"
              f"{'vs base':>9}{'G1 hit':>8}{'kvbm hit':>10}{'prompt tok/s':>14}")
    lines = [header, "-" * len(header)]
    for outcome in outcomes:
        s = outcome.result.summary()
        g1, ext = outcome.hit_rates()
        lines.append(
            f"{outcome.config.name:<22}{s['requests']:>9}{s['ttft_mean']:>10.3f}s{s['ttft_p50']:>7.3f}s"
            f"{s['ttft_p90']:>7.3f}s{s['ttft_mean'] / base['ttft_mean']:>8.2f}x{100 * g1:>7.1f}%"
            f"{100 * ext:>9.1f}%{s['input_tok_s']:>14.0f}"
        )
    return "\n".join(lines)
