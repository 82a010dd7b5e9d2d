"""Tier sizing policy: how many G2/G3 blocks every rank allocates, and whether this host has room.

Pure functions over plain values (no sockets, no vLLM), so the policy is unit
tested on its own; :mod:`kvbm.runtime.handshake` only carries the inputs and
the answer between processes. The one impure helper,
:func:`machine_resources`, reads what the host offers (memory, free disk)
once, right before sizing.

Why check the machine at all: GB settings are totals over ranks and easy to
get wrong by a factor (``cpu_cache_gb`` = 2000 on a 512 GB host, see config), and
the sizes arrive over a socket. Without a check an oversized G2 ends in the
OOM killer minutes into start-up (pinned pages cannot be swapped) and an
oversized G3 in a long ``fallocate`` that fails; with it, start-up stops at
once with the setting to change.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvbm.config import MAX_COUNT, ConfigError, KvbmConfig, env_var
from kvbm.core.filter import DEFAULT_THRESHOLD
from kvbm.core.tiers import DISK, HOST, Tier, check_chain, standard_chain
from kvbm.storage.files import G3_FILE_PREFIX

#: Bounds on what one worker may report; anything beyond is a bug or a forgery.
MAX_WORLD_SIZE = 1 << 16
MAX_BLOCK_BYTES = 1 << 40


class SizingError(RuntimeError):
    """The tiers cannot be sized as configured; the message names the setting to change."""


@dataclass(frozen=True)
class WorkerLayout:
    """What one worker reports: enough for the leader to size and sanity-check the tiers."""

    rank: int
    world_size: int
    #: Bytes one block takes on this rank (its heads, all its layers): one G2/G3 slot.
    bytes_per_block: int
    num_gpu_blocks: int
    layout: str = ""
    pid: int = field(default_factory=os.getpid)
    host: str = field(default_factory=socket.gethostname)


@dataclass(frozen=True)
class TierSizes:
    """The agreed tier sizes, in blocks; the same on every rank (block ids are shared)."""

    host_slots: int
    disk_slots: int
    #: Sum over ranks of :attr:`WorkerLayout.bytes_per_block`: what GB settings are divided by.
    bytes_per_block_all_ranks: int
    #: G4: the digest of the model identity that names this engine's keys in Redis (the leader
    #: computes it from every rank's layout; each rank stores its shard under it); "": no G4.
    remote_key: str = ""


@dataclass(frozen=True)
class TierPlan:
    """What the leader's handshake sends every rank: the tier chain, built once (by the leader,
    from the settings and every rank's report), and the key of G4's values.

    Ranks build the storage of each tier from its ``medium`` (``kvbm.runtime.worker``'s
    table of media), so a new tier travels here without a new field."""

    chain: tuple[Tier, ...]
    #: Sum over ranks of :attr:`WorkerLayout.bytes_per_block`: what GB settings are divided by.
    bytes_per_block_all_ranks: int
    #: G4: the digest of the model identity that names this engine's keys in Redis; "": no G4.
    remote_key: str = ""

    @classmethod
    def configured(cls, config: KvbmConfig, sizes: TierSizes) -> TierPlan:
        """The plan of the settings' own chain (:func:`configured_chain`)."""
        return cls(configured_chain(config, sizes), sizes.bytes_per_block_all_ranks, sizes.remote_key)

    def blocks_on(self, medium: str) -> int:
        """Blocks the chain keeps on ``medium`` (what a host must have room for)."""
        return sum(tier.capacity for tier in self.chain if tier.medium == medium)

    def settings_sizes(self) -> TierSizes:
        """The plan in the settings' terms (host memory, disk), for :func:`check_fits`."""
        return TierSizes(self.blocks_on(HOST), self.blocks_on(DISK), self.bytes_per_block_all_ranks, self.remote_key)


def configured_chain(config: KvbmConfig, sizes: TierSizes) -> tuple[Tier, ...]:
    """The chain the settings describe: G2 and/or G3 as sized, then G4 if configured, each
    with the policy the settings give it (filters, load mode, persistence)."""
    chain = standard_chain(
        sizes.host_slots, sizes.disk_slots, load_mode=config.load_mode, disk_persistent=config.disk_persist,
        disk_filter_threshold=None if config.disable_disk_offload_filter else DEFAULT_THRESHOLD,
        remote=bool(sizes.remote_key),
        remote_filter_threshold=None if config.disable_remote_offload_filter else DEFAULT_THRESHOLD,
    )
    check_chain(chain)
    return chain


