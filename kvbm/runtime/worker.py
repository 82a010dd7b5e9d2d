"""One tensor-parallel rank's kvbm, without vLLM: the counterpart of :class:`~kvbm.runtime.leader.LeaderRuntime`.

vLLM registers a worker's KV cache before the scheduler (kvbm's leader)
exists, so a rank cannot know its tiers at registration: it starts the
handshake (:mod:`kvbm.runtime.handshake`) in the background, which allocates
the tiers when the leader sends its chain (pinning pages and preallocating
files takes seconds for tens of GB, on every rank at once). The first step
then waits for it, which is instant by then (the leader's constructor
returned only after every rank acknowledged), and builds the rank's
:class:`~kvbm.transfer.runner.PlanRunner` once. From then on every call goes
to the runner, which runs the leader's plan through the transfer executor and
reports back (store batches through the step's report, loads through the
engine's finished-receiving set). Whether a step's in-step loads land layer by
layer is :class:`kvbm.runtime.layers.LayerHooks`' call. The vLLM adapter
(:mod:`kvbm.vllm_integration.worker`) only reads the rank from vLLM's config
and wraps the report.

Which storage backs a tier comes from its medium, through :data:`MEDIA`, a
table of factories: host memory is a :class:`HostArena` (the copy engine's
rows), a disk a :class:`DiskArena` file, the shared store (G4) this rank's
:class:`~kvbm.storage.remote.RemoteStore`, keyed by the model identity the
leader sent and this rank's shard. A new medium is a new entry, not new code
here (``tests/test_chain.py`` adds one).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from kvbm.config import KvbmConfig
from kvbm.core.plan import StepPlan, WorkerReport
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier
from kvbm.runtime.handshake import TierPlan, WorkerHandshake, WorkerLayout
from kvbm.runtime.layers import LayerHooks, hooks_run
from kvbm.storage.disk import DiskArena
from kvbm.storage.disk_faults import FaultInjector
from kvbm.storage.files import g3_file_tag
from kvbm.storage.host import HostArena
from kvbm.storage.remote_index import open_remote
from kvbm.transfer.executor import TransferExecutor
from kvbm.transfer.layout import KVLayout, describe_kv_caches
from kvbm.transfer.media import BlockMedium, DiskMedium, RemoteMedium
from kvbm.transfer.runner import PlanRunner

logger = logging.getLogger(__name__)

__all__ = ["MEDIA", "MediumContext", "RankInfo", "WorkerRuntime", "global_rank"]


def global_rank() -> int:
    """This process's rank in torch.distributed (0 when it is not initialized)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


@dataclass(frozen=True)
class RankInfo:
    """Who this rank is, as vLLM says."""

    rank: int  # within the engine (tensor and pipeline parallel)
    world_size: int
    engine_id: str | None
    #: Model and slot shape (names persistent G3 files; see kvbm.storage.files).
    storage_key: str
    num_gpu_blocks: int
    #: The process's global rank: names its G3 file and seeds its fault injection, so
    #: data-parallel engines sharing a directory never collide.
    global_rank: int = 0


@dataclass(frozen=True)
class MediumContext:
    """What a medium's factory may need besides its tier."""

    config: KvbmConfig
    info: RankInfo
    block_bytes: int  # one block on this rank: one slot
    remote_key: str  # the leader's key for shared values ("" without G4)
    progress: Callable[[float], None]  # report allocation progress (0..1) to the leader


#: Builds a tier's storage on this rank: host rows (a :class:`HostArena`, copied by the copy
#: engine) or a :class:`BlockMedium` (read and written on an I/O thread of its own).
MediumFactory = Callable[[MediumContext, Tier], "HostArena | BlockMedium"]


def _host(ctx: MediumContext, tier: Tier) -> HostArena:
    return HostArena(tier.capacity, ctx.block_bytes, on_progress=ctx.progress)


def _disk(ctx: MediumContext, tier: Tier) -> BlockMedium:
    cfg = ctx.config
    faults = dict(cfg.disk_fault_injection)
    seed = int(faults.pop("seed", 0)) + ctx.info.global_rank
    arena = DiskArena(
        cfg.disk_cache_dir, tier.capacity, ctx.block_bytes,
        file_tag=g3_file_tag(ctx.info.storage_key, ctx.info.global_rank, persistent=cfg.disk_persist),
        zerofill_fallback=cfg.disk_zerofill_fallback, disable_o_direct=cfg.disk_disable_o_direct,
        fault_hook=FaultInjector(faults, seed) if faults else None,
    )
    return DiskMedium(arena, durable=cfg.disk_persist, delete_on_close=not cfg.disk_persist)


def _remote(ctx: MediumContext, tier: Tier) -> BlockMedium:
    return RemoteMedium(open_remote(ctx.config, ctx.remote_key, rank=ctx.info.rank, world_size=ctx.info.world_size))


#: The storage of each medium a chain may name.
MEDIA: Mapping[str, MediumFactory] = {HOST: _host, DISK: _disk, REMOTE: _remote}


@dataclass
class _Storage:
    """What the handshake allocated for this rank."""

    host: HostArena | None = None
    host_tier: str = "G2"
    media: dict[str, BlockMedium] = field(default_factory=dict)


