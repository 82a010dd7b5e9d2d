"""The scheduler side of kvbm for one engine, without vLLM.

:meth:`LeaderRuntime.boot` runs the leader's half of the startup handshake
(mirroring :meth:`kvbm.runtime.worker.WorkerRuntime.register_kv_caches`): it waits for every rank,
sizes the tiers, builds the chain once and sends it to the ranks. The runtime
then owns the :class:`~kvbm.core.planner.Planner` and is the only door to it:
request lifecycle, the cross-rank counting of in-step loads, failed-load
memory, reloading a persistent tier from its journal, the load-or-recompute
rule's measured rates, the workers' reports, the metrics exporter and the
request trace. The vLLM adapter (:mod:`kvbm.vllm_integration.leader`) only
turns vLLM's objects into ids and calls this object.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvbm.config import KvbmConfig, env_var
from kvbm.core.cost import OnboardCost, Rate
from kvbm.core.filter import FrequencyFilter
from kvbm.core.groups import SINGLE_FULL, KVGroup
from kvbm.core.hashing import BlockHash, engine_root
from kvbm.core.plan import StepPlan, WorkerReport
from kvbm.core.planner import Planner
from kvbm.core.tiers import DISK, G1, HOST, REMOTE, TierIndex, TierListener, describe, move
from kvbm.metrics import CacheMetrics, MetricsExporter, metrics_port
from kvbm.runtime.handshake import ChainOf, LeaderHandshake
from kvbm.runtime.sizing import TierPlan, WorkerLayout
from kvbm.runtime.trace import TraceWriter
from kvbm.storage.files import ensure_private_dir, g3_journal_path
from kvbm.storage.journal import DiskJournal, JournalWriter
from kvbm.storage.remote_index import LOOKUP_WAIT_S, RemoteIndex, open_remote

if TYPE_CHECKING:
    from kvbm.storage.remote import RemoteStore

logger = logging.getLogger(__name__)

__all__ = ["EngineInfo", "LeaderRuntime"]

#: Between pieces of the deferred spill policy the policy thread sleeps this long: long enough
#: that an engine thread waiting for the GIL (back from its forward pass) wakes and takes it,
#: instead of waiting for CPython's 5 ms switch interval.
_POLICY_PAUSE_S = 20e-6


class PolicyThread:
    """Runs ``run(pause)`` on a thread of its own when :meth:`start`ed; :meth:`wait` blocks until
    it is done (and raises what it raised). The hand-over costs the step a lock and a queue put,
    not a Future and an executor's bookkeeping (~50 µs a step with ``ThreadPoolExecutor``)."""

    def __init__(self, run: Callable[[Callable[[], None]], None]) -> None:
        self._run = run
        self._todo: queue.SimpleQueue[bool] = queue.SimpleQueue()
        self._running = threading.Lock()  # held from start() until the run is over
        self._started = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="kvbm-spill-policy", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        pause = self._pause
        while self._todo.get():
            try:
                self._run(pause)
            except BaseException as e:  # handed to the engine's thread by wait()
                self._error = e
            finally:
                self._running.release()

    @staticmethod
    def _pause() -> None:
        time.sleep(_POLICY_PAUSE_S)

    def start(self) -> None:
        self._running.acquire()
        self._started = True
        self._todo.put(True)

    def wait(self) -> None:
        if not self._started:
            return
        self._started = False
        self._running.acquire()
        self._running.release()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def close(self) -> None:
        self.wait()
        self._todo.put(False)
        self._thread.join()


@dataclass(frozen=True)
class EngineInfo:
    """What the leader needs to know of its engine (the adapter reads it from vLLM's config)."""

    block_size: int
    world_size: int
    engine_id: str | None
    block_bytes: int  # one block on one rank
    gpu_blocks: int
    #: What names the persistent files (kvbm.runtime.identity.storage_key).
    storage_key: str
    max_num_batched_tokens: int
    groups: tuple[KVGroup, ...] = SINGLE_FULL
    null_block: int | None = None
    data_parallel_rank_local: int = 0
    data_parallel_rank: int = 0
    #: An EAGLE/MTP drafter runs: every hit recomputes its last block (Planner.drop_last_hit_block).
    drop_last_hit_block: bool = False


