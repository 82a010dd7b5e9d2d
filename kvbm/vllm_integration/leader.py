"""Scheduler-side half of the connector: vLLM's requests → the planner.

Lives in vLLM's EngineCore process and runs every engine step, so it only
does work proportional to the blocks that changed this step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from kvbm.config import KvbmConfig, env_var
from kvbm.core.cost import OnboardCost, Rate
from kvbm.core.filter import FrequencyFilter
from kvbm.core.hashing import engine_root, request_root
from kvbm.core.planner import DISK, HOST, SYNC_LOAD_TIERS, Planner
from kvbm.core.pool import BlockPool
from kvbm.metrics import ONBOARD_D2D, ONBOARD_H2D, CacheMetrics, MetricsExporter, metrics_port
from kvbm.plan.trace import TraceWriter
from kvbm.runtime.fingerprint import fingerprint
from kvbm.runtime.handshake import LeaderHandshake
from kvbm.storage.files import ensure_private_dir
from kvbm.storage.journal import DiskJournal
from kvbm.vllm_integration.compat import features
from kvbm.vllm_integration.metadata import KvbmMetadata, KvbmWorkerMetadata
from kvbm.vllm_integration.sizing import bytes_per_block_per_rank, model_identity, storage_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.lora.request import LoRARequest
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)
VLLM = features()



def _tier_names(tiers) -> str:
    names = [{HOST: "G2", DISK: "G3"}[t] for t in tiers]
    return "/".join(names) if names else "no tier"

#: LoRA keys remembered per leader (one entry per distinct adapter; bounded for servers that load many).
LORA_KEYS = 4096


class KvbmLeader:
    #: Opt-in request log for ``kvbm plan`` (DYN_KVBM_TRACE_FILE); None: off.
    trace: TraceWriter | None = None

    def __init__(self, config: KvbmConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        if len(kv_cache_config.kv_cache_groups) != 1:
            raise ValueError(
                "kvbm supports models with one KV cache group (one attention type); "
                f"this model has {len(kv_cache_config.kv_cache_groups)}. Remove the kvbm "
                "kv-transfer-config for this model."
            )
        self.config = config
        self.block_size = vllm_config.cache_config.block_size
        # vLLM builds the scheduler only after every worker registered its KV
        # caches, so all of them are waiting: size the tiers from their reports.
        joined = LeaderHandshake(
            config, vllm_config.parallel_config.world_size, vllm_config.kv_transfer_config.engine_id
        ).start().wait()
        sizes = joined.sizes
        self.num_host_slots, self.num_disk_slots = sizes.host_slots, sizes.disk_slots
        identity = model_identity(vllm_config, kv_cache_config, fingerprint_weights=config.disk_persist,
                                  kv_layout="|".join(w.layout for w in joined.workers))
        disk_filter = None
        if self.num_host_slots and self.num_disk_slots and not config.disable_disk_offload_filter:
            disk_filter = FrequencyFilter(
                decay_period_s=config.disk_offload_filter_decay_secs,
                max_entries=config.disk_offload_filter_max_entries,
            )
        self.planner = Planner(
            BlockPool(self.num_host_slots, "G2") if self.num_host_slots else None,
            block_size=self.block_size,
            world_size=vllm_config.parallel_config.world_size,
            disk_pool=BlockPool(self.num_disk_slots, "G3") if self.num_disk_slots else None,
            disk_filter=disk_filter,
            sync_load_tiers=SYNC_LOAD_TIERS[config.load_mode],
            cost=OnboardCost(policy=config.onboard_policy, block_size=self.block_size,
                             block_bytes=bytes_per_block_per_rank(kv_cache_config),
                             probe_blocks={DISK: 2}),  # learn a disk's speed on two blocks, not a prefix
        )
        self._last_step: tuple[float, int] | None = None  # (when, tokens) of the last scheduled step
        self._step_seconds = Rate()  # steps per second, over every step
        self.journal: DiskJournal | None = None
        if self.num_disk_slots and config.disk_persist:
            self.journal = self._open_journal(storage_key(vllm_config, kv_cache_config), identity)
        self._engine_root = engine_root(identity)
        self._requests: dict[str, Request] = {}
        self._failed_loads: set[str] = set()
        self._sync_reports: dict[str, int] = {}
        self.world_size = vllm_config.parallel_config.world_size
        self._lora_keys: OrderedDict[tuple[str, int, str], str] = OrderedDict()
        self._last_summary = time.monotonic()
        world = vllm_config.parallel_config.world_size
        self.metrics = CacheMetrics(
            self.planner, window=config.metrics_hit_rate_window, world_size=world,
            block_bytes=bytes_per_block_per_rank(kv_cache_config) * world,
        )
        #: One exporter per engine (this leader), never per rank: counts are not duplicated.
        self.exporter: MetricsExporter | None = None
        if config.metrics:
            par = vllm_config.parallel_config
            dp_local = par.data_parallel_rank_local if par.data_parallel_size > 1 else 0
            self.exporter = MetricsExporter(
                self.metrics, config.metrics_host, metrics_port(config, dp_local or 0)
            )
        if config.trace_file:
            self.trace = TraceWriter(config.trace_file, {
                "block_size": self.block_size, "gpu_blocks": kv_cache_config.num_blocks,
                "bytes_per_block": self.metrics.block_bytes, "host_blocks": self.num_host_slots,
                "disk_blocks": self.num_disk_slots, "load_mode": config.load_mode,
                "max_num_batched_tokens": vllm_config.scheduler_config.max_num_batched_tokens,
            })
        logger.info(
            "kvbm leader: G2 %d blocks, G3 %d blocks (filter %s%s), %d tokens per block, %d worker(s); "
            "loads inside the step from %s, asynchronous from %s (%s=%s)",
            self.num_host_slots, self.num_disk_slots, "on" if disk_filter is not None else "off",
            ", persistent" if self.journal else "", self.block_size, vllm_config.parallel_config.world_size,
            _tier_names(SYNC_LOAD_TIERS[config.load_mode]),
            _tier_names(t for t in (HOST, DISK) if t not in SYNC_LOAD_TIERS[config.load_mode]),
            env_var("load_mode"), config.load_mode,
        )

    def _open_journal(self, key: str, identity: str) -> DiskJournal:
        """Reload what a previous server left on disk: same files (``key``), and only
        if the identity (weights, quantization, overrides, ...) is unchanged."""
        name = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
        directory = ensure_private_dir(self.config.disk_cache_dir)
        journal = DiskJournal(os.path.join(directory, f"kvbm-g3-{name}.journal"), identity=identity)
        restored = self.planner.restore_disk(journal.load())
        logger.info("kvbm: reusing %d disk blocks from %s", restored, journal.path)
        return journal

    # ---- request lifecycle --------------------------------------------
    def _track(self, request: Request) -> None:
        if request.request_id in self._requests:
            return
        self._requests[request.request_id] = request
        root = None
        if getattr(request, "prompt_embeds", None) is None:
            lora = self._lora_key(request.lora_request) if request.lora_request else None
            mm_keys = [feature.identifier for feature in request.mm_features or ()]
            root = request_root(self._engine_root, request.cache_salt, lora, mm_keys)
        self.planner.add_request(request.request_id, root)

    def _lora_key(self, lora: LoRARequest) -> str:
        """Everything that tells adapters apart, folded into the request's hash root.

        vLLM keys its own prefix cache on the adapter's name *and path*, so a
        name re-pointed at another adapter never reuses KV; we add the int id
        (vLLM's workers cache loaded adapters by it). When G3 persists across
        restarts, or the request reloads the adapter in place, the same path
        may hold other weights than before: the files' fingerprint goes in too
        (read once per adapter, cached; unreadable ones are unique to this
        process, so nothing is reused across restarts).
        """
        key = (lora.lora_name, lora.lora_int_id, getattr(lora, "lora_path", "") or "")
        reload = bool(getattr(lora, "load_inplace", False))
        cached = self._lora_keys.get(key)
        if cached is None or reload:
            weights = None
            if self.config.disk_persist or reload:
                weights = fingerprint(key[2]) or f"unknown-{uuid.uuid4().hex}"
            cached = json.dumps([*key, weights])
            self._lora_keys[key] = cached
            while len(self._lora_keys) > LORA_KEYS:
                self._lora_keys.popitem(last=False)
        self._lora_keys.move_to_end(key)
        return cached

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        self._track(request)
        start = time.perf_counter()
        matched = self.planner.match(request.request_id, request.all_token_ids, num_computed_tokens)
        self.metrics.observe_lookup(time.perf_counter() - start)
        return matched, matched > 0 and self.planner.load_is_async(request.request_id)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._track(request)
        block_ids = blocks.get_block_ids()[0] if num_external_tokens > 0 else []
        self.planner.on_alloc(request.request_id, block_ids, num_external_tokens)
        if self.trace is not None:
            self.trace.scheduled(request.request_id, self.planner.load_sources(request.request_id))

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        if self.trace is not None:
            self.trace.finished(request.request_id, request.num_prompt_tokens, request.num_output_tokens,
                                self.planner.request_hashes(request.request_id))
        return self.planner.on_finished(request.request_id), None

    # ---- per step -------------------------------------------------------
    def build_connector_meta(self, so: SchedulerOutput) -> KvbmMetadata:
        planner = self.planner
        self._time_step(sum(so.num_scheduled_tokens.values()))
        for req_id in so.preempted_req_ids or ():
            planner.on_preempted(req_id)
        for new in so.scheduled_new_reqs:
            request = self._requests.get(new.req_id)
            if request is None:
                continue
            planner.on_scheduled(
                new.req_id, request.all_token_ids, new.block_ids[0], True,
                new.num_computed_tokens + so.num_scheduled_tokens.get(new.req_id, 0),
            )
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            request = self._requests.get(req_id)
            if request is None:
                continue
            new_ids = cached.new_block_ids[i]
            planner.on_scheduled(
                req_id, request.all_token_ids, new_ids[0] if new_ids else None,
                req_id in cached.resumed_req_ids,
                cached.num_computed_tokens[i] + so.num_scheduled_tokens.get(req_id, 0),
            )
        self.metrics.on_step()
        self._maybe_log_summary()
        return KvbmMetadata(
            plan=planner.take_plan(), num_host_slots=self.num_host_slots, num_disk_slots=self.num_disk_slots
        )

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if not isinstance(meta, KvbmWorkerMetadata):
            meta = KvbmWorkerMetadata()
        # A rank may report its failed load a step before vLLM reports the load finished
        # on every rank: remember failures until the load finishes.
        self._failed_loads |= meta.failed_loads | set(output.failed_recving if VLLM.output_has_failed_recving else ())
        finished = set(output.finished_recving or ())
        for req_id, reports in meta.sync_loaded.items():  # vLLM does not track synchronous loads
            count = self._sync_reports.get(req_id, 0) + reports
            if count >= self.world_size:
                self._sync_reports.pop(req_id, None)
                finished.add(req_id)
            else:
                self._sync_reports[req_id] = count
        failed = self._failed_loads.intersection(finished)
        self._failed_loads -= failed
        self.planner.on_worker_report(
            stored=meta.stored,
            failed_batches=meta.failed_batches,
            finished_loads=finished,
            failed_loads=failed,
            released=output.finished_sending or (),
            bad_disk_slots=meta.bad_disk_slots,
        )
        self.metrics.on_worker_report(meta.transfer_bytes, meta.transfer_seconds, meta.disk_errors)
        cost = self.planner.cost
        if cost is not None:
            for tier, direction in ((HOST, ONBOARD_H2D), (DISK, ONBOARD_D2D)):
                if meta.transfer_seconds.get(direction):
                    cost.observe_load(tier, meta.transfer_bytes.get(direction, 0), meta.transfer_seconds[direction])
        if meta.bad_disk_slots:
            logger.warning(
                "kvbm: %d disk block(s) failed verification or could not be read; they were "
                "dropped and their requests recompute (total so far: %d)",
                len(meta.bad_disk_slots), self.planner.stats.bad_disk_blocks,
            )
        commits = self.planner.take_disk_commits()
        if commits and self.journal is not None:
            self.journal.record_stored(commits)
            self.journal.flush()

    def _time_step(self, tokens: int) -> None:
        """The engine's prefill rate, for the load-or-recompute rule: the time from one step's
        scheduling to the next one's, over the tokens the first computed (vLLM steps back to
        back while it has work; an idle gap after a step only lowers one sample of an EWMA)."""
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
        for tier in (HOST, DISK):
            if tier not in self.planner.sync_load_tiers:
                cost.extra_seconds[tier] = typical

    def has_pending_work(self) -> bool:
        return self.planner.busy

    def _maybe_log_summary(self) -> None:
        """One line every DYN_KVBM_LOG_SUMMARY_SECS, for users without Prometheus."""
        interval = self.config.log_summary_secs
        if interval <= 0:
            return
        now = time.monotonic()
        if now - self._last_summary < interval:
            return
        self._last_summary = now
        logger.info("kvbm: %s", self.metrics.summary())

    def shutdown(self) -> None:
        if self.trace is not None:
            self.trace.close()
            self.trace = None
        if self.exporter is not None:
            self.exporter.close()
            self.exporter = None
        if self.journal is not None:
            self.journal.close()  # flushes what is pending: fewer misses after a restart
            self.journal = None