@dataclass(frozen=True)
class Machine:
    """What one host can give the tiers, in bytes; None where it cannot be read."""

    memory: int | None
    disk: int | None


def plan_tiers(config: KvbmConfig, layouts: Sequence[WorkerLayout]) -> TierSizes:
    """Size G2/G3 from every rank's report: block counts win; GB is the total over ranks."""
    blocks = {layout.num_gpu_blocks for layout in layouts}
    if len(blocks) > 1:
        detail = ", ".join(f"rank {w.rank}: {w.num_gpu_blocks}" for w in sorted(layouts, key=lambda w: w.rank))
        raise SizingError(
            f"kvbm: workers report different numbers of GPU blocks ({detail}); all ranks must share "
            "block ids. Start every rank of one vLLM instance with the same settings."
        )
    total = sum(layout.bytes_per_block for layout in layouts)
    try:
        sizes = TierSizes(config.host_blocks(total), config.disk_blocks(total), total)
    except ConfigError as exc:
        raise SizingError(str(exc)) from None
    for slots, key in ((sizes.host_slots, "cpu_cache"), (sizes.disk_slots, "disk_cache")):
        if slots > MAX_COUNT:
            raise SizingError(
                f"kvbm: {slots} blocks is more than kvbm addresses ({MAX_COUNT}); lower {env_var(key + '_gb')}"
            )
    return sizes


def check_fits(config: KvbmConfig, sizes: TierSizes, bytes_per_block: int, machine: Machine, where: str) -> None:
    """Refuse tiers this host cannot hold, before allocating anything.

    ``bytes_per_block`` is the sum over the ranks that allocate on this host
    (the leader passes its co-located workers, a worker its own slice). G2
    must fit in the memory available (pinned pages cannot be swapped out); G3
    in the free space of the disk directory, counting kvbm's own old files
    there. Only the payload is counted (slot headers and alignment add at
    most a page per block), so a size this refuses can never fit; the disk
    arena's own checks catch the rest.
    """
    host = sizes.host_slots * bytes_per_block
    if host and machine.memory is not None and host > machine.memory:
        key = "cpu_cache_override_num_blocks" if config.cpu_cache_override_num_blocks else "cpu_cache_gb"
        raise SizingError(
            f"kvbm: the host tier (G2) needs {_gb(host)} on {where}, which has {_gb(machine.memory)} of memory "
            f"available: lower {env_var(key)} (GB settings are totals over all ranks)"
        )
    disk = sizes.disk_slots * bytes_per_block
    if disk and machine.disk is not None and disk > machine.disk:
        key = "disk_cache_override_num_blocks" if config.disk_cache_override_num_blocks else "disk_cache_gb"
        raise SizingError(
            f"kvbm: the disk tier (G3) needs {_gb(disk)} in {config.disk_cache_dir} on {where}, which has "
            f"{_gb(machine.disk)} free: lower {env_var(key)} or point {env_var('disk_cache_dir')} at a larger disk"
        )


def local_bytes_per_block(layouts: Sequence[WorkerLayout], host: str) -> int:
    """Bytes per block of the ranks that run on ``host`` (they allocate from the same memory and disk)."""
    return sum(layout.bytes_per_block for layout in layouts if layout.host == host)


def machine_resources(disk_dir: str, *, need_disk: bool = True) -> Machine:
    """Memory available to this process and free space for G3 in ``disk_dir``."""
    return Machine(_memory_available(), _disk_room(disk_dir) if need_disk else None)


def _memory_available() -> int | None:
    """``MemAvailable``, capped by a cgroup (container) memory limit."""
    limits = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    limits.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit():
            limits.append(int(text))
    return min(limits) if limits else None


def _disk_room(disk_dir: str) -> int | None:
    """Free bytes where G3 goes (the nearest existing ancestor, if it is not created yet),
    plus the size of kvbm's own G3 files already there."""
    path = os.path.abspath(disk_dir)
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        info = os.statvfs(path)
    except OSError:
        return None
    return info.f_bavail * info.f_frsize + own_g3_bytes(disk_dir)


def own_g3_bytes(disk_dir: str) -> int:
    """Disk space held by kvbm's G3 files in ``disk_dir`` (never following links)."""
    total = 0
    try:
        with os.scandir(disk_dir) as entries:
            for entry in entries:
                if entry.name.startswith(G3_FILE_PREFIX) and entry.is_file(follow_symlinks=False):
                    total += entry.stat(follow_symlinks=False).st_blocks * 512
    except OSError:
        pass
    return total


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB"