class LeaderRuntime:
    #: Opt-in request log for ``kvbm plan`` (trace_file, see config); None: off.
    trace: TraceWriter | None = None
    #: The index journal of the persistent tier (G3 with disk persistence); None: none.
    journal: DiskJournal | None = None
    exporter: MetricsExporter | None = None
    #: G4's store (lookups of every rank's keys); None: no G4.
    remote: RemoteStore | None = None
    #: G4's index: its lookups run on a thread of their own, waited for at most LOOKUP_WAIT_S a step.
    remote_index: RemoteIndex | None = None
    #: The spill policy's thread (see __init__) and its job for the step in flight; None: none.
    _policy: PolicyThread | None = None

    @classmethod
    def boot(cls, config: KvbmConfig, engine: EngineInfo, identity_of: Callable[[Sequence[WorkerLayout]], str],
             *, chain_of: ChainOf | None = None) -> LeaderRuntime:
        """Wait for every rank, agree on the chain, and start the leader.

        vLLM builds the scheduler only after every worker registered its KV caches, so all of
        them are waiting: the tiers are sized from their reports. ``identity_of``: the model
        identity from the ranks' layouts (what must match to share G3 files or G4 values);
        ``chain_of``: the chain for the sized settings (default: the settings' own)."""
        joined = LeaderHandshake(config, engine.world_size, engine.engine_id, identity=identity_of,
                                 chain_of=chain_of).start().wait()
        return cls(config, joined.plan, engine, identity=identity_of(joined.workers))

    def __init__(self, config: KvbmConfig, plan: TierPlan, engine: EngineInfo, *, identity: str,
                 policy_thread: bool = True) -> None:
        """``plan``: the chain every rank allocated; ``identity``: what must match to reuse
        persistent or shared blocks (kvbm.runtime.identity.model_identity). ``policy_thread``:
        run the spill policy on a thread of its own while the engine runs each step (see
        :meth:`settle`); False decides spills inside the calls that cause them."""
        block_size, world_size, block_bytes = engine.block_size, engine.world_size, engine.block_bytes
        self.engine = engine
        self.data_parallel_rank = engine.data_parallel_rank
        self.config = config
        self.block_size = block_size
        self.world_size = world_size
        self.chain = plan.chain
        indexes: dict[str, TierIndex] = {}
        for tier in self.chain:  # the shared store answers lookups for every rank's shard
            if tier.medium == REMOTE:
                self.remote = open_remote(config, plan.remote_key, rank=0, world_size=world_size, announce=True)
                self.remote_index = RemoteIndex(self.remote, wait_s=LOOKUP_WAIT_S,
                                                timeout_s=config.remote_timeout_secs)
                indexes[tier.name] = self.remote_index
        self.planner = Planner(
            self.chain, block_size, world_size,
            sightings=FrequencyFilter(decay_period_s=config.disk_offload_filter_decay_secs,
                                      max_entries=config.disk_offload_filter_max_entries),
            # learn a slow tier's speed on two blocks, not on a whole prefix; host memory is never slow
            cost=OnboardCost(policy=config.onboard_policy, block_size=block_size, block_bytes=block_bytes,
                             probe_blocks={tier.name: 2 for tier in self.chain if tier.medium != HOST}),
            indexes=indexes, groups=engine.groups, null_block=engine.null_block,
            drop_last_hit_block=engine.drop_last_hit_block,
        )
        # The spill policy (filter sightings, spill decisions: per block, ~100 µs a step on average
        # and milliseconds on a step that commits or hits hundreds of blocks) runs on its own thread,
        # started when a step's plan is handed out, i.e. while the engine runs the forward pass,
        # and waited for before any other call: the planner never sees two threads at once, and
        # its plans are the same whatever the timing (the spills join the next step's plan).
        if policy_thread and len(self.chain) > 1:
            self._policy = PolicyThread(lambda pause: self.planner.run_deferred(pause))
            self.planner.defer_policy = True
        self.capacities = {tier.name: tier.capacity for tier in self.chain}
        self._shared = {tier.name for tier in self.chain if tier.shared}
        self.engine_root = engine_root(identity)
        self._last_step: tuple[float, int] | None = None  # (when, tokens) of the last scheduled step
        self._step_seconds = Rate()  # steps per second, over every step
        self._last_summary = time.monotonic()
        self._failed_loads: set[str] = set()  # reported failed by some rank, not yet finished
        self._sync_reports: dict[str, int] = {}  # in-step loads: ranks that reported them so far
        persistent = [tier.name for tier in self.chain if tier.persistent]
        if persistent:
            self._persistent = persistent[0]
            self.journal = self._open_journal(engine.storage_key, identity)
            self.journal_writer = JournalWriter(self.journal)
        self.metrics = CacheMetrics(self.planner, window=config.metrics_hit_rate_window, world_size=world_size,
                                    block_bytes=block_bytes * world_size, remote=self.remote)
        if config.metrics:  # one exporter per engine (this leader), never per rank: counts are not duplicated
            self.exporter = MetricsExporter(self.metrics, config.metrics_host,
                                            metrics_port(config, engine.data_parallel_rank_local))
        if config.trace_file:
            self.trace = TraceWriter(config.trace_file, {
                "block_size": block_size, "gpu_blocks": engine.gpu_blocks, "bytes_per_block": self.metrics.block_bytes,
                "host_blocks": plan.blocks_on(HOST), "disk_blocks": plan.blocks_on(DISK), "load_mode": config.load_mode,
                "max_num_batched_tokens": engine.max_num_batched_tokens,
            })
        logger.info("kvbm leader: %s; %d tokens per block, %d worker(s); %s=%s", describe(self.chain), block_size,
                    world_size, env_var("load_mode"), config.load_mode)

    def _open_journal(self, storage_key: str, identity: str) -> DiskJournal:
        """Reload what a previous server left on disk: same files (``storage_key``), and only
        if the identity (weights, quantization, overrides, ...) is unchanged."""
        directory = ensure_private_dir(self.config.disk_cache_dir)
        journal = DiskJournal(g3_journal_path(directory, storage_key, self.data_parallel_rank), identity=identity)
        restored = self.planner.restore(self._persistent, journal.load())
        logger.info("kvbm: reusing %d %s blocks from %s", restored, self._persistent, journal.path)
        return journal

    def settle(self) -> None:
        """Wait for the spill policy of the last step (usually done: it ran during the forward
        pass). Every method that reads or changes the planner calls this first; so does anyone
        inspecting :attr:`planner` from outside (tests, tools)."""
        if self._policy is not None:
            self._policy.wait()

    def inspect_planner(self) -> Planner:
        """The planner, for tests and tools that look at its state (everything else goes through
        this object's methods), with the spill policy of every step so far decided: as it would
        be with the policy decided inside the calls."""
        self.settle()
        self.planner.run_deferred()
        return self.planner

    # ---- request lifecycle (the adapter's only door to the planner) ----------
    def add_request(self, req_id: str, root: BlockHash | None) -> None:
        """Track a request whose chain starts at ``root`` (None: never cached, e.g. prompt embeddings)."""
        self.settle()
        self.planner.add_request(req_id, root)

    def allocated(self, req_id: str, gpu_blocks: Sequence[int] | Sequence[Sequence[int]],
                  num_external_tokens: int) -> None:
        """vLLM allocated the request's GPU blocks (one list per KV-cache group); the matched
        ``num_external_tokens`` are loaded into them."""
        self.settle()
        self.planner.on_alloc(req_id, gpu_blocks, num_external_tokens)
        if self.trace is not None:
            sources = self.planner.load_sources(req_id)
            self.trace.scheduled(req_id, (sources.get("G2", 0), sources.get("G3", 0)))

    def scheduled(self, req_id: str, tokens: Sequence[int], new_gpu_blocks: Sequence | None, resumed: bool,
                  num_computed_before: int, num_scheduled: int) -> None:
        """The request runs this step (``resumed``: its GPU blocks were replaced): store what it fills."""
        self.settle()
        self.planner.on_scheduled(req_id, tokens, new_gpu_blocks, resumed, num_computed_before + num_scheduled,
                                  num_computed_before)

    def preempted(self, req_id: str) -> None:
        self.settle()
        self.planner.on_preempted(req_id)

    def finished(self, req_id: str, prompt_tokens: int, output_tokens: int) -> bool:
        """The request finished; True: vLLM must keep its GPU blocks until its stores are reported."""
        self.settle()
        if self.trace is not None:
            self.trace.finished(req_id, prompt_tokens, output_tokens, self.planner.request_hashes(req_id))
        return self.planner.on_finished(req_id)

    def load_media(self, req_id: str) -> dict[str, int]:
        """Blocks of the request's in-flight load per medium (HOST, DISK, REMOTE, ...), chain order;
        empty when it has none."""
        self.settle()
        loaded = self.planner.load_sources(req_id)
        media: dict[str, int] = {}
        for tier in self.chain:
            if loaded.get(tier.name):
                media[tier.medium] = media.get(tier.medium, 0) + loaded[tier.name]
        return media

    def hit_tokens_by_medium(self, req_id: str, num_external_tokens: int) -> dict[str, int]:
        """The ``num_external_tokens`` of a hit split by tier medium (HOST, DISK, REMOTE, ...), in
        proportion to the blocks the load reads from each (several groups may load windows); the
        shares add up to the hit, rounding going to the first medium. All HOST when the request has
        no load in flight; empty for no hit."""
        if num_external_tokens == 0:
            return {}
        media = self.load_media(req_id)
        total = sum(media.values())
        if not total:
            return {HOST: num_external_tokens}
        out = {medium: num_external_tokens * blocks // total for medium, blocks in media.items()}
        first = next(iter(out))
        out[first] += num_external_tokens - sum(out.values())  # rounding: the shares add up to the hit
        return out

    def attach_tier_listener(self, listener: TierListener | None) -> None:
        """Tell ``listener`` of blocks entering and leaving the tiers (:mod:`kvbm.runtime.events`);
        None detaches it. The runtime's :attr:`chain` and :attr:`block_size` describe them."""
        self.settle()
        self.planner.set_listener(listener)

    @property
    def busy(self) -> bool:
        """Copies are in flight that need more engine steps to be reported."""
        self.settle()
        return self.planner.busy

    def match(self, req_id: str, tokens: Sequence[int], num_computed: int) -> tuple[int | None, bool]:
        """(tokens the chain can load beyond ``num_computed``, whether the load is asynchronous),
        as vLLM asks it; the time it took goes to the lookup histogram. ``(None, False)``: not
        known yet (G4's lookup is still out): vLLM skips the request this step and asks again."""
        self.settle()
        start = time.perf_counter()
        matched = self.planner.match(req_id, tokens, num_computed)
        self.metrics.observe_lookup(time.perf_counter() - start)
        if matched is None:
            return None, False
        return matched, matched > 0 and self.planner.load_is_async(req_id)

    # ---- per step -------------------------------------------------------
    def begin_step(self, tokens: int) -> None:
        """The engine's prefill rate, for the load-or-recompute rule: the time from one step's
        scheduling to the next one's, over the tokens the first computed (vLLM steps back to
        back while it has work; an idle gap after a step only lowers one sample of an EWMA)."""
        self.settle()
        if self.remote_index is not None:
            self.remote_index.begin_step()  # the next scheduler step may wait for G4 again
        now = time.perf_counter()
        last, self._last_step = self._last_step, (now, tokens)
        cost = self.planner.cost
        if cost is None or last is None:
            return
        seconds = now - last[0]
        cost.observe_step(last[1], seconds)
        # An asynchronous load makes its request wait about one engine step, whatever that step
        # computes for others (mostly short decode steps): the typical step, not a prefill step.
        self._step_seconds.observe(1.0, seconds)
        typical = 1.0 / self._step_seconds.value if self._step_seconds.value else 0.0
        for tier in self.chain:
            if not tier.sync_load:
                cost.extra_seconds[tier.name] = typical

    def end_step(self) -> StepPlan:
        """The step's plan for the workers (after every scheduled request was fed to the planner);
        the step's spill policy starts on its thread as the plan leaves."""
        self.settle()
        self.metrics.on_step()
        self._maybe_log_summary()
        plan = self.planner.take_plan()
        if self._policy is not None and self.planner.has_deferred:
            self._policy.start()
        return plan

    def workers_reported(self, report: WorkerReport, finished_recving: Iterable[str],
                         failed_recving: Iterable[str], released: Iterable[str]) -> None:
        """The step's output as vLLM delivers it: the workers' merged report, the asynchronous loads
        vLLM saw finish (and fail), the requests whose blocks may be freed.

        vLLM does not track in-step loads: they finish once every rank reported them. A rank may
        report a failed load a step before vLLM reports the load finished on every rank, so
        failures are remembered until the load finishes."""
        self._failed_loads |= report.failed_loads | set(failed_recving)
        # In the order vLLM reported them (a dict, not a set of strings, whose order changes with
        # the interpreter's hash seed): releasing their slots orders the LRU, hence later evictions.
        finished = dict.fromkeys(finished_recving)
        for req_id, reports in report.sync_loaded.items():
            count = self._sync_reports.get(req_id, 0) + reports
            if count >= self.world_size:
                self._sync_reports.pop(req_id, None)
                finished[req_id] = None
            else:
                self._sync_reports[req_id] = count
        failed = self._failed_loads.intersection(finished)
        self._failed_loads -= failed
        self.apply(report, finished, failed, released)

    def apply(self, report: WorkerReport, finished_loads: Iterable[str], failed_loads: Iterable[str],
              released: Iterable[str]) -> None:
        """What the workers did (their reports merged), and which loads finished (and failed)."""
        self.settle()
        self.planner.on_worker_report(report.stored, report.failed_batches, finished_loads, failed_loads, released,
                                      report.bad_slots)
        self.metrics.on_worker_report(report.transfer_bytes, report.transfer_seconds, report.errors,
                                      report.round_trips)
        cost = self.planner.cost
        if cost is not None:
            for tier in self.chain:
                direction = move(tier.name, G1)
                if report.transfer_seconds.get(direction):
                    cost.observe_load(tier.name, report.transfer_bytes.get(direction, 0),
                                      report.transfer_seconds[direction])
        for tier, slots in report.bad_slots.items():
            if slots and not (tier in self._shared and self.planner.stats.tier(tier).bad_blocks > len(slots)):
                # A shared tier's blocks vanish when another server or Redis evicts them: said once.
                logger.warning(
                    "kvbm: %d %s block(s) failed verification or could not be read; they were dropped and "
                    "their requests recompute (total so far: %d)%s",
                    len(slots), tier, self.planner.stats.tier(tier).bad_blocks,
                    "; a shared tier loses blocks to evictions by Redis or other servers, so further ones are "
                    "only counted" if tier in self._shared else "",
                )
        if self.journal is not None:
            # Journaled on its own thread: the step never waits for fdatasync or a compaction.
            self.journal_writer.submit(*self.planner.take_commits(self._persistent))

    def _maybe_log_summary(self) -> None:
        """One line every log_summary_secs (see config), for users without Prometheus."""
        interval = self.config.log_summary_secs
        if interval <= 0:
            return
        now = time.monotonic()
        if now - self._last_summary < interval:
            return
        self._last_summary = now
        logger.info("kvbm: %s", self.metrics.summary())

    def close(self) -> None:
        if self._policy is not None:
            try:
                self.settle()
                self.planner.run_deferred()  # the last spills' commits: a persistent tier journals them below
                if self.journal is not None:
                    self.journal_writer.submit(*self.planner.take_commits(self._persistent))
            finally:
                self._policy.close()
                self._policy = None
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        if self.journal is not None:
            self.journal_writer.close()  # writes what is pending (fewer misses after a restart), closes it
            self.journal = None
        if self.remote_index is not None:
            self.remote_index.close()  # its thread uses the store: first
            self.remote_index = None
        if self.remote is not None:
            self.remote.close()
            self.remote = None
