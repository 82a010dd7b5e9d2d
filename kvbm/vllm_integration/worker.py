"""Worker-side half of the connector: one per tensor-parallel rank.

Owns this rank's G2 arena and copy engine, executes the leader's plan each
step, and reports completions back (store batches through worker metadata,
loads through vLLM's finished_recving).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from kvbm.config import KvbmConfig
from kvbm.storage.host import HostArena
from kvbm.transfer.engine import CopyEngine, TorchCopyEngine
from kvbm.transfer.layout import describe_kv_caches
from kvbm.vllm_integration.metadata import KvbmMetadata, KvbmWorkerMetadata
from kvbm.vllm_integration.sizing import host_slots

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger(__name__)


class KvbmWorker:
    def __init__(self, config: KvbmConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        self.config = config
        self._kv_cache_config = kv_cache_config
        self.num_host_slots = host_slots(config, vllm_config, kv_cache_config)
        self.engine: CopyEngine | None = None
        self.arena: HostArena | None = None
        self._inflight_batches: set[int] = set()
        self._release_after: dict[str, int] = {}  # req_id -> store batch to wait for
        self._finished_loads: set[str] = set()
        self._failed_loads: set[str] = set()
        self._load_blocks: dict[str, list[int]] = {}
        self._load_error_blocks: set[int] = set()
        self._report = KvbmWorkerMetadata()

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout, views = describe_kv_caches(kv_caches, self._kv_cache_config.num_blocks)
        logger.info("kvbm worker: KV layout %s", layout.describe())
        self.arena = HostArena(self.num_host_slots, layout.block_bytes)
        self.engine = TorchCopyEngine(layout, views, self.arena)

    # ---- per step -------------------------------------------------------
    def _check(self, meta: KvbmMetadata) -> None:
        if meta.num_host_slots != self.num_host_slots:
            raise RuntimeError(
                f"kvbm: leader sized G2 at {meta.num_host_slots} blocks but this worker at "
                f"{self.num_host_slots}; start all processes with the same DYN_KVBM_* settings"
            )

    def handle_preemptions(self, meta: KvbmMetadata) -> None:
        if meta.plan.drain_stores and self.engine is not None:
            self.engine.drain()

    def start_load(self, meta: KvbmMetadata) -> None:
        self._check(meta)
        assert self.engine is not None, "register_kv_caches was not called"
        for op in meta.plan.loads:
            self._load_blocks[op.req_id] = op.gpu_blocks
            self.engine.load(op.req_id, op.host_slots, op.gpu_blocks)

    def save(self, meta: KvbmMetadata) -> None:
        plan = meta.plan
        if plan.store is not None and self.engine is not None:
            self._inflight_batches.add(plan.store.batch_id)
            self.engine.store(plan.store.batch_id, plan.store.gpu_blocks, plan.store.host_slots)
        for req_id, batch_id in plan.release_after_store:
            self._release_after[req_id] = batch_id

    def _poll(self) -> None:
        if self.engine is None:
            return
        for done in self.engine.poll():
            if done.kind == "store":
                self._inflight_batches.discard(done.key)  # type: ignore[arg-type]
                if done.ok:
                    self._report.stored[done.key] = self._report.stored.get(done.key, 0) + 1  # type: ignore[index]
                else:
                    self._report.failed_batches.add(done.key)  # type: ignore[arg-type]
            else:
                req_id = str(done.key)
                self._finished_loads.add(req_id)
                blocks = self._load_blocks.pop(req_id, [])
                if not done.ok:
                    self._failed_loads.add(req_id)
                    self._load_error_blocks.update(blocks)

    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since last call."""
        self._poll()
        released = {r for r, b in self._release_after.items() if b not in self._inflight_batches}
        for req_id in released:
            del self._release_after[req_id]
        loads, self._finished_loads = self._finished_loads, set()
        failed, self._failed_loads = self._failed_loads, set()
        return released, loads, failed

    def load_error_blocks(self) -> set[int]:
        errors, self._load_error_blocks = self._load_error_blocks, set()
        return errors

    def take_report(self) -> KvbmWorkerMetadata | None:
        report, self._report = self._report, KvbmWorkerMetadata()
        if not report.stored and not report.failed_batches:
            return None
        return report

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.drain()
