"""kvbm's Prometheus metrics and the periodic cache summary line.

One exporter per engine: it lives in the scheduler-side leader (vLLM's
EngineCore process), which sees every request once whatever the
tensor-parallel size, so no count is ever duplicated across ranks. Workers
only send their transfer bytes/seconds and disk error counts to the leader in
the per-step worker metadata (summed over ranks by vLLM).

Cost: nothing here runs per token. :meth:`CacheMetrics.on_step` reads a few
planner counters once per engine step; everything else (counter values, tier
usage) is read from the planner only when Prometheus scrapes, by a custom
collector. The registry is our own :class:`~prometheus_client.CollectorRegistry`
(never the global one), so it cannot clash with vLLM's metrics, and
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which vLLM
may set) does not touch it: a custom collector keeps no value objects.

Names. The reference exported its six block/token counters under plain names
(``kvbm_offload_blocks_d2h``, no ``_total``), and its Grafana dashboard queries
exactly those. prometheus_client always appends ``_total`` to a counter's
samples, and OpenMetrics (which Prometheus negotiates when scraping
prometheus_client) requires it. So those six are exported as *untyped* series
under their exact reference names: existing dashboards and ``rate()`` work
unchanged. Every other counter is a real counter with the ``_total`` suffix.
See ``docs/metrics.md``.
"""

from __future__ import annotations

import bisect
import errno
import logging
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler

from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    UnknownMetricFamily,
)
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from kvbm.config import env_var
from kvbm.core.plan import add_histograms
from kvbm.core.tiers import DISK, G1, HOST, REMOTE, move
from kvbm.storage.kinds import BAD_VALUE_KINDS, DISK_ERROR_KINDS, ERROR_KINDS, LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.core.planner import Planner, PlannerStats
    from kvbm.storage.remote import RemoteStore

logger = logging.getLogger(__name__)

PORT_VAR = env_var("metrics_port")
HOST_VAR = env_var("metrics_host")
WINDOW_VAR = env_var("metrics_hit_rate_window")

#: Transfer directions, as the reference named its block counters: label values of
#: kvbm_transfer_{bytes,seconds}_total, by move between tiers (kvbm.core.tiers.move).
OFFLOAD_D2H = "offload_d2h"  # G1 → G2 (GPU → host)
OFFLOAD_H2D = "offload_h2d"  # G2 → G3 (host → disk)
OFFLOAD_D2D = "offload_d2d"  # G1 → G3 (GPU → disk, disk-only mode)
ONBOARD_H2D = "onboard_h2d"  # G2 → G1 (host → GPU)
ONBOARD_D2D = "onboard_d2d"  # G3 → G1 (disk → GPU)
DIRECTION_LABELS: dict[str, str] = {
    move(G1, "G2"): OFFLOAD_D2H, move("G2", "G3"): OFFLOAD_H2D, move(G1, "G3"): OFFLOAD_D2D,
    move("G2", G1): ONBOARD_H2D, move("G3", G1): ONBOARD_D2D,
}
#: Always exported (zero until they happen): the reference's directions, and G4's moves.
DIRECTIONS: tuple[str, ...] = (*DIRECTION_LABELS.values(), move("G2", "G4"), move("G3", "G4"), move(G1, "G4"),
                               move("G4", G1))

#: kvbm_tier_*{tier=...}: the media of the standard chain, always exported (zero when absent).
#: G4's used blocks are those this server knows to be there; its capacity is Redis's (0 here).
TIERS: tuple[str, ...] = (HOST, DISK, REMOTE)

#: The reference's counters: exact names, exported untyped (see module doc).
#: name -> (tier or None for an engine-wide counter, PlannerStats / TierStats counter, help)
REFERENCE_COUNTERS: dict[str, tuple[str | None, str, str]] = {
    "kvbm_matched_tokens": (
        None, "matched_tokens", "Tokens onboarded from kvbm's tiers instead of recomputed (counter)"),
    "kvbm_offload_blocks_d2h": ("G2", "stored_blocks", "Blocks offloaded GPU to host, G1 to G2 (counter)"),
    "kvbm_offload_blocks_h2d": ("G3", "spilled_blocks", "Blocks offloaded host to disk, G2 to G3 (counter)"),
    "kvbm_offload_blocks_d2d": (
        "G3", "stored_blocks", "Blocks offloaded GPU to disk bypassing host, G1 to G3 (counter)"),
    "kvbm_onboard_blocks_h2d": ("G2", "loaded_blocks", "Blocks onboarded host to GPU, G2 to G1 (counter)"),
    "kvbm_onboard_blocks_d2d": ("G3", "loaded_blocks", "Blocks onboarded disk to GPU, G3 to G1 (counter)"),
}

