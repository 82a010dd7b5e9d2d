"""``DynamoConnector``: kvbm as a vLLM v1 KV connector.

Load it with::

    --kv-transfer-config '{"kv_connector":"DynamoConnector","kv_role":"kv_both",
                           "kv_connector_module_path":"kvbm.vllm_integration.connector"}'

vLLM builds one instance per process and role: the SCHEDULER instance
delegates to :class:`KvbmLeader`, each WORKER instance to :class:`KvbmWorker`.
This class only routes calls; policy and data movement live elsewhere.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from kvbm.config import load_config
from kvbm.core.tiers import DISK, HOST
from kvbm.logs import ensure_log_handler
from kvbm.platform import prepare_cpu_process
from kvbm.preflight import KvbmStartupError, is_startup_error, startup_error
from kvbm.vllm_integration import compat
from kvbm.vllm_integration.metadata import KvbmMetadata

#: What this vLLM offers (see compat.py); hooks a release lacks are simply never called.
VLLM = compat.features()

if TYPE_CHECKING:
    from collections.abc import Iterable

    from vllm.config import VllmConfig
    from vllm.distributed.kv_events import KVCacheEvent
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class DynamoConnector(KVConnectorBase_V1, SupportsHMA):
    """Declares ``SupportsHMA``: vLLM keeps its hybrid KV-cache manager on, so sliding-window
    models keep their smaller GPU footprint and kvbm keeps every group's blocks
    (:mod:`kvbm.core.groups`)."""

    if VLLM.cache_hit_source is not None:
        _cache_hit_source = VLLM.cache_hit_source.HOST

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        try:
            self._start(vllm_config, role, kv_cache_config)
        except KvbmStartupError:
            raise
        except Exception as e:
            if not is_startup_error(e):
                raise
            raise startup_error(e) from None  # a setting, or the machine against it, is wrong: one clear line

    def _start(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        config = load_config(extra)
        ensure_log_handler(config.log_level)
        compat.check_supported(config.allow_untested_vllm)
        self._leader = None
        self._worker = None
        if role == KVConnectorRole.SCHEDULER:
            from kvbm.vllm_integration.leader import KvbmLeader

            compat.recompute_failed_loads(vllm_config, "kvbm")

            self._leader = KvbmLeader(config, vllm_config, kv_cache_config)
        else:
            from kvbm.vllm_integration.worker import KvbmWorker

            prepare_cpu_process()
            self._worker = KvbmWorker(config, vllm_config, kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped store is just a future miss

    # ---- scheduler side ---------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self._leader is not None
        return self._leader.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        assert self._leader is not None
        self._leader.update_state_after_alloc(request, blocks, num_external_tokens)

    def get_external_cache_hit_sources(self, request: Request, num_external_tokens: int) -> dict[Any, int]:
        """Split a hit by tier medium (host, disk) so vLLM's per-source metrics match kvbm's
        (vLLM 0.32+ calls this; older releases have no per-source metrics)."""
        assert self._leader is not None
        source = VLLM.cache_hit_source
        if source is None:
            return {}
        names = {HOST: source.HOST, DISK: source.DISK}
        out: dict[Any, int] = {}
        for medium, tokens in self._leader.runtime.hit_tokens_by_medium(request.request_id,
                                                                         num_external_tokens).items():
            name = names.get(medium, source.EXTERNAL_UNSPECIFIED)
            out[name] = out.get(name, 0) + tokens
        return out

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self._leader is not None
        return self._leader.build_connector_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self._leader is not None
        self._leader.update_connector_output(connector_output)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self._leader is not None
        return self._leader.request_finished(request, block_ids)

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        """vLLM's call under its hybrid manager; kvbm's answer does not depend on the block ids: it
        holds a finished request's blocks while its stores are in flight, in every group alike."""
        assert self._leader is not None
        return self._leader.request_finished(request, list(block_ids[0]) if block_ids else [])

    def take_events(self) -> Iterable[KVCacheEvent]:
        """kvbm's tier events (G2 "CPU", G3 "DISK", G4 "REMOTE"), which vLLM publishes with its G1 events: a
        KV-aware router (Dynamo's) credits a worker for prefixes it holds in G2/G3 (kvbm.runtime.events)."""
        return self._leader.take_events() if self._leader is not None else ()

    def has_pending_push_work(self) -> bool:
        # Keep the engine stepping until in-flight copies are reported, so
        # delayed block frees and pinned host slots are always released.
        return self._leader is not None and self._leader.has_pending_work()

    # ---- worker side ------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self._worker is not None
        self._worker.register_kv_caches(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if self._worker is not None and isinstance(kv_connector_metadata, KvbmMetadata):
            self._worker.handle_preemptions(kv_connector_metadata.plan)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmMetadata)
        self._worker.start_load(meta.plan, meta.capacities, forward_context)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Layer-wise in-step loads: this layer's blocks land before its attention (kvbm.runtime.layers)."""
        if self._worker is not None:
            self._worker.wait_for_layer_load(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: AttentionMetadata, **kwargs: Any
    ) -> None:
        return None  # stores are batched per step in wait_for_save

    def wait_for_save(self) -> None:
        assert self._worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvbmMetadata)
        self._worker.save(meta.plan)

    def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
        """vLLM 0.30+: completions and failed loads in one snapshot."""
        assert self._worker is not None and VLLM.transfer_results is not None
        sending, recving, failed = self._worker.transfer_results()
        return VLLM.transfer_results(finished_sending=sending, finished_recving=recving, failed_recving=failed)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """vLLM before 0.30. Failed loads are finished too (their block ids come through
        get_block_ids_with_load_errors); kvbm's worker metadata names them for its stats."""
        sending, recving, _ = self._worker.transfer_results() if self._worker else (set(), set(), set())
        return sending or None, recving or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.load_error_blocks() if self._worker is not None else set()

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self._worker.take_report() if self._worker is not None else None

    def shutdown(self) -> None:
        if self._worker is not None:
            self._worker.shutdown()
        if self._leader is not None:
            self._leader.shutdown()


def __getattr__(name: str) -> Any:
    """``PdConnector`` (kvbm.vllm_integration.pd) by this module's path, as Dynamo's disaggregated flow
    names it; loaded on first use (it subclasses vLLM's MultiConnector, which DynamoConnector never needs)."""
    if name == "PdConnector":
        from kvbm.vllm_integration.pd import PdConnector

        return PdConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
