"""The tier chain: where kvbm keeps blocks beyond vLLM's GPU cache, as data.

G1 is vLLM's GPU KV cache. kvbm adds an ordered chain of tiers behind it,
typically G2 (pinned host memory), G3 (a local disk file), G4 (a store shared
by servers). Each tier is described by one small :class:`Tier`; the planner,
the pools, the admission filter, the load-or-recompute rule and the metrics
loop over the chain, so a chain without G2 is disk-only mode and a new tier
is a new entry, not new control flow:

* **store** (write-through): every block vLLM computes goes G1 → the first tier;
* **spill**: a block committed in tier i goes on to tier i+1 once tier i+1's
  admission filter lets it (its sightings reach ``filter_threshold``);
* **load**: a prompt's prefix is matched tier by tier in chain order (G2's run,
  then G3 continuing it, ...) and loaded back into G1.

Pure data and one protocol: no torch, no vLLM.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kvbm.core.filter import DEFAULT_THRESHOLD
from kvbm.core.hashing import BlockHash

if TYPE_CHECKING:
    from kvbm.core.pool import PoolStats

#: vLLM's GPU KV cache: the source of every store and the destination of every load.
G1 = "G1"

#: Media: what a tier's blocks live in (the worker's executor picks its mover from it).
HOST = "host"  # pinned host memory rows (G2): no per-block header
DISK = "disk"  # a local file of slots, each with a verified header (G3)
REMOTE = "remote"  # a store shared by servers, keyed by hash (G4)

#: Load modes (``load_mode``, see config; :func:`loads_in_step`).
LOAD_MODES = ("auto", "sync", "async")


@dataclass(frozen=True)
class Tier:
    """One tier of the chain."""

    name: str  # "G2", "G3", "G4": the name in plans, reports, logs and metrics
    medium: str  # HOST, DISK, REMOTE (or a medium of one's own: see tests/test_chain.py)
    #: Blocks it holds (per rank; every rank holds its shard of each block). 0 for a shared tier
    #: whose size is managed elsewhere (Redis's maxmemory).
    capacity: int
    #: Spills into this tier need the block's frequency (kvbm.core.filter) to reach this;
    #: None admits every block committed in the tier above.
    filter_threshold: int | None = None
    #: Shared by several servers (G4): hash-addressed, looked up in one round trip for
    #: the whole rest of a prompt, never pinned (another server may evict a block).
    shared: bool = False
    #: Its loads may run inside the step that matched them (the request is scheduled at
    #: once); otherwise the request waits, unscheduled, while others run.
    sync_load: bool = False
    #: Its commits are journaled, so a restarted server finds its blocks again.
    persistent: bool = False

    @property
    def keyed(self) -> bool:
        """Whether block hashes travel with its slots (a medium that verifies or is keyed by
        them); host rows carry no header, so G2 plans ship no hashes."""
        return self.medium != HOST


def move(src: str, dst: str) -> str:
    """The key of a direction in worker reports and metrics, e.g. ``"G2->G1"``."""
    return f"{src}->{dst}"


def loads_in_step(load_mode: str, medium: str) -> bool:
    """The load mode (see config): whether a tier on ``medium`` loads inside the step that matched it.

    "auto": host memory only. Its copy takes a fraction of a step, and loading
    in-step saves the steps an asynchronous load costs (start it, report it,
    schedule the request); a disk or network read could stall every request of
    the step, so those stay asynchronous. "sync" / "async" force every tier.
    """
    if load_mode not in LOAD_MODES:
        raise ValueError(f"unknown load mode {load_mode!r}; choose one of {LOAD_MODES}")
    return load_mode == "sync" or (load_mode == "auto" and medium == HOST)


def standard_chain(host_blocks: int, disk_blocks: int, *, load_mode: str = "auto",
                   disk_filter_threshold: int | None = DEFAULT_THRESHOLD,
                   disk_persistent: bool = False, remote: bool = False,
                   remote_filter_threshold: int | None = DEFAULT_THRESHOLD) -> tuple[Tier, ...]:
    """G2 and/or G3 as the settings size them (0 blocks: no such tier), then G4 if ``remote``.

    A filter only guards spills from the tier above: the first tier (G3 in
    disk-only mode, G4 alone) receives every block written through from G1.
    """
    chain = []
    if host_blocks:
        chain.append(Tier("G2", HOST, host_blocks, sync_load=loads_in_step(load_mode, HOST)))
    if disk_blocks:
        chain.append(Tier("G3", DISK, disk_blocks, filter_threshold=disk_filter_threshold if host_blocks else None,
                          sync_load=loads_in_step(load_mode, DISK), persistent=disk_persistent))
    if remote:
        chain.append(Tier("G4", REMOTE, 0, filter_threshold=remote_filter_threshold if chain else None,
                          shared=True, sync_load=loads_in_step(load_mode, REMOTE)))
    return tuple(chain)


def check_chain(chain: Sequence[Tier]) -> None:
    """A chain must have tiers with distinct names, none of them G1, each with room."""
    if not chain:
        raise ValueError("kvbm needs at least one tier")
    names = [tier.name for tier in chain]
    if len(set(names)) != len(names) or G1 in names:
        raise ValueError(f"tier names must be distinct and not {G1}: {names}")
    for tier in chain:
        if tier.capacity <= 0 and not tier.shared:
            raise ValueError(f"tier {tier.name} has no capacity ({tier.capacity} blocks)")


def describe(chain: Iterable[Tier]) -> str:
    """``G2 1000 blocks (host, loads in-step) -> G3 8000 blocks (disk, filter 2, loads async)``, for the log."""
    out = []
    for tier in chain:
        bits = [tier.medium]
        if tier.filter_threshold is not None:
            bits.append(f"filter {tier.filter_threshold}")
        if tier.persistent:
            bits.append("persistent")
        bits.append("loads in-step" if tier.sync_load else "loads async")
        size = f"{tier.capacity} blocks" if tier.capacity else "shared"
        out.append(f"{tier.name} {size} ({', '.join(bits)})")
    return " -> ".join(out) or "no tier"


class TierListener(Protocol):
    """Told when blocks enter and leave tiers (the planner calls it; KV events for a router
    are built from it, :mod:`kvbm.runtime.events`). Every call is O(blocks named)."""

    def storing(self, req_id: str, block: int, block_hash: BlockHash) -> None:
        """Block ``block`` of request ``req_id`` is being stored into the first tier."""
        ...

    def committed(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        """These blocks became visible in ``tier`` (a store or a spill finished on every rank)."""
        ...

    def removed(self, tier: str, block_hash: BlockHash) -> None:
        """The block left ``tier`` (evicted, or dropped: failed copy, bad slot), or its pending copy failed."""
        ...


class TierIndex(Protocol):
    """What the planner needs of a tier's index: which hash is where, and who uses it.

    :class:`kvbm.core.pool.BlockPool` is the index of a local tier (slots on this
    server). A shared tier (G4) answers the same calls from its store: addresses
    are what its movers need (a hash-keyed store may return placeholders), a
    lookup is one batched round trip, and pins are no-ops (a block evicted
    before its load is a failed load, hence a recompute). Every call is
    proportional to the blocks it names, never to the tier's size.
    """

    name: str
    num_slots: int
    #: Bumped whenever the set of visible hashes changes (lookups are cached on it).
    version: int
    stats: PoolStats  # stored / evicted / dropped, for metrics

    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0,
                     stop: int | None = None) -> list[int] | None:
        """Addresses of the longest run of visible hashes in ``hashes[start:stop]``. None: not
        known yet (a shared tier whose lookup is still out; the planner then says "ask again")."""
        ...

    def ready_slot(self, block_hash: BlockHash) -> int | None: ...

    def contains(self, block_hash: BlockHash) -> bool:
        """Visible or being stored (so nobody stores it twice)."""
        ...

    def reserve(self, block_hash: BlockHash) -> int | None:
        """An address to store ``block_hash`` at (invisible until committed); None: no room or known."""
        ...

    def commit(self, slot: int) -> None: ...

    def commit_many(self, slots: Sequence[int]) -> None:
        """``commit`` each slot, in order (a batch the workers reported done)."""
        ...

    def drop(self, slot: int) -> None: ...

    def acquire(self, slots: Iterable[int]) -> None: ...

    def release(self, slots: Sequence[int]) -> None: ...

    def touch(self, slots: Iterable[int]) -> None: ...

    def restore(self, entries: dict[BlockHash, int]) -> int: ...

    @property
    def num_used(self) -> int: ...