#: Plain counters: exported name (without _total) -> (tier or None, counter, help).
PLANNER_COUNTERS: dict[str, tuple[str | None, str, str]] = {
    "kvbm_lookup_requests": (
        None, "lookup_requests", "Requests whose prefix kvbm looked up when vLLM scheduled them"),
    "kvbm_lookup_blocks": (
        None, "lookup_blocks", "Full prompt blocks looked up beyond those the GPU cache already had"),
    "kvbm_host_hit_blocks": ("G2", "hit_blocks", "Looked-up blocks found in host memory (G2)"),
    "kvbm_disk_hit_blocks": ("G3", "hit_blocks", "Looked-up blocks found on disk (G3)"),
    "kvbm_disk_filter_rejections": (
        None, "filter_rejections", "Host blocks kept off disk by the frequency filter (seen only once so far)"),
    "kvbm_failed_onboards": (
        None, "failed_loads", "Requests whose onboard failed in part; vLLM recomputed the rest"),
    "kvbm_failed_offload_blocks": (None, "failed_stores", "Blocks whose offload copy failed (not cached)"),
    "kvbm_window_store_fences": (
        None, "window_store_fences",
        "Steps whose forward pass waited for a store of sliding-window blocks vLLM handed out again"),
    "kvbm_window_store_fences_skipped": (
        None, "window_store_fences_skipped",
        "Steps with a store of sliding-window blocks in flight that did not need to wait for it"),
    "kvbm_bad_disk_blocks": (
        "G3", "bad_blocks", "Disk blocks dropped after a failed read or verification (recomputed, never served)"),
    "kvbm_cost_skipped_host_blocks": (
        "G2", "cost_skipped_blocks", "G2 hits recomputed because loading them would have been slower"),
    "kvbm_cost_skipped_disk_blocks": (
        "G3", "cost_skipped_blocks", "G3 hits recomputed because loading them would have been slower"),
    "kvbm_remote_hit_blocks": ("G4", "hit_blocks", "Looked-up blocks found in the tier shared by servers (G4)"),
    "kvbm_remote_loaded_blocks": ("G4", "loaded_blocks", "Blocks onboarded from G4 to GPU, G4 to G1"),
    "kvbm_remote_spilled_blocks": ("G4", "spilled_blocks", "Blocks offloaded to G4 from the tier above it"),
    "kvbm_remote_stored_blocks": ("G4", "stored_blocks", "Blocks offloaded GPU to G4 (G4 the only tier)"),
    "kvbm_bad_remote_blocks": (
        "G4", "bad_blocks", "G4 blocks that could not be loaded (evicted by Redis or another server, Redis down, "
        "or failed verification); recomputed, never served"),
    "kvbm_cost_skipped_remote_blocks": (
        "G4", "cost_skipped_blocks", "G4 hits recomputed because loading them would have been slower"),
}

#: kvbm_{host,disk}_cache_hit_rate: the tier each gauge covers.
HIT_RATE_GAUGES: dict[str, tuple[str, str]] = {
    "kvbm_host_cache_hit_rate": ("G2", "Host (G2)"),
    "kvbm_disk_cache_hit_rate": ("G3", "Disk (G3)"),
    "kvbm_remote_cache_hit_rate": ("G4", "Shared (G4)"),
}

#: Lookup latency buckets (seconds): a lookup hashes new blocks and walks the pools.
LOOKUP_BUCKETS: tuple[float, ...] = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1,
)


def counter(stats: PlannerStats, tier: str | None, name: str) -> int:
    """A counter of the planner (``tier`` None) or of one of its tiers (0 for a tier not in the chain)."""
    return getattr(stats if tier is None else stats.tier(tier), name)


def direction_label(direction: str) -> str:
    """The label value of a move: the reference's name where it has one, else the move itself."""
    return DIRECTION_LABELS.get(direction, direction)


class MetricsServerError(RuntimeError):
    """/metrics could not be served; the message names the setting to change."""


