"""Worker-side half of the connector: one per tensor-parallel rank.

Only reads the rank from vLLM's config and wraps the rank's report in vLLM's worker
metadata; everything else (boot, plan runner, layer-wise loads) is
:class:`kvbm.runtime.worker.WorkerRuntime`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.config import KvbmConfig
from kvbm.runtime.identity import storage_key
from kvbm.runtime.worker import RankInfo, WorkerRuntime, global_rank
from kvbm.vllm_integration.compat import kv_cache_layout
from kvbm.vllm_integration.metadata import KvbmWorkerMetadata

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


class KvbmWorker(WorkerRuntime):
    def __init__(self, config: KvbmConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        world_size, rank = vllm_config.parallel_config.world_size, global_rank()
        super().__init__(config, RankInfo(
            rank=rank % world_size, world_size=world_size, engine_id=vllm_config.kv_transfer_config.engine_id,
            storage_key=storage_key(vllm_config, kv_cache_config, kv_cache_layout(kv_cache_config, vllm_config)),
            num_gpu_blocks=kv_cache_config.num_blocks, global_rank=rank,
        ))

    def take_report(self) -> KvbmWorkerMetadata | None:
        report = super().take_report()
        return KvbmWorkerMetadata(**vars(report)) if report is not None else None
