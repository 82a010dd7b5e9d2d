"""Replay a trace through vLLM's prefix cache (modelled) and kvbm's real planner, pools and filter.

Two passes. The GPU pass runs once per trace: G1's content after a request
does not depend on kvbm (a block loaded from G2 and a block computed end up
cached alike), so each request's G1 hit is the same at every tier size. The
kvbm pass runs once per size point and drives :class:`~kvbm.core.planner.Planner`
as the vLLM adapter does (``match`` -> ``on_alloc`` -> ``on_scheduled`` ->
``take_plan`` -> ``on_worker_report``), with every copy reported complete at
once: an asynchronous load completes before its request runs, a load inside
the step with the step's stores; a request's prefill is stored when it is
scheduled, its output blocks when it finishes.
Requests are keyed by their index; tokens are never needed, since the planner
is handed the trace's block ids as hashes and lengths as ``range`` objects
(nothing is ever hashed again).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

from kvbm.core.filter import DEFAULT_THRESHOLD, FrequencyFilter
from kvbm.core.planner import Planner
from kvbm.core.tiers import standard_chain
from kvbm.tools.plan.gpu import GpuPrefixCache
from kvbm.tools.plan.trace import Trace

logger = logging.getLogger(__name__)

ARRIVE, FINISH = 0, 1
#: Requests' hash root: never used, the trace's block ids are handed over as the hashes.
_ROOT = b"kvbm plan"


@dataclass
class GpuPass:
    """What vLLM's own cache did with the trace: per request its G1 hit, and the event order."""

    gpu_blocks: int
    #: Blocks of each request's prompt found in G1.
    hits: list[int]
    #: (time, request index, ARRIVE/FINISH) in replay order.
    events: list[tuple[float, int, int]]
    #: Blocks vLLM would have had to wait for (the trace's concurrency overflows the pool).
    shortfall: int = 0