class HitRateWindow:
    """Hit rates per tier over the last ``size`` requests' lookups.

    Fed once per engine step with that step's totals, so the window holds
    whole steps: at least ``size`` requests once that many were seen, and
    fewer than one step's admissions more. O(tiers) per step.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError(f"hit rate window must be > 0 requests, got {size}")
        self.size = size
        self._steps: deque[tuple[int, int, dict[str, int]]] = deque()
        self.requests = 0
        self.looked = 0
        self.hits: dict[str, int] = {}

    def add(self, requests: int, looked: int, hits: Mapping[str, int]) -> None:
        self._steps.append((requests, looked, dict(hits)))
        self._count(requests, looked, hits, 1)
        while self._steps and self.requests - self._steps[0][0] >= self.size:
            self._count(*self._steps.popleft(), -1)

    def _count(self, requests: int, looked: int, hits: Mapping[str, int], sign: int) -> None:
        self.requests += sign * requests
        self.looked += sign * looked
        for tier, n in hits.items():
            self.hits[tier] = self.hits.get(tier, 0) + sign * n

    def rate(self, tier: str) -> float:
        return self.hits.get(tier, 0) / self.looked if self.looked else 0.0


class LatencyHistogram:
    """A lock-free histogram for one writer thread (the scheduler).

    Readers (the scrape thread) copy the bucket list, so the exported
    buckets are always cumulative and consistent with the count.
    """

    def __init__(self, buckets: tuple[float, ...] = LOOKUP_BUCKETS) -> None:
        self.bounds = buckets
        self._counts = [0] * (len(buckets) + 1)  # last: above the highest bound
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        counts = list(self._counts)
        out, total = [], 0
        for bound, n in zip(self.bounds, counts):
            total += n
            out.append((floatToGoString(bound), float(total)))
        out.append(("+Inf", float(total + counts[-1])))
        return out

    @property
    def count(self) -> int:
        return sum(self._counts)


class CacheMetrics:
    """What the leader knows about the cache, for Prometheus and the log.

    Updated by the scheduler thread (at most once per step, plus one
    histogram observation per lookup); read by the scrape thread.
    """

    def __init__(self, planner: Planner, *, window: int = 1000, world_size: int = 1,
                 block_bytes: int = 0, remote: RemoteStore | None = None) -> None:
        self.planner = planner
        #: G4's store on the leader: its lookups, errors and round-trip latencies.
        self.remote_store = remote
        self.world_size = max(1, world_size)
        #: Bytes one block takes over all ranks (what one G2/G3 slot holds in total).
        self.block_bytes = block_bytes
        self.window = HitRateWindow(window)
        self.lookup_latency = LatencyHistogram()
        self._seen: tuple[int, int, dict[str, int]] = (0, 0, {})
        self._lock = threading.Lock()
        self.transfer_bytes: dict[str, int] = dict.fromkeys(DIRECTIONS, 0)
        self.transfer_seconds: dict[str, float] = dict.fromkeys(DIRECTIONS, 0.0)
        self.disk_errors: dict[str, int] = dict.fromkeys(DISK_ERROR_KINDS, 0)
        self._tiers = {G1, *(tier.name for tier in planner.chain)}
        self._disk_tiers = {tier.name for tier in planner.chain if tier.medium == DISK}
        self._remote_tiers = {tier.name for tier in planner.chain if tier.medium == REMOTE}
        #: G4 failures the workers reported, by kind (the leader's own are in its store's stats).
        self.remote_errors: dict[str, int] = {}
        #: G4 round trips of the workers, by operation (see WorkerReport.round_trips).
        self.round_trips: dict[str, list[float]] = {}
        self._warned_unknown: set[str] = set()

    @property
    def stats(self) -> PlannerStats:
        return self.planner.stats

    def observe_lookup(self, seconds: float) -> None:
        self.lookup_latency.observe(seconds)

    def on_step(self) -> None:
        """Feed this step's lookups into the hit rate window (a few int reads)."""
        s = self.planner.stats
        requests, looked, hits = self._seen
        if s.lookup_requests - requests <= 0:
            return
        now = {name: tier.hit_blocks for name, tier in s.tiers.items()}
        self.window.add(s.lookup_requests - requests, s.lookup_blocks - looked,
                        {name: n - hits.get(name, 0) for name, n in now.items()})
        self._seen = (s.lookup_requests, s.lookup_blocks, now)

    def on_worker_report(self, transfer_bytes: Mapping[str, int], transfer_seconds: Mapping[str, float],
                         errors: Mapping[str, Mapping[str, int]],
                         round_trips: Mapping[str, list[float]] | None = None) -> None:
        """Add what the workers reported this step (already summed over ranks): bytes and
        seconds per move (``"G2->G1"``), failures per tier and kind.

        Ranks copy their shards in parallel, so their summed seconds are
        divided by the number of ranks: rate(bytes) / rate(seconds) is then
        the engine's aggregate bandwidth.
        """
        if not (transfer_bytes or transfer_seconds or errors or round_trips):
            return
        with self._lock:
            for direction, n in transfer_bytes.items():
                if self._known_move(direction):
                    label = direction_label(direction)
                    self.transfer_bytes[label] = self.transfer_bytes.get(label, 0) + n
            for direction, secs in transfer_seconds.items():
                if self._known_move(direction):
                    label = direction_label(direction)
                    self.transfer_seconds[label] = self.transfer_seconds.get(label, 0.0) + secs / self.world_size
            for tier, kinds in errors.items():
                for kind, n in kinds.items():
                    if tier in self._disk_tiers and self._known(kind, kind in self.disk_errors):
                        self.disk_errors[kind] += n
                    elif tier in self._remote_tiers:
                        self.remote_errors[kind] = self.remote_errors.get(kind, 0) + n
            if round_trips:
                self.round_trips = add_histograms(self.round_trips, {
                    op: hist for op, hist in round_trips.items() if len(hist) == len(LATENCY_BUCKETS_S) + 2})

    def _known_move(self, direction: str) -> bool:
        src, _, dst = direction.partition("->")
        return self._known(direction, src in self._tiers and dst in self._tiers and src != dst)

    def _known(self, key: str, ok: bool) -> bool:
        if not ok and key not in self._warned_unknown:
            self._warned_unknown.add(key)
            logger.warning("kvbm metrics: ignoring unknown transfer/error key %r from a worker", key)
        return ok

    def snapshot(self) -> tuple[dict[str, int], dict[str, float], dict[str, int]]:
        with self._lock:
            return dict(self.transfer_bytes), dict(self.transfer_seconds), dict(self.disk_errors)

    def remote(self) -> tuple[bool, dict[str, int], dict[str, list[float]]]:
        """G4: (up as the leader sees it, errors by kind, round-trip histograms by operation),
        the leader's lookups and the workers' reads and writes together."""
        with self._lock:
            errors, round_trips = dict(self.remote_errors), dict(self.round_trips)
        if self.remote_store is None:
            return False, errors, round_trips
        stats = self.remote_store.stats()
        for kind, n in (*stats["errors"].items(), *stats["bad_values"].items()):
            errors[kind] = errors.get(kind, 0) + n
        mine = {op: [n for _, n in h["buckets"]] + [h["sum"]] for op, h in stats["latency"].items() if h["count"]}
        return stats["up"], errors, add_histograms(round_trips, mine)

    def remote_lookups(self) -> dict[str, int]:
        """G4 lookups the scheduler did not wait for (kvbm.storage.remote_index): "deferred", asks
        answered "not known yet" (vLLM asks again next step); "timed_out", lookups Redis did not
        answer within the remote timeout (misses). Zeros without G4."""
        out = {"deferred": 0, "timed_out": 0}
        for name in self._remote_tiers:
            index = self.planner.index(name)
            out["deferred"] += getattr(index, "deferred", 0)
            out["timed_out"] += getattr(index, "gave_up", 0)
        return out

    def tiers(self) -> dict[str, tuple[int, int, int]]:
        """Medium label -> (used blocks, capacity blocks, evicted blocks); zeros for an absent tier."""
        out = dict.fromkeys(TIERS, (0, 0, 0))
        for tier in self.planner.chain:
            index = self.planner.index(tier.name)
            if index is not None:
                out[tier.medium] = (index.num_used, index.num_slots, index.stats.evicted)
        return out

    def summary(self) -> str:
        """One line for the log: windowed hit rates, traffic, tier usage, errors."""
        s, w = self.planner.stats, self.window
        rates = " ".join(f"{tier.name} {100 * w.rate(tier.name):.1f}%" for tier in self.planner.chain)
        spilled = ", ".join(f"spilled to {tier.name} {s.tier(tier.name).spilled_blocks}"
                            for tier in self.planner.chain[1:])
        parts = [
            f"hit rate (last {w.requests} requests) {rates} of {w.looked} blocks looked up",
            f"matched {s.matched_tokens} tokens in total",
            f"loaded {s.onboarded_blocks}, stored {s.offloaded_blocks}" + (f", {spilled}" if spilled else ""),
        ]
        for tier in self.planner.chain:
            index = self.planner.index(tier.name)
            if index is not None and tier.shared:  # Redis bounds it (maxmemory), not a capacity of ours
                parts.append(f"{tier.name} {index.num_used} blocks known to be in Redis")
            elif index is not None:
                parts.append(f"{tier.name} {index.num_used}/{index.num_slots} used, {index.stats.evicted} evicted")
        if s.window_store_fences or s.window_store_fences_skipped:
            parts.append(f"sliding-window stores waited for in {s.window_store_fences} steps, "
                         f"not needed in {s.window_store_fences_skipped}")
        _, _, errors = self.snapshot()
        if self.remote_store is not None:
            up, remote_errors, _ = self.remote()
            failed = ", ".join(f"{kind} {n}" for kind, n in remote_errors.items() if n)
            parts.append(f"G4 {'up' if up else 'DOWN'}" + (f", errors: {failed}" if failed else ""))
        bad = s.total("bad_blocks")
        failures = s.failed_loads + s.failed_stores + bad + sum(errors.values())
        if failures:
            kinds = ", ".join(f"{kind} {n}" for kind, n in errors.items() if n) or "none"
            parts.append(
                f"failures: {s.failed_loads} loads, {s.failed_stores} stored blocks, "
                f"{bad} bad blocks, disk errors: {kinds}"
            )
        return "; ".join(parts)


