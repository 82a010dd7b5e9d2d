"""One rank's kvbm, from the registration of its KV cache to its first step.

vLLM registers a worker's KV cache before the scheduler (kvbm's leader)
exists, so a rank cannot know its tier sizes at registration: it starts the
handshake (:mod:`kvbm.runtime.handshake`) in the background, which allocates
the tiers when the leader says how big (pinning pages and preallocating files
takes seconds for tens of GB, on every rank at once). The first step then
calls :meth:`WorkerBoot.wait`, which is instant by then (the leader's
constructor returned only after every rank acknowledged), and gets the
rank's :class:`~kvbm.transfer.runner.PlanRunner`, built once.

Which storage backs a tier comes from the chain (:mod:`kvbm.core.tiers`): a
host tier is a :class:`HostArena`, a disk tier a :class:`DiskArena` file, the
shared tier (G4) this rank's :class:`~kvbm.storage.remote.RemoteStore`, keyed
by the model identity the leader sent and this rank's shard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvbm.config import KvbmConfig
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier, standard_chain
from kvbm.runtime.handshake import TierSizes, WorkerHandshake, WorkerLayout
from kvbm.storage.disk import DiskArena, FaultInjector
from kvbm.storage.files import g3_file_tag
from kvbm.storage.host import HostArena
from kvbm.storage.remote_index import open_remote
from kvbm.transfer.executor import TransferExecutor
from kvbm.transfer.layout import KVLayout
from kvbm.transfer.media import BlockMedium, DiskMedium, RemoteMedium
from kvbm.transfer.runner import PlanRunner

__all__ = ["WorkerBoot", "RankInfo"]


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


@dataclass
class _Storage:
    """What the handshake allocated for this rank."""

    host: HostArena | None = None
    host_tier: str = "G2"
    media: dict[str, BlockMedium] = field(default_factory=dict)


class WorkerBoot:
    """Handshake, then tiers, then the rank's plan runner."""

    def __init__(self, config: KvbmConfig, info: RankInfo, layout: KVLayout, views: list[torch.Tensor]) -> None:
        self.config = config
        self.info = info
        self.layout = layout
        self.views = views
        report = WorkerLayout(rank=info.rank, world_size=info.world_size, bytes_per_block=layout.block_bytes,
                              num_gpu_blocks=info.num_gpu_blocks, layout=layout.signature())
        self._handshake = WorkerHandshake(config, info.engine_id, report, self._allocate).start()

    def _allocate(self, sizes: TierSizes, progress: Callable[[float], None]) -> _Storage:
        """On the handshake's thread, every rank at once: the slow part (pinning pages, fallocate)."""
        if self.views and self.views[0].is_cuda:
            torch.cuda.set_device(self.views[0].device)  # per thread: pin in this rank's CUDA context
        cfg, bb = self.config, self.layout.block_bytes
        storage = _Storage()
        for tier in _chain(sizes):
            if tier.medium == HOST:
                storage.host_tier, storage.host = tier.name, HostArena(tier.capacity, bb, on_progress=progress)
            elif tier.medium == DISK:
                faults = dict(cfg.disk_fault_injection)
                seed = int(faults.pop("seed", 0)) + self.info.global_rank
                arena = DiskArena(
                    cfg.disk_cache_dir, tier.capacity, bb,
                    file_tag=g3_file_tag(self.info.storage_key, self.info.global_rank, persistent=cfg.disk_persist),
                    zerofill_fallback=cfg.disk_zerofill_fallback, disable_o_direct=cfg.disk_disable_o_direct,
                    fault_hook=FaultInjector(faults, seed) if faults else None,
                )
                storage.media[tier.name] = DiskMedium(arena, durable=cfg.disk_persist,
                                                      delete_on_close=not cfg.disk_persist)
            elif tier.medium == REMOTE:
                store = open_remote(cfg, sizes.remote_key, rank=self.info.rank, world_size=self.info.world_size)
                storage.media[tier.name] = RemoteMedium(store)
        return storage

    def wait(self) -> PlanRunner:
        """The rank's runner. Bounded by the handshake timeout (see config), and instant in
        practice: the leader's constructor returned only after every rank acknowledged."""
        sizes, storage = self._handshake.wait()
        executor = TransferExecutor(self.layout, self.views, host=storage.host, host_tier=storage.host_tier,
                                    media=storage.media)
        return PlanRunner(executor, {tier.name: tier.capacity for tier in _chain(sizes)})

    def close(self) -> None:
        self._handshake.close()


def _chain(sizes: TierSizes) -> tuple[Tier, ...]:
    """The tiers this rank holds: what the leader's chain names (the leader adds policy)."""
    return standard_chain(sizes.host_slots, sizes.disk_slots, remote=bool(sizes.remote_key))
