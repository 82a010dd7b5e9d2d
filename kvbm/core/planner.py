"""The leader's policy: turns "request X has these tokens and GPU blocks" into
tier loads and stores, and keeps the tier pools consistent with what the
workers have actually copied.

Pure bookkeeping: no torch, no vLLM. The vLLM adapter
(:mod:`kvbm.vllm_integration.leader`) feeds it plain ids and token lists.

Tiers: G2 (host, ``host`` pool) and G3 (disk, ``disk`` pool); either may be
absent. With both, blocks go G1→G2 as they fill and G2→G3 once the disk
filter admits them; with disk only, G1→G3 directly.

Invariants:

* A block is visible to :meth:`Planner.match` only after every worker
  reported its store (``world_size`` reports): PENDING slots are invisible.
* Slots being read (an onboard, or a G2→G3 copy reading G2) are pinned
  (refcount) until the copy is reported finished, even if the request was
  aborted meanwhile.
* A finished request whose stores are still in flight keeps its GPU blocks
  (``on_finished`` returns True) until the workers report them done.
* Work per call is proportional to the blocks it touches, never to the pools.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvbm.core.cost import OnboardCost
from kvbm.core.filter import FrequencyFilter
from kvbm.core.hashing import BlockHash, extend_hashes
from kvbm.core.pool import BlockPool

logger = logging.getLogger(__name__)

HOST = "host"
DISK = "disk"

#: DYN_KVBM_LOAD_MODE -> tiers whose loads run inside the step that matched them. G2 is
#: pinned host memory: its copy takes a fraction of a step, and loading in-step saves the
#: steps an asynchronous load costs (start it, report it, schedule the request). G3 reads
#: could stall every request of the step, so they stay asynchronous unless forced.
SYNC_LOAD_TIERS: dict[str, tuple[str, ...]] = {"auto": (HOST,), "sync": (HOST, DISK), "async": ()}
#: A match hashes the prompt in windows of this many blocks, doubling, and
#: stops at the window holding the first block no tier has: a miss costs one
#: small window, not the whole prompt (its blocks are hashed later, as they
#: are computed, by ``on_scheduled``).
_FIRST_WINDOW = 16


@dataclass
class LoadOp:
    """Onboard one request's prefix: ``gpu_blocks[:len(host_slots)]`` from G2,
    the rest from G3 (``disk_slots``, verified against ``disk_hashes``)."""

    req_id: str
    gpu_blocks: list[int]
    host_slots: list[int]
    disk_slots: list[int] = field(default_factory=list)
    disk_hashes: list[BlockHash] = field(default_factory=list)
    #: Synchronous: the request is scheduled in this very step, so the copy must land
    #: before the forward pass reads it (the worker orders it so); otherwise the
    #: request waits, unscheduled, until the workers report the load finished.
    sync: bool = False


@dataclass
class StoreBatch:
    """All G1→tier copies of one engine step; completes as one unit per worker.

    ``tier`` is HOST (G1→G2) or DISK (G1→G3 in disk-only mode; ``hashes``
    then travel along, since each disk block carries its hash).
    """

    batch_id: int
    tier: str
    gpu_blocks: list[int]
    slots: list[int]
    hashes: list[BlockHash] = field(default_factory=list)


@dataclass
class SpillBatch:
    """G2→G3 copies decided this step (disk filter admitted them)."""

    batch_id: int
    host_slots: list[int]
    disk_slots: list[int]
    hashes: list[BlockHash]


@dataclass
class StepPlan:
    """What the workers do in one engine step."""

    loads: list[LoadOp] = field(default_factory=list)
    store: StoreBatch | None = None
    spill: SpillBatch | None = None
    #: (req_id, batch_id): report the request as finished sending once this
    #: worker completed that store batch (vLLM then frees its GPU blocks).
    release_after_store: list[tuple[str, int]] = field(default_factory=list)
    #: Requests were preempted: their GPU blocks may be reused this step, so
    #: in-flight stores from them must complete before the forward pass.
    drain_stores: bool = False

    def is_empty(self) -> bool:
        return not (self.loads or self.store or self.spill or self.release_after_store or self.drain_stores)


@dataclass
class PlannerStats:
    """Cumulative counters; the metrics module turns them into series."""

    lookup_requests: int = 0
    lookup_blocks: int = 0  # blocks asked for beyond what the GPU had
    host_hit_blocks: int = 0
    disk_hit_blocks: int = 0
    matched_tokens: int = 0
    onboarded_host_blocks: int = 0  # G2→G1
    onboarded_disk_blocks: int = 0  # G3→G1
    offloaded_host_blocks: int = 0  # G1→G2
    offloaded_disk_blocks: int = 0  # G1→G3 (disk only)
    spilled_blocks: int = 0  # G2→G3
    filter_rejections: int = 0
    failed_loads: int = 0
    failed_stores: int = 0
    #: Matched blocks recomputed because loading them would have been slower (kvbm.core.cost).
    cost_skipped_host_blocks: int = 0
    cost_skipped_disk_blocks: int = 0
    bad_disk_blocks: int = 0  # failed verification or I/O on read

    @property
    def hit_blocks(self) -> int:
        return self.host_hit_blocks + self.disk_hit_blocks

    @property
    def onboarded_blocks(self) -> int:
        return self.onboarded_host_blocks + self.onboarded_disk_blocks

    @property
    def offloaded_blocks(self) -> int:
        return self.offloaded_host_blocks + self.offloaded_disk_blocks


@dataclass
class _Request:
    root: BlockHash | None  # None: never cached (e.g. prompt embeddings)
    hashes: list[BlockHash] = field(default_factory=list)
    gpu_blocks: list[int] = field(default_factory=list)
    next_store: int = 0  # first block index not yet considered for storing
    last_batch: int = -1  # newest store batch holding one of its blocks
    #: (first block, G2 slots, G3 slots, blocks asked for)
    candidate: tuple[int, list[int], list[int], int] | None = None
    #: (num_computed, num_tokens, pool versions) of the last match, to answer
    #: vLLM's repeated asks for a waiting request in O(1).
    match_key: tuple[int, int, int, int] | None = None
    last_match: tuple[int, list[int], list[int], int] | None = None
    #: (G2, G3) blocks of the candidate that the cost rule left to recompute.
    skipped: tuple[int, int] = (0, 0)


@dataclass
class _PendingBatch:
    pool: BlockPool
    slots: list[int]
    pinned_host: list[int] = field(default_factory=list)  # G2 slots read by a spill
    hashes: list[BlockHash] = field(default_factory=list)
    reports: int = 0


@dataclass
class _Loading:
    host_slots: list[int]
    disk_slots: list[int]
    sync: bool = False
    first_block: int = 0  # the request's block index where the load starts


class Planner:
    """Scheduler-side state of kvbm for one engine."""

    def __init__(
        self,
        host_pool: BlockPool | None,
        block_size: int,
        world_size: int = 1,
        disk_pool: BlockPool | None = None,
        disk_filter: FrequencyFilter | None = None,
        sync_load_tiers: Iterable[str] = (HOST,),
        cost: OnboardCost | None = None,
    ) -> None:
        """``sync_load_tiers``: a load drawing only on these tiers runs inside the step that
        matched it (the request is scheduled at once, as for a GPU prefix hit); a load that
        touches any other tier is asynchronous (the request waits, other requests run)."""
        if host_pool is None and disk_pool is None:
            raise ValueError("Planner needs at least one tier")
        self.sync_load_tiers = frozenset(sync_load_tiers)
        #: Load-or-recompute per tier; None loads whatever matched.
        self.cost = cost
        self.host = host_pool
        self.disk = disk_pool
        self.filter = disk_filter if (host_pool is not None and disk_pool is not None) else None
        self.block_size = block_size
        self.world_size = world_size
        self.stats = PlannerStats()
        self._requests: dict[str, _Request] = {}
        self._loading: dict[str, _Loading] = {}
        self._pending: dict[int, _PendingBatch] = {}
        self._awaiting_release: set[str] = set()
        self._next_batch_id = 0
        self._plan = StepPlan()
        #: (hash, slot) of G3 blocks committed since the last take (for the journal).
        self._disk_committed: list[tuple[BlockHash, int]] = []

    # ---- request lifecycle --------------------------------------------
    def add_request(self, req_id: str, root: BlockHash | None, hashes: Sequence[BlockHash] = ()) -> None:
        """Track a request. ``hashes``: its block hashes when already known (``kvbm plan``
        replays a trace of hashes without tokens); blocks they cover are never hashed again."""
        self._requests[req_id] = _Request(root=root, hashes=list(hashes))

    def request_hashes(self, req_id: str) -> Sequence[BlockHash]:
        """Hashes of the request's blocks computed so far (read-only; empty if untracked)."""
        req = self._requests.get(req_id)
        return req.hashes if req is not None else ()

    def _versions(self) -> tuple[int, int]:
        return (self.host.version if self.host else 0, self.disk.version if self.disk else 0)

    def match(self, req_id: str, tokens: Sequence[int], num_computed: int) -> int:
        """Tokens beyond ``num_computed`` that G2 then G3 can supply (a multiple
        of the block size). Safe to call repeatedly: it only records a candidate."""
        req = self._requests.get(req_id)
        if req is None or req.root is None:
            return 0
        bs = self.block_size
        if num_computed % bs:
            return 0  # vLLM passes block-aligned counts; anything else is not ours to extend
        # Never claim the whole prompt: vLLM must compute at least one token,
        # so the block holding the last token is always left to compute.
        max_blocks = (len(tokens) - 1) // bs
        start = num_computed // bs
        req.candidate, req.skipped = None, (0, 0)
        if start >= max_blocks:
            return 0
        key = (num_computed, len(tokens), *self._versions())
        if key != req.match_key:
            host, disk = self._match_tiers(req, tokens, start, max_blocks)
            req.last_match = (start, host, disk, max_blocks - start)
            req.match_key = key
        start, host, disk, asked = req.last_match  # type: ignore[misc]
        if self.cost is not None and (host or disk):
            n_host, n_disk = self.cost.choose([(HOST, len(host)), (DISK, len(disk))])
            req.skipped = (len(host) - n_host, len(disk) - n_disk)
            host, disk = host[:n_host], disk[:n_disk]
        req.candidate = (start, host, disk, asked)
        return (len(host) + len(disk)) * bs

    def _match_tiers(
        self, req: _Request, tokens: Sequence[int], start: int, max_blocks: int
    ) -> tuple[list[int], list[int]]:
        """G2 slots of the longest stored run from block ``start``, then G3 slots
        continuing it; hashing only as far as the run reaches (doubling windows)."""
        host: list[int] = []
        disk: list[int] = []
        pos, window = start, _FIRST_WINDOW
        on_host = self.host is not None
        while pos < max_blocks:
            end = min(max_blocks, pos + window)
            window *= 2
            extend_hashes(req.hashes, tokens, self.block_size, req.root, end * self.block_size)
            if on_host:
                got = self.host.match_prefix(req.hashes, pos, end)  # type: ignore[union-attr]
                host += got
                pos += len(got)
                if pos == end:
                    continue
                on_host = False  # the G2 run ended: G3 may continue it from here
            if self.disk is None:
                break
            got = self.disk.match_prefix(req.hashes, pos, end)
            disk += got
            pos += len(got)
            if pos < end:
                break
        return host, disk

    def load_is_async(self, req_id: str) -> bool:
        """Whether the load of the match just made for ``req_id`` is asynchronous."""
        req = self._requests.get(req_id)
        if req is None or req.candidate is None:
            return True
        _, host, disk, _ = req.candidate
        return not self._sync(host, disk)

    def _sync(self, host: Sequence[int], disk: Sequence[int]) -> bool:
        return (not host or HOST in self.sync_load_tiers) and (not disk or DISK in self.sync_load_tiers)

    def on_alloc(self, req_id: str, gpu_blocks: Sequence[int], num_external_tokens: int) -> None:
        """vLLM allocated GPU blocks; ``num_external_tokens`` of them are ours to load."""
        req = self._requests.get(req_id)
        if req is None:
            return
        candidate, req.candidate = req.candidate, None
        skipped, req.skipped = req.skipped, (0, 0)
        self.stats.cost_skipped_host_blocks += skipped[0]
        self.stats.cost_skipped_disk_blocks += skipped[1]
        if candidate is not None:
            self.stats.lookup_requests += 1
            self.stats.lookup_blocks += candidate[3]
        if num_external_tokens <= 0 or candidate is None:
            return
        start, host, disk, _ = candidate
        n = num_external_tokens // self.block_size
        if n > len(host) + len(disk):
            raise RuntimeError(
                f"kvbm: vLLM asked to load {n} blocks for {req_id} but only "
                f"{len(host) + len(disk)} were matched; this is a kvbm bug, please report it"
            )
        host = host[:n]
        disk = disk[: n - len(host)]
        # Scheduling happens between match() and here without any eviction,
        # so the slots must still hold the hashes; check anyway, cheaply.
        for pool, slots, first in ((self.host, host, start), (self.disk, disk, start + len(host))):
            for i, slot in enumerate(slots):
                if pool is None or pool.ready_slot(req.hashes[first + i]) != slot:
                    raise RuntimeError(f"kvbm: slot {slot} changed under a pending load")
        if self.host is not None:
            self.host.acquire(host)
        if self.disk is not None:
            self.disk.acquire(disk)
        sync = self._sync(host, disk)
        self._loading[req_id] = _Loading(host, disk, sync, start)
        d0 = start + len(host)
        self._plan.loads.append(LoadOp(
            req_id=req_id,
            gpu_blocks=list(gpu_blocks[start : start + n]),
            host_slots=host,
            disk_slots=disk,
            disk_hashes=req.hashes[d0 : d0 + len(disk)],
            sync=sync,
        ))
        self.stats.host_hit_blocks += len(host)
        self.stats.disk_hit_blocks += len(disk)
        self.stats.matched_tokens += n * self.block_size
        if self.filter is not None:
            for i, slot in enumerate(host):  # a hit is a sighting: hot blocks earn the disk
                self._observe(req.hashes[start + i], slot)

    def on_scheduled(
        self,
        req_id: str,
        tokens: Sequence[int],
        new_gpu_blocks: Sequence[int] | None,
        replace_blocks: bool,
        num_computed_after_step: int,
    ) -> None:
        """The request runs this step; store every block it fills (write-through)."""
        req = self._requests.get(req_id)
        if req is None:
            return
        if replace_blocks:
            req.gpu_blocks = list(new_gpu_blocks or ())
        elif new_gpu_blocks:
            req.gpu_blocks.extend(new_gpu_blocks)
        if req.root is None:
            return
        # Only blocks whose every token is known and computed by this step.
        n_full = min(num_computed_after_step, len(tokens)) // self.block_size
        n_full = min(n_full, len(req.gpu_blocks))
        if n_full <= req.next_store:
            return
        extend_hashes(req.hashes, tokens, self.block_size, req.root, n_full * self.block_size)
        # Write-through goes to the first tier: G2, or G3 in disk-only mode.
        pool, tier = (self.host, HOST) if self.host is not None else (self.disk, DISK)
        assert pool is not None
        for b in range(req.next_store, n_full):
            block_hash = req.hashes[b]
            ready = pool.ready_slot(block_hash)
            if ready is not None:
                # Stored already: write once, but keep it as fresh as the blocks
                # stored after it, or storing this chain's tail could evict its head.
                pool.touch((ready,))
                if self.filter is not None:
                    self._observe(block_hash, ready)  # computed again: a sighting
                continue
            if pool.contains(block_hash):
                continue  # being stored by another request
            slot = pool.reserve(block_hash)
            if slot is None:
                # Every slot is pinned or pending: resume from here next step
                # (storing later blocks alone would be unreachable by prefix).
                req.next_store = b
                return
            store = self._plan.store
            if store is None:
                store = self._plan.store = StoreBatch(self._new_batch_id(), tier, [], [])
            store.gpu_blocks.append(req.gpu_blocks[b])
            store.slots.append(slot)
            store.hashes.append(block_hash)
            req.last_batch = store.batch_id
            if self.filter is not None:
                self.filter.observe(block_hash)
        req.next_store = n_full

    def on_preempted(self, req_id: str) -> None:
        """vLLM freed the request's GPU blocks; it gets new ones on resume."""
        req = self._requests.get(req_id)
        if req is not None:
            req.gpu_blocks = []
            req.next_store = 0
            req.candidate = None
        self._plan.drain_stores = True

    def on_finished(self, req_id: str) -> bool:
        """Returns True if vLLM must keep the request's GPU blocks until the
        workers report it (stores from them still in flight)."""
        req = self._requests.pop(req_id, None)
        loading = self._loading.get(req_id)
        if req is None or (loading is not None and not loading.sync):
            # An aborted asynchronous load: vLLM itself waits for finished_recving.
            # (A synchronous load has landed: the step that used it has run.)
            return False
        if req.last_batch in self._pending:
            self._plan.release_after_store.append((req_id, req.last_batch))
            self._awaiting_release.add(req_id)
            return True
        return False

    # ---- G2 → G3 -------------------------------------------------------
    def _observe(self, block_hash: BlockHash, host_slot: int) -> None:
        """A sighting of a READY G2 block; spill it to G3 once the filter admits it."""
        assert self.filter is not None
        self.filter.observe(block_hash)
        self._maybe_spill(block_hash, host_slot)

    def _maybe_spill(self, block_hash: BlockHash, host_slot: int) -> None:
        assert self.host is not None and self.disk is not None
        if self.disk.contains(block_hash):
            return
        if self.filter is not None and not self.filter.should_offload(block_hash):
            self.stats.filter_rejections += 1
            return
        disk_slot = self.disk.reserve(block_hash)
        if disk_slot is None:
            return
        spill = self._plan.spill
        if spill is None:
            spill = self._plan.spill = SpillBatch(self._new_batch_id(), [], [], [])
        self.host.acquire((host_slot,))  # the copy reads it: no eviction meanwhile
        spill.host_slots.append(host_slot)
        spill.disk_slots.append(disk_slot)
        spill.hashes.append(block_hash)

    # ---- per step -------------------------------------------------------
    def _new_batch_id(self) -> int:
        self._next_batch_id += 1
        return self._next_batch_id

    def take_plan(self) -> StepPlan:
        plan, self._plan = self._plan, StepPlan()
        if plan.store is not None:
            pool = self.host if plan.store.tier == HOST else self.disk
            assert pool is not None
            self._pending[plan.store.batch_id] = _PendingBatch(
                pool, plan.store.slots, hashes=plan.store.hashes
            )
            if plan.store.tier == HOST:
                plan.store.hashes = []  # G2 rows carry no hash; don't ship them
        if plan.spill is not None:
            assert self.disk is not None
            self._pending[plan.spill.batch_id] = _PendingBatch(
                self.disk, plan.spill.disk_slots, pinned_host=plan.spill.host_slots,
                hashes=plan.spill.hashes,
            )
        return plan

    def on_worker_report(
        self,
        stored: dict[int, int] | None = None,
        failed_batches: Iterable[int] = (),
        finished_loads: Iterable[str] = (),
        failed_loads: Iterable[str] = (),
        released: Iterable[str] = (),
        bad_disk_slots: Iterable[int] = (),
    ) -> None:
        """Apply what the workers did. ``stored`` maps batch id to the number
        of workers that completed it in this report."""
        for batch_id in failed_batches:
            pending = self._pending.pop(batch_id, None)
            if pending is not None:
                self.stats.failed_stores += len(pending.slots)
                for slot in pending.slots:
                    pending.pool.drop(slot)
                if self.host is not None:
                    self.host.release(pending.pinned_host)
        for batch_id, reports in (stored or {}).items():
            pending = self._pending.get(batch_id)
            if pending is None:
                continue
            pending.reports += reports
            if pending.reports >= self.world_size:
                del self._pending[batch_id]
                self._commit(pending)
        bad = set(bad_disk_slots)
        if bad and self.disk is not None:
            self.stats.bad_disk_blocks += len(bad)
            for slot in bad:
                self.disk.drop(slot)  # frees once the failed load releases it
        failed = set(failed_loads)
        for req_id in finished_loads:
            loading = self._loading.pop(req_id, None)
            if loading is None:
                continue
            if self.host is not None:
                self.host.release(loading.host_slots)
            if self.disk is not None:
                self.disk.release(loading.disk_slots)
            if req_id in failed:
                self.stats.failed_loads += 1
                req = self._requests.get(req_id)
                if loading.sync and req is not None:
                    # The step that used it ran, and its stores were dropped; vLLM recomputes
                    # from the first bad block. Store what it recomputes (it is good KV).
                    req.next_store = min(req.next_store, loading.first_block)
            else:
                self.stats.onboarded_host_blocks += len(loading.host_slots)
                self.stats.onboarded_disk_blocks += len(loading.disk_slots)
        self._awaiting_release.difference_update(released)

    def _commit(self, pending: _PendingBatch) -> None:
        # Newest first, so a chain's head is the most recently used and LRU
        # eviction takes tails first (a head alone is still a hit).
        for slot in reversed(pending.slots):
            pending.pool.commit(slot)
        if pending.pool is self.disk:
            self._disk_committed.extend(zip(pending.hashes, pending.slots))
            if pending.pinned_host:
                assert self.host is not None
                self.host.release(pending.pinned_host)
                self.stats.spilled_blocks += len(pending.slots)
            else:
                self.stats.offloaded_disk_blocks += len(pending.slots)
            return
        self.stats.offloaded_host_blocks += len(pending.slots)
        if self.disk is not None:
            for block_hash, slot in zip(pending.hashes, pending.slots):
                self._maybe_spill(block_hash, slot)

    def take_disk_commits(self) -> list[tuple[BlockHash, int]]:
        """(hash, slot) of G3 blocks made visible since the last call (for the journal)."""
        commits, self._disk_committed = self._disk_committed, []
        return commits

    def restore_disk(self, entries: dict[BlockHash, int]) -> int:
        """Rebuild the G3 registry from a journal after a restart; returns blocks restored."""
        assert self.disk is not None
        return self.disk.restore(entries)

    # ---- introspection --------------------------------------------------
    def load_sources(self, req_id: str) -> tuple[int, int]:
        """(G2 blocks, G3 blocks) of the request's in-flight load."""
        loading = self._loading.get(req_id)
        return (len(loading.host_slots), len(loading.disk_slots)) if loading else (0, 0)

    @property
    def busy(self) -> bool:
        """Work is in flight that needs more engine steps to be reported."""
        return bool(self._pending or self._loading or self._awaiting_release)

    def num_tracked_requests(self) -> int:
        return len(self._requests)