class KvbmCollector(Collector):
    """Turns :class:`CacheMetrics` into metric families at scrape time."""

    def __init__(self, metrics: CacheMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        stats = m.stats
        for name, (tier, attr, doc) in REFERENCE_COUNTERS.items():
            yield UnknownMetricFamily(name, doc, value=counter(stats, tier, attr))
        for name, (tier, attr, doc) in PLANNER_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=counter(stats, tier, attr))
        for name, (tier, what) in HIT_RATE_GAUGES.items():
            yield GaugeMetricFamily(
                name, f"{what} hits / blocks looked up beyond the GPU cache, over the last {WINDOW_VAR} requests",
                value=m.window.rate(tier),
            )

        transfer_bytes, transfer_seconds, disk_errors = m.snapshot()
        moved = CounterMetricFamily("kvbm_transfer_bytes", "Bytes copied per direction, all ranks",
                                    labels=["direction"])
        busy = CounterMetricFamily(
            "kvbm_transfer_seconds",
            "Seconds spent copying per direction (mean over ranks, which copy in parallel); "
            "bandwidth = rate(kvbm_transfer_bytes_total) / rate(kvbm_transfer_seconds_total)",
            labels=["direction"],
        )
        for direction in dict.fromkeys([*transfer_bytes, *transfer_seconds]):
            moved.add_metric([direction], transfer_bytes.get(direction, 0))
            busy.add_metric([direction], transfer_seconds.get(direction, 0.0))
        yield moved
        yield busy
        errors = CounterMetricFamily("kvbm_disk_errors", "Disk (G3) block read/write failures by kind",
                                     labels=["kind"])
        for kind in DISK_ERROR_KINDS:
            errors.add_metric([kind], disk_errors[kind])
        yield errors

        used = GaugeMetricFamily("kvbm_tier_used_blocks", "Blocks held per tier (stored or being stored)",
                                 labels=["tier"])
        capacity = GaugeMetricFamily("kvbm_tier_capacity_blocks", "Blocks each tier can hold (0: tier off)",
                                     labels=["tier"])
        evicted = CounterMetricFamily("kvbm_evicted_blocks", "Blocks evicted (least recently used) per tier",
                                      labels=["tier"])
        for tier, (n_used, n_slots, n_evicted) in m.tiers().items():
            used.add_metric([tier], n_used)
            capacity.add_metric([tier], n_slots)
            evicted.add_metric([tier], n_evicted)
        yield used
        yield capacity
        yield evicted
        yield GaugeMetricFamily("kvbm_block_size_bytes", "Bytes one KV block takes over all ranks",
                                value=m.block_bytes)

        up, remote_errors, round_trips = m.remote()
        yield GaugeMetricFamily("kvbm_remote_up", "1 while every node of G4's Redis answers the leader "
                                "(0: down, or no G4 configured)", value=int(up))
        family = CounterMetricFamily("kvbm_remote_errors", "G4 (Redis) failures by kind, leader and workers: "
                                     "connection, timeout, oom, ..., and values that failed verification "
                                     "(foreign, corrupt, forged)", labels=["kind"])
        for kind in dict.fromkeys((*ERROR_KINDS, *BAD_VALUE_KINDS, *sorted(remote_errors))):  # zeros without G4
            family.add_metric([kind], remote_errors.get(kind, 0))
        yield family
        lookups = CounterMetricFamily("kvbm_remote_lookups_not_waited", "G4 lookups the scheduler did not "
                                      "wait for: deferred (asked again next step), timed_out (a miss)",
                                      labels=["outcome"])
        for outcome, n in m.remote_lookups().items():
            lookups.add_metric([outcome], n)
        yield lookups
        rtt = HistogramMetricFamily("kvbm_remote_round_trip_seconds", "One pipelined Redis round trip of G4, "
                                    "by operation (lookup: the leader; read, write: the workers)", labels=["op"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS_S] + ["+Inf"]
        for op in dict.fromkeys(("lookup", "read", "write", *sorted(round_trips))):  # zeros without G4
            hist = round_trips.get(op) or [0.0] * (len(bounds) + 1)
            rtt.add_metric([op], list(zip(bounds, hist[:-1])), sum_value=hist[-1])
        yield rtt

        hist = m.lookup_latency
        buckets = hist.cumulative()
        yield HistogramMetricFamily(
            "kvbm_lookup_seconds", "Time to answer one vLLM prefix lookup (hashing plus tier walk)",
            buckets=buckets, sum_value=hist.sum,
        )


def make_registry(metrics: CacheMetrics) -> CollectorRegistry:
    """kvbm's own registry (never prometheus_client's global one)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KvbmCollector(metrics))
    return registry


def exported_series(registry: CollectorRegistry) -> set[str]:
    """Sample names as Prometheus stores them (e.g. ``kvbm_lookup_seconds_bucket``)."""
    names = set()
    for line in generate_latest(registry).decode().splitlines():
        if line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    return names


def metrics_port(config: KvbmConfig, data_parallel_rank_local: int = 0) -> int:
    """The port of this engine's exporter: data-parallel engines on one host
    each get their own (port + local DP rank), since each runs a leader."""
    port = config.metrics_port + data_parallel_rank_local
    if port > 65535:
        raise MetricsServerError(
            f"{PORT_VAR}={config.metrics_port} plus data-parallel rank {data_parallel_rank_local} "
            f"exceeds 65535; set {PORT_VAR} lower"
        )
    return port


#: At most this many connections at once (one thread each); a scrape is one short request.
MAX_CONNECTIONS = 32
#: A connection must deliver its whole request within this many seconds.
REQUEST_TIMEOUT_S = 10.0


class _Handler(WSGIRequestHandler):
    """prometheus_client's handler, silent, that tells the server once the request is in."""

    server: _GuardedServer

    def setup(self) -> None:
        self.timeout = self.server.request_timeout_s  # bounds every read of a stalled client
        super().setup()

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.connection)
        return ok

    def log_message(self, format: str, *args: object) -> None:
        pass