class WorkerRuntime:
    """Registration starts the handshake, which allocates the tiers; the first step builds the plan runner."""

    def __init__(self, config: KvbmConfig, info: RankInfo, *, media: Mapping[str, MediumFactory] = MEDIA) -> None:
        self.config = config
        self.info = info
        self.media = media
        self.layout: KVLayout | None = None
        self.views: list[torch.Tensor] = []
        self._handshake: WorkerHandshake[_Storage] | None = None  # from register_kv_caches until the first step
        self._runner: PlanRunner | None = None  # from the first step on
        self._hooks = LayerHooks((), (), enabled=False)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout, views = describe_kv_caches(kv_caches, self.info.num_gpu_blocks)
        logger.info("kvbm worker: KV layout %s", layout.describe())
        mode = self.config.layerwise_loads
        self._hooks = LayerHooks([layer.name for layer in layout.layers], kv_caches,
                                 enabled=mode == "on" or (mode == "auto" and views[0].is_cuda))
        # vLLM builds the scheduler (our leader) only after every worker has
        # registered and warmed up: never block here. The first step waits.
        self.layout, self.views = layout, views
        report = WorkerLayout(rank=self.info.rank, world_size=self.info.world_size, bytes_per_block=layout.block_bytes,
                              num_gpu_blocks=self.info.num_gpu_blocks, layout=layout.signature())
        self._handshake = WorkerHandshake(self.config, self.info.engine_id, report, self._allocate).start()

    def _allocate(self, plan: TierPlan, progress: Callable[[float], None]) -> _Storage:
        """On the handshake's thread, every rank at once: the slow part (pinning pages, fallocate)."""
        assert self.layout is not None
        if self.views and self.views[0].is_cuda:
            torch.cuda.set_device(self.views[0].device)  # per thread: pin in this rank's CUDA context
        ctx = MediumContext(self.config, self.info, self.layout.block_bytes, plan.remote_key, progress)
        storage = _Storage()
        for tier in plan.chain:
            factory = self.media.get(tier.medium)
            if factory is None:
                raise ValueError(f"tier {tier.name}: no storage for medium {tier.medium!r} on this worker "
                                 f"(it knows {sorted(self.media)}); run the same kvbm version on every rank")
            made = factory(ctx, tier)
            if isinstance(made, HostArena):  # host rows: the copy engine reads and writes them directly
                if storage.host is not None:
                    raise ValueError(f"tier {tier.name}: only one tier of host rows per rank")
                storage.host_tier, storage.host = tier.name, made
            else:
                storage.media[tier.name] = made
        return storage

    @property
    def runner(self) -> PlanRunner:
        """The rank's plan runner, built at the first step that needs it. The wait is bounded by the
        handshake timeout (see config), and instant in practice: the leader's constructor returned
        only after every rank acknowledged."""
        if self._runner is None:
            if self._handshake is None:
                raise RuntimeError("kvbm: vLLM ran a step before registering its KV caches")
            plan, storage = self._handshake.wait()
            assert self.layout is not None
            executor = TransferExecutor(self.layout, self.views, host=storage.host, host_tier=storage.host_tier,
                                        media=storage.media)
            self._runner = PlanRunner(executor, {tier.name: tier.capacity for tier in plan.chain})
            self._handshake = None
        return self._runner

    def handle_preemptions(self, plan: StepPlan) -> None:
        if plan.drain_stores:
            self.runner.drain()

    def start_load(self, plan: StepPlan, capacities: dict[str, int], forward_context: Any) -> None:
        """Every step, empty ones included: start the step's loads, and the plan's work that
        does not depend on this step's forward pass (spills read committed blocks). vLLM
        before 0.31 skips ``wait_for_save`` on steps without a forward pass, so work left
        for :meth:`save` would be lost there; only stores of blocks this step computes wait
        for it, and an empty step computes none. ``capacities``: the leader's tier sizes."""
        self.runner.check(capacities)
        self.runner.start_step(plan, self._hooks.begin_step(hooks_run(forward_context)))

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Before every attention layer of every step (vLLM's hook). With layer-wise loads off (the
        default on CPU, or turned off once they could not be used) there is nothing to wait for or
        learn, so return at once: this is kvbm's most frequent call."""
        if not self._hooks.enabled:
            return
        index = self._hooks.hooked(layer_name)
        if self._runner is not None:
            self._runner.wait_layer(index)

    def save(self, plan: StepPlan) -> None:
        """After the forward pass: store the blocks this step filled."""
        if self._hooks.end_step(self.runner.layered):
            self.runner.fail_layers()
        self.runner.store(plan)

    # Asked every step after the forward pass; nothing to say before the first step.
    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call."""
        return self._runner.results() if self._runner is not None else (set(), set(), set())

    def load_error_blocks(self) -> set[int]:
        return self._runner.load_error_blocks() if self._runner is not None else set()

    def take_report(self) -> WorkerReport | None:
        return self._runner.take_report() if self._runner is not None else None

    def shutdown(self) -> None:
        if self._handshake is not None:
            self._handshake.close()
        if self._runner is not None:
            self._runner.close()
