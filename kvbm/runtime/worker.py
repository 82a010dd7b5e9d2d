"""One rank's kvbm, from the registration of its KV cache to its first step.

vLLM registers a worker's KV cache before the scheduler (kvbm's leader)
exists, so a rank cannot know its tiers at registration: it starts the
handshake (:mod:`kvbm.runtime.handshake`) in the background, which allocates
the tiers when the leader sends its chain (pinning pages and preallocating
files takes seconds for tens of GB, on every rank at once). The first step
then calls :meth:`WorkerBoot.wait`, which is instant by then (the leader's
constructor returned only after every rank acknowledged), and gets the
rank's :class:`~kvbm.transfer.runner.PlanRunner`, built once.

Which storage backs a tier comes from its medium, through :data:`MEDIA`, a
table of factories: host memory is a :class:`HostArena` (the copy engine's
rows), a disk a :class:`DiskArena` file, the shared store (G4) this rank's
:class:`~kvbm.storage.remote.RemoteStore`, keyed by the model identity the
leader sent and this rank's shard. A new medium is a new entry, not new code
here (``tests/test_chain.py`` adds one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from kvbm.config import KvbmConfig
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier
from kvbm.runtime.handshake import TierPlan, WorkerHandshake, WorkerLayout
from kvbm.storage.disk import DiskArena
from kvbm.storage.disk_faults import FaultInjector
from kvbm.storage.files import g3_file_tag
from kvbm.storage.host import HostArena
from kvbm.storage.remote_index import open_remote
from kvbm.transfer.executor import TransferExecutor
from kvbm.transfer.layout import KVLayout
from kvbm.transfer.media import BlockMedium, DiskMedium, RemoteMedium
from kvbm.transfer.runner import PlanRunner

__all__ = ["MEDIA", "MediumContext", "RankInfo", "WorkerBoot"]


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


class WorkerBoot:
    """Handshake, then tiers, then the rank's plan runner."""

    def __init__(self, config: KvbmConfig, info: RankInfo, layout: KVLayout, views: list[torch.Tensor], *,
                 media: Mapping[str, MediumFactory] = MEDIA) -> None:
        self.config = config
        self.info = info
        self.layout = layout
        self.views = views
        self.media = media
        report = WorkerLayout(rank=info.rank, world_size=info.world_size, bytes_per_block=layout.block_bytes,
                              num_gpu_blocks=info.num_gpu_blocks, layout=layout.signature())
        self._handshake = WorkerHandshake(config, info.engine_id, report, self._allocate).start()

    def _allocate(self, plan: TierPlan, progress: Callable[[float], None]) -> _Storage:
        """On the handshake's thread, every rank at once: the slow part (pinning pages, fallocate)."""
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

    def wait(self) -> PlanRunner:
        """The rank's runner. Bounded by the handshake timeout (see config), and instant in
        practice: the leader's constructor returned only after every rank acknowledged."""
        plan, storage = self._handshake.wait()
        executor = TransferExecutor(self.layout, self.views, host=storage.host, host_tier=storage.host_tier,
                                    media=storage.media)
        return PlanRunner(executor, {tier.name: tier.capacity for tier in plan.chain})

    def close(self) -> None:
        self._handshake.close()