class _GuardedServer(ThreadingWSGIServer):
    """A thread per connection, like prometheus_client's server, but bounded.

    That server keeps a thread for every connection for as long as the client
    keeps it open: 300 connections that send half a request hold 300 threads
    forever. Here a connection that has not delivered its request within
    ``request_timeout_s`` is closed, and when ``max_connections`` are open, a
    new one closes the oldest that is still sending its request (a stalled
    client loses its place to the new one, so scrapes get through a flood).
    A scrape reads no body, so reading the headers is all a client owes.
    """

    request_queue_size = 128  # listen backlog: socketserver's 5 makes a burst of clients wait seconds

    def __init__(self, address: tuple[str, int], family: int, max_connections: int, request_timeout_s: float) -> None:
        self.address_family = family
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._lock = threading.Lock()
        #: open connection -> when it was accepted, while its request is still being read
        self._reading: dict[socket.socket, float] = {}
        self._open: set[socket.socket] = set()
        super().__init__(address, _Handler)

    def verify_request(self, request: socket.socket, client_address: object) -> bool:
        with self._lock:
            self._expire(time.monotonic())
            if len(self._open) >= self.max_connections:
                if not self._reading:
                    return False  # every slot is busy answering: refuse (the client may retry)
                self._close(min(self._reading, key=self._reading.__getitem__))
            self._open.add(request)
            self._reading[request] = time.monotonic()
        return True

    def request_read(self, request: socket.socket) -> None:
        with self._lock:
            self._reading.pop(request, None)

    def shutdown_request(self, request: socket.socket) -> None:
        with self._lock:
            self._open.discard(request)
            self._reading.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: socket.socket, client_address: object) -> None:
        """A connection that failed: one log line, not socketserver's traceback on stderr.

        A client that stalls until its deadline (or hangs up, or resets) is the
        normal case this server is built for; it was printing 15 lines of stack
        to the server's stderr for each one.
        """
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # TimeoutError, ConnectionResetError, BrokenPipeError, ...
            logger.debug("kvbm metrics: closed the connection from %s: %s", _peer(client_address),
                         error.strerror or str(error) or type(error).__name__)
        else:
            logger.warning("kvbm metrics: error answering %s: %s: %s", _peer(client_address),
                           type(error).__name__, error)

    def service_actions(self) -> None:
        """Called by serve_forever about twice a second: close connections past their deadline."""
        with self._lock:
            self._expire(time.monotonic())

    def _expire(self, now: float) -> None:
        for request in [r for r, start in self._reading.items() if now - start > self.request_timeout_s]:
            self._close(request)

    def _close(self, request: socket.socket) -> None:
        """Wake the connection's thread (its read returns EOF); it then shuts the connection down.
        The slot is free at once: that thread only finishes."""
        del self._reading[request]
        self._open.discard(request)
        try:
            request.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _peer(address: object) -> str:
    return f"{address[0]}:{address[1]}" if isinstance(address, tuple) and len(address) >= 2 else str(address)