def _shape(req_tokens: int, output: int, num_blocks: int, bs: int) -> tuple[int, int, int, int]:
    """(tokens seen at scheduling, full prompt blocks, prompt blocks allocated, full blocks at the end).

    Lengths are clamped to the known chain so the planner never hashes: a
    request aborted mid-prefill logged fewer blocks than its prompt has.
    """
    tokens = min(req_tokens, num_blocks * bs + 1)
    full_prompt = min(tokens // bs, num_blocks)
    computed = req_tokens + output - 1 if output else req_tokens
    return tokens, full_prompt, -(-tokens // bs), min(computed // bs, num_blocks)


def gpu_pass(trace: Trace, gpu_blocks: int) -> GpuPass:
    """Replay vLLM's prefix cache alone: each request's G1 hit, in event order."""
    bs = trace.block_size
    events = sorted([(r.time, i, ARRIVE) for i, r in enumerate(trace.requests)]
                    + [(r.end, i, FINISH) for i, r in enumerate(trace.requests)])
    cache = GpuPrefixCache(gpu_blocks)
    hits = [0] * len(trace.requests)
    running: dict[int, list[int]] = {}
    for _, i, kind in events:
        r = trace.requests[i]
        hashes = r.blocks
        tokens, full_prompt, alloc_prompt, full_end = _shape(r.prompt_tokens, r.output_tokens, len(hashes), bs)
        if kind == ARRIVE:
            blocks = cache.lookup(hashes, (tokens - 1) // bs)
            hits[i] = len(blocks)
            blocks += cache.allocate(alloc_prompt - len(blocks))
            for j in range(hits[i], min(full_prompt, len(blocks))):
                cache.cache(blocks[j], hashes[j])
            running[i] = blocks
        else:
            blocks = running.pop(i)
            total = r.prompt_tokens + r.output_tokens - 1 if r.output_tokens else r.prompt_tokens
            blocks += cache.allocate(max(0, -(-total // bs) - alloc_prompt))
            for j in range(full_prompt, min(full_end, len(blocks))):
                cache.cache(blocks[j], hashes[j])
            cache.free(blocks)
    return GpuPass(gpu_blocks=gpu_blocks, hits=hits, events=events, shortfall=cache.shortfall)


@dataclass(frozen=True)
class SizePoint:
    """One configuration of kvbm's tiers (0 blocks: tier off)."""

    host_blocks: int
    disk_blocks: int = 0
    disk_filter: bool = True


@dataclass
class ReplaySettings:
    """The server's settings that shape replays besides tier sizes (defaults: kvbm's)."""

    decay_period_s: float = 600.0
    max_entries: int = 1_000_000
    #: The server's load mode (see config): which tiers load inside the step that matched
    #: (the order of LRU touches differs).
    load_mode: str = "auto"
    #: vLLM's tokens per step: a longer prefill is stored chunk by chunk (None: in one step).
    chunk_tokens: int | None = None


@dataclass
class PointResult:
    """Totals of one replay. Hit rates as kvbm's metrics define them: hits / blocks looked up beyond G1."""

    host_blocks: int
    disk_blocks: int
    disk_filter: bool
    requests: int = 0
    prompt_tokens: int = 0
    g1_tokens: int = 0
    host_hit_blocks: int = 0
    disk_hit_blocks: int = 0
    looked_up_blocks: int = 0
    offloaded_blocks: int = 0  # G1 -> first tier (G2, or G3 without G2)
    spilled_blocks: int = 0  # G2 -> G3 (disk writes with both tiers)
    filter_rejections: int = 0
    host_evicted: int = 0
    disk_evicted: int = 0
    seconds: float = 0.0

    def fractions(self, block_size: int) -> dict[str, float]:
        """Shares of all prompt tokens: from G1, G2, G3, and still computed."""
        total = max(self.prompt_tokens, 1)
        g1 = self.g1_tokens / total
        g2 = self.host_hit_blocks * block_size / total
        g3 = self.disk_hit_blocks * block_size / total
        return {"g1": g1, "g2": g2, "g3": g3, "computed": max(0.0, 1 - g1 - g2 - g3)}

    @property
    def host_hit_rate(self) -> float:
        return self.host_hit_blocks / self.looked_up_blocks if self.looked_up_blocks else 0.0

    @property
    def disk_hit_rate(self) -> float:
        return self.disk_hit_blocks / self.looked_up_blocks if self.looked_up_blocks else 0.0

    def as_dict(self) -> dict:
        return asdict(self)


def replay(trace: Trace, gpu: GpuPass, point: SizePoint, settings: ReplaySettings | None = None,
           on_progress: Callable[[int], None] | None = None,
           served: list[tuple[int, int]] | None = None) -> PointResult:
    """One size point: the trace through kvbm's real Planner, BlockPools and FrequencyFilter.

    ``served``, if given, receives each request's (G2, G3) blocks loaded, by request index.
    """
    settings = settings or ReplaySettings()
    started = time.perf_counter()
    bs = trace.block_size
    now = [0.0]
    chain = standard_chain(point.host_blocks, point.disk_blocks, load_mode=settings.load_mode,
                           disk_filter_threshold=DEFAULT_THRESHOLD if point.disk_filter else None)
    result = PointResult(point.host_blocks, point.disk_blocks, point.disk_filter)
    if not chain:  # vLLM alone
        _add_gpu_totals(result, trace, gpu)
        return result
    sightings = FrequencyFilter(decay_period_s=settings.decay_period_s, max_entries=settings.max_entries,
                                clock=partial(now.__getitem__, 0))  # trace time; a C call, it runs per block
    # Every matched block is loaded (no load-or-recompute rule): the plan measures what the tiers hold.
    planner = Planner(chain, bs, 1, sightings=sightings)
    host, disk = planner.host, planner.disk
    requests, hits = trace.requests, gpu.hits
    looked = 0
    for n, (t, i, kind) in enumerate(gpu.events):
        now[0] = t
        r = requests[i]
        tokens, full_prompt, alloc_prompt, full_end = _shape(r.prompt_tokens, r.output_tokens, len(r.blocks), bs)
        if kind == ARRIVE:
            planner.add_request(i, _ROOT, r.blocks)
            g = hits[i]
            max_blocks = (tokens - 1) // bs
            if g < max_blocks:
                looked += max_blocks - g
            prompt = range(tokens)
            external = planner.match(i, prompt, g * bs)
            waits = external > 0 and planner.load_is_async(i)  # asked right after the match, as vLLM does
            planner.on_alloc(i, range(alloc_prompt), external)
            if served is not None:
                sources = planner.load_sources(i)
                served.append((sources.get("G2", 0), sources.get("G3", 0)))
            if waits:
                # The request waits for its load and is scheduled once it is done; a load
                # inside the step lands with the step's stores, after the request ran.
                _complete(planner)
            # Prefill chunk by chunk (vLLM's token budget per step), each chunk's copies completing
            # before the next; the budget is the request's alone here (others' share is not modelled).
            done, replace = g * bs + external, True
            chunk = settings.chunk_tokens or tokens
            while True:
                done = min(done + chunk, tokens)
                planner.on_scheduled(i, prompt, range(alloc_prompt) if replace else None, replace,
                                     min(done, full_prompt * bs))
                _complete(planner)
                replace = False
                if done >= tokens:
                    break
        else:
            new_blocks = range(alloc_prompt, max(alloc_prompt, full_end))
            planner.on_scheduled(i, range(max(tokens, full_end * bs)), new_blocks, False, full_end * bs)
            _complete(planner)
            planner.on_finished(i)
        if on_progress is not None and n % 4096 == 4095:
            on_progress(4096)
    if on_progress is not None:
        on_progress(len(gpu.events) % 4096)
    s = planner.stats
    _add_gpu_totals(result, trace, gpu)
    result.host_hit_blocks, result.disk_hit_blocks = s.host_hit_blocks, s.disk_hit_blocks
    result.looked_up_blocks = looked
    result.offloaded_blocks = s.offloaded_blocks
    result.spilled_blocks = s.spilled_blocks
    result.filter_rejections = s.filter_rejections
    result.host_evicted = host.stats.evicted if host is not None else 0
    result.disk_evicted = disk.stats.evicted if disk is not None else 0
    result.seconds = time.perf_counter() - started
    return result


def _add_gpu_totals(result: PointResult, trace: Trace, gpu: GpuPass) -> None:
    result.requests = len(trace.requests)
    result.prompt_tokens = trace.prompt_tokens
    result.g1_tokens = sum(gpu.hits) * trace.block_size


def _complete(planner: Planner) -> None:
    """Take the step's plan and report every copy in it done, as a healthy worker would,
    until nothing is left (a committed G2 block may plan a G2 -> G3 copy next)."""
    plan = planner.take_plan()
    while not plan.is_empty():
        stored = {spill.batch_id: 1 for spill in plan.spills}
        if plan.store is not None:
            stored[plan.store.batch_id] = 1
        planner.on_worker_report(stored=stored, finished_loads=[load.req_id for load in plan.loads],
                                 released=[req for req, _ in plan.release_after_store])
        plan = planner.take_plan()


# ---- sweeps -------------------------------------------------------------------------

_shared: tuple[Trace, GpuPass, ReplaySettings, object] | None = None


def _init_worker(state: tuple[Trace, GpuPass, ReplaySettings, object]) -> None:
    global _shared
    _shared = state


def _worker(point: SizePoint) -> PointResult:
    assert _shared is not None
    trace, gpu, settings, counter = _shared

    def progress(n: int) -> None:
        with counter.get_lock():  # type: ignore[attr-defined]
            counter.value += n  # type: ignore[attr-defined]

    return replay(trace, gpu, point, settings, progress)


def sweep(trace: Trace, gpu: GpuPass, points: Sequence[SizePoint], settings: ReplaySettings | None = None,
          jobs: int | None = None, progress: bool | None = None, desc: str = "replaying") -> list[PointResult]:
    """Replay every point, on ``jobs`` processes (forked: the trace is shared, not copied)."""
    from tqdm import tqdm

    settings = settings or ReplaySettings()
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(points)))
    total = len(points) * len(gpu.events)
    bar = tqdm(total=total, desc=desc, unit="ev", unit_scale=True, leave=False,
               disable=None if progress is None else not progress)
    try:
        if jobs == 1 or "fork" not in multiprocessing.get_all_start_methods():
            return [replay(trace, gpu, p, settings, bar.update) for p in points]
        ctx = multiprocessing.get_context("fork")
        counter = ctx.Value("q", 0)
        with ctx.Pool(jobs, initializer=_init_worker, initargs=((trace, gpu, settings, counter),)) as pool:
            pending = pool.map_async(_worker, points, chunksize=1)
            while not pending.ready():
                pending.wait(0.25)
                bar.update(counter.value - bar.n)
            results = pending.get()
        bar.update(total - bar.n)
        return results
    finally:
        bar.close()
