"""Scheduler-side half of the connector: vLLM's requests → the leader runtime (the only door to the planner).

Lives in vLLM's EngineCore process and runs every engine step, so it only
does work proportional to the blocks that changed this step. Everything that
is not about vLLM's objects (tiers, planner, journal, metrics, cost model)
is in :class:`kvbm.runtime.leader.LeaderRuntime`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kvbm.config import KvbmConfig
from kvbm.core.hashing import request_root
from kvbm.runtime.events import EngineEvents
from kvbm.runtime.groups import kv_cache_groups
from kvbm.runtime.identity import bytes_per_block_per_rank, model_identity, storage_key, weights_fingerprint
from kvbm.runtime.leader import EngineInfo, LeaderRuntime
from kvbm.runtime.lora import LoraKeys
from kvbm.vllm_integration.compat import drops_last_hit_block, features, kv_cache_layout, kv_event_schema
from kvbm.vllm_integration.metadata import KvbmMetadata, KvbmWorkerMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)
VLLM = features()

#: vLLM's null block: the id its block pool hands out for positions a group keeps no KV for
#: (before a sliding window). Block 0 of the pool, never given to a request as a real block.
NULL_BLOCK = 0


class KvbmLeader:
    def __init__(self, config: KvbmConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        self.config = config
        self.block_size = vllm_config.cache_config.block_size
        self.groups = kv_cache_groups(kv_cache_config, self.block_size)
        key = storage_key(vllm_config, kv_cache_config, kv_cache_layout(kv_cache_config, vllm_config))
        par = vllm_config.parallel_config
        dp = par.data_parallel_size > 1
        engine = EngineInfo(
            block_size=self.block_size, world_size=par.world_size, engine_id=vllm_config.kv_transfer_config.engine_id,
            block_bytes=bytes_per_block_per_rank(kv_cache_config), gpu_blocks=kv_cache_config.num_blocks,
            storage_key=key,
            max_num_batched_tokens=vllm_config.scheduler_config.max_num_batched_tokens,
            groups=self.groups, null_block=NULL_BLOCK,
            data_parallel_rank_local=(par.data_parallel_rank_local or 0) if dp else 0,
            data_parallel_rank=(par.data_parallel_rank or 0) if dp else 0,
            drop_last_hit_block=drops_last_hit_block(vllm_config),
        )
        # Hashed here, once, not inside the handshake: its thread must keep beaconing (a cold
        # 16 GB checkpoint takes seconds to tens of seconds) and both identities must agree.
        weights = weights_fingerprint(vllm_config, config.disk_cache_dir) if config.blocks_outlive_process else None

        def identity_of(workers):  # with G4, the handshake sends every rank the key of this identity
            return model_identity(vllm_config, key, vllm_version=VLLM.version, weights=weights,
                                  fingerprint_weights=config.blocks_outlive_process,
                                  kv_layout="|".join(w.layout for w in workers))

        self.runtime = LeaderRuntime.boot(config, engine, identity_of)
        self._requests: dict[str, Request] = {}
        self._lora = LoraKeys(config.blocks_outlive_process)
        # KV events for G2/G3/G4 (a KV-aware router's view of this worker); None unless vLLM publishes events.
        self.events = (EngineEvents.attach(vllm_config, self.runtime, self._requests, kv_event_schema)
                       if config.kv_events else None)

    # ---- request lifecycle --------------------------------------------
    def _track(self, request: Request) -> None:
        if request.request_id in self._requests:
            return
        self._requests[request.request_id] = request
        root = None
        if getattr(request, "prompt_embeds", None) is None:
            lora = self._lora.of_request(request.lora_request)
            mm_keys = [feature.identifier for feature in request.mm_features or ()]
            root = request_root(self.runtime.engine_root, request.cache_salt, lora, mm_keys)
        self.runtime.add_request(request.request_id, root)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """(None, False) while G4's lookup is out: vLLM skips the request this step and asks again
        (every supported release does, see compat)."""
        self._track(request)
        return self.runtime.match(request.request_id, request.all_token_ids, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        self._track(request)
        block_ids = blocks.get_block_ids() if num_external_tokens > 0 else [[] for _ in self.groups]
        self.runtime.allocated(request.request_id, block_ids, num_external_tokens)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._requests.pop(request.request_id, None)
        return self.runtime.finished(request.request_id, request.num_prompt_tokens, request.num_output_tokens), None

    # ---- per step -------------------------------------------------------
    def build_connector_meta(self, so: SchedulerOutput) -> KvbmMetadata:
        runtime = self.runtime
        runtime.begin_step(sum(so.num_scheduled_tokens.values()))
        for req_id in so.preempted_req_ids or ():
            runtime.preempted(req_id)
        for new in so.scheduled_new_reqs:
            request = self._requests.get(new.req_id)
            if request is not None:
                runtime.scheduled(new.req_id, request.all_token_ids, new.block_ids, True, new.num_computed_tokens,
                                  so.num_scheduled_tokens.get(new.req_id, 0))
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            request = self._requests.get(req_id)
            if request is not None:
                runtime.scheduled(req_id, request.all_token_ids, cached.new_block_ids[i] or None,
                                  req_id in cached.resumed_req_ids, cached.num_computed_tokens[i],
                                  so.num_scheduled_tokens.get(req_id, 0))
        return KvbmMetadata(plan=runtime.end_step(), capacities=runtime.capacities)

    def update_connector_output(self, output: KVConnectorOutput) -> None:
        meta = output.kv_connector_worker_meta
        if not isinstance(meta, KvbmWorkerMetadata):
            meta = KvbmWorkerMetadata()
        failed = output.failed_recving if VLLM.output_has_failed_recving else ()
        self.runtime.workers_reported(meta, output.finished_recving or (), failed or (), output.finished_sending or ())

    def take_events(self) -> list[Any]:
        """KV events of kvbm's tiers since the last call, in vLLM's schema (kvbm.runtime.events)."""
        return self.events.take_events() if self.events is not None else []

    def has_pending_work(self) -> bool:
        return self.runtime.busy

    def shutdown(self) -> None:
        self.runtime.close()