def _serve(host: str, port: int, registry: CollectorRegistry, max_connections: int,
           request_timeout_s: float) -> tuple[_GuardedServer, threading.Thread]:
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, address = info[0]
    server = _GuardedServer((address[0], port), family, max_connections, request_timeout_s)
    server.set_app(make_wsgi_app(registry))
    thread = threading.Thread(target=server.serve_forever, name="kvbm-metrics", daemon=True)
    thread.start()
    return server, thread


class MetricsExporter:
    """Serves kvbm's registry on ``http://host:port/metrics`` from a daemon thread."""

    def __init__(self, metrics: CacheMetrics, host: str, port: int, *, max_connections: int = MAX_CONNECTIONS,
                 request_timeout_s: float = REQUEST_TIMEOUT_S) -> None:
        self.metrics = metrics
        self.registry = make_registry(metrics)
        self.host = host
        try:
            self._server, self._thread = _serve(host, port, self.registry, max_connections, request_timeout_s)
        except socket.gaierror as e:
            raise MetricsServerError(
                f"kvbm metrics: cannot resolve bind address {host!r} ({e.strerror}); set {HOST_VAR} to an "
                f"IP of this host, e.g. {HOST_VAR}=127.0.0.1 or 0.0.0.0"
            ) from None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise MetricsServerError(
                    f"kvbm metrics: port {port} on {host} is already in use (another server with kvbm "
                    f"metrics on?). Set {PORT_VAR} to a free port, e.g. {PORT_VAR}={port + 1}, or unset "
                    f"{env_var('metrics')}"
                ) from None
            if e.errno == errno.EADDRNOTAVAIL:
                raise MetricsServerError(
                    f"kvbm metrics: {host!r} is not an address of this host; set {HOST_VAR} to one of its "
                    f"IPs, 127.0.0.1 or 0.0.0.0"
                ) from None
            if e.errno == errno.EACCES:
                raise MetricsServerError(
                    f"kvbm metrics: no permission to listen on port {port}; set {PORT_VAR} to a port "
                    "above 1023"
                ) from None
            raise MetricsServerError(
                f"kvbm metrics: cannot listen on {host}:{port}: {e.strerror}; check {HOST_VAR} and {PORT_VAR}"
            ) from None
        self.port = self._server.server_address[1]
        shown = f"[{host}]" if ":" in host else host
        logger.info("kvbm metrics: serving http://%s:%d/metrics", shown, self.port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
