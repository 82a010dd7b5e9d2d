"""The leader's policy: turns "request X has these tokens and GPU blocks" into
host-tier loads and stores, and keeps the G2 pool consistent with what the
workers have actually copied.

Pure bookkeeping: no torch, no vLLM. The vLLM adapter
(:mod:`kvbm.vllm_integration.leader`) feeds it plain ids and token lists.

Invariants:

* A block is visible to :meth:`Planner.match` only after every worker
  reported its store (``world_size`` reports): PENDING slots are invisible.
* Host slots being read by an onboard are pinned (refcount) until the load is
  reported finished, even if the request was aborted meanwhile.
* A finished request whose stores are still in flight keeps its GPU blocks
  (``on_finished`` returns True) until the workers report them done.
* Work per call is proportional to the blocks it touches, never to the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from kvbm.core.hashing import extend_hashes
from kvbm.core.pool import BlockPool

logger = logging.getLogger(__name__)


@dataclass
class LoadOp:
    """Copy host slots into GPU blocks for one request (G2→G1)."""

    req_id: str
    host_slots: list[int]
    gpu_blocks: list[int]


@dataclass
class StoreBatch:
    """All G1→G2 copies of one engine step; completes as one unit per worker."""

    batch_id: int
    gpu_blocks: list[int]
    host_slots: list[int]


@dataclass
class StepPlan:
    """What the workers do in one engine step."""

    loads: list[LoadOp] = field(default_factory=list)
    store: StoreBatch | None = None
    #: (req_id, batch_id): report the request as finished sending once this
    #: worker completed that store batch (vLLM then frees its GPU blocks).
    release_after_store: list[tuple[str, int]] = field(default_factory=list)
    #: Requests were preempted: their GPU blocks may be reused this step, so
    #: in-flight stores from them must complete before the forward pass.
    drain_stores: bool = False

    def is_empty(self) -> bool:
        return not (self.loads or self.store or self.release_after_store or self.drain_stores)


@dataclass
class PlannerStats:
    """Cumulative counters; the metrics module turns them into series."""

    lookup_requests: int = 0
    lookup_blocks: int = 0  # blocks asked for beyond what the GPU had
    hit_blocks: int = 0
    matched_tokens: int = 0
    onboarded_blocks: int = 0
    offloaded_blocks: int = 0
    failed_loads: int = 0
    failed_stores: int = 0


@dataclass
class _Request:
    root: int | None  # None: never cached (e.g. prompt embeddings)
    hashes: list[int] = field(default_factory=list)
    gpu_blocks: list[int] = field(default_factory=list)
    next_store: int = 0  # first block index not yet considered for storing
    last_batch: int = -1  # newest store batch holding one of its blocks
    candidate: tuple[int, list[int]] | None = None  # (first block, host slots)


@dataclass
class _PendingBatch:
    host_slots: list[int]
    reports: int = 0


class Planner:
    """Scheduler-side state of kvbm for one engine."""

    def __init__(self, host_pool: BlockPool, block_size: int, world_size: int = 1) -> None:
        self.host = host_pool
        self.block_size = block_size
        self.world_size = world_size
        self.stats = PlannerStats()
        self._requests: dict[str, _Request] = {}
        self._loading: dict[str, list[int]] = {}  # req_id -> pinned host slots
        self._pending_batches: dict[int, _PendingBatch] = {}
        self._awaiting_release: set[str] = set()
        self._next_batch_id = 0
        self._plan = StepPlan()

    # ---- request lifecycle --------------------------------------------
    def add_request(self, req_id: str, root: int | None) -> None:
        self._requests[req_id] = _Request(root=root)

    def match(self, req_id: str, tokens: Sequence[int], num_computed: int) -> int:
        """Tokens beyond ``num_computed`` that G2 can supply (a multiple of the
        block size). Safe to call repeatedly: it only records a candidate."""
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
        req.candidate = None
        if start >= max_blocks:
            return 0
        extend_hashes(req.hashes, tokens, bs, req.root, max_blocks * bs)
        slots = self.host.match_prefix(req.hashes[:max_blocks], start)
        req.candidate = (start, slots)
        return len(slots) * bs

    def on_alloc(self, req_id: str, gpu_blocks: Sequence[int], num_external_tokens: int) -> None:
        """vLLM allocated GPU blocks; ``num_external_tokens`` of them are ours to load."""
        req = self._requests.get(req_id)
        if req is None:
            return
        candidate, req.candidate = req.candidate, None
        if candidate is not None:
            self.stats.lookup_requests += 1
            self.stats.lookup_blocks += max(0, len(req.hashes) - candidate[0])
        if num_external_tokens <= 0 or candidate is None:
            return
        start, slots = candidate
        n = num_external_tokens // self.block_size
        if n > len(slots):
            raise RuntimeError(
                f"kvbm: vLLM asked to load {n} blocks for {req_id} but only "
                f"{len(slots)} were matched; this is a kvbm bug, please report it"
            )
        slots = slots[:n]
        # Scheduling happens between match() and here without any eviction,
        # so the slots must still hold the hashes; check anyway, cheaply.
        for i, slot in enumerate(slots):
            if self.host.ready_slot(req.hashes[start + i]) != slot:
                raise RuntimeError(f"kvbm: host slot {slot} changed under a pending load")
        self.host.acquire(slots)
        self._loading[req_id] = slots
        self._plan.loads.append(
            LoadOp(req_id=req_id, host_slots=slots, gpu_blocks=list(gpu_blocks[start : start + n]))
        )
        self.stats.hit_blocks += n
        self.stats.matched_tokens += n * self.block_size

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
        store = self._plan.store
        if store is None:
            store = self._plan.store = StoreBatch(self._next_batch_id, [], [])
            self._next_batch_id += 1
        for b in range(req.next_store, n_full):
            block_hash = req.hashes[b]
            ready = self.host.ready_slot(block_hash)
            if ready is not None:
                # Stored already: write once, but keep it as fresh as the blocks
                # stored after it, or storing this chain's tail could evict its head.
                self.host.touch((ready,))
                continue
            if self.host.contains(block_hash):
                continue  # being stored by another request
            slot = self.host.reserve(block_hash)
            if slot is None:
                # Every slot is pinned by loads or pending: resume from here next
                # step (storing later blocks alone would be unreachable by prefix).
                req.next_store = b
                return
            store.gpu_blocks.append(req.gpu_blocks[b])
            store.host_slots.append(slot)
            req.last_batch = store.batch_id
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
        if req is None or req_id in self._loading:
            # An aborted load: vLLM itself waits for finished_recving.
            return False
        if req.last_batch in self._pending_batches:
            self._plan.release_after_store.append((req_id, req.last_batch))
            self._awaiting_release.add(req_id)
            return True
        return False

    # ---- per step -------------------------------------------------------
    def take_plan(self) -> StepPlan:
        plan, self._plan = self._plan, StepPlan()
        if plan.store is not None:
            if plan.store.host_slots:
                self._pending_batches[plan.store.batch_id] = _PendingBatch(plan.store.host_slots)
            else:
                plan.store = None
        return plan

    def on_worker_report(
        self,
        stored: dict[int, int] | None = None,
        failed_batches: Iterable[int] = (),
        finished_loads: Iterable[str] = (),
        failed_loads: Iterable[str] = (),
        released: Iterable[str] = (),
    ) -> None:
        """Apply what the workers did. ``stored`` maps batch id to the number
        of workers that completed it in this report."""
        for batch_id in failed_batches:
            pending = self._pending_batches.pop(batch_id, None)
            if pending is not None:
                self.stats.failed_stores += len(pending.host_slots)
                for slot in pending.host_slots:
                    self.host.drop(slot)
        for batch_id, reports in (stored or {}).items():
            pending = self._pending_batches.get(batch_id)
            if pending is None:
                continue
            pending.reports += reports
            if pending.reports >= self.world_size:
                del self._pending_batches[batch_id]
                # Newest first, so a chain's head is the most recently used and
                # LRU eviction takes tails first (a head alone is still a hit).
                for slot in reversed(pending.host_slots):
                    self.host.commit(slot)
                self.stats.offloaded_blocks += len(pending.host_slots)
        failed = set(failed_loads)
        for req_id in finished_loads:
            slots = self._loading.pop(req_id, None)
            if slots is None:
                continue
            self.host.release(slots)
            if req_id in failed:
                self.stats.failed_loads += 1
            else:
                self.stats.onboarded_blocks += len(slots)
        self._awaiting_release.difference_update(released)

    # ---- introspection --------------------------------------------------
    @property
    def busy(self) -> bool:
        """Work is in flight that needs more engine steps to be reported."""
        return bool(self._pending_batches or self._loading or self._awaiting_release)

    def num_tracked_requests(self) -> int:
        return len(self._requests)
