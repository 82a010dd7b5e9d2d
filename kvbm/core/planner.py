"""The leader's policy: turns "request X has these tokens and GPU blocks" into
tier loads, stores and spills, and keeps the tier indexes consistent with what
the workers have actually copied.

Pure bookkeeping: no torch, no vLLM. The vLLM adapter
(:mod:`kvbm.vllm_integration.leader`) feeds it plain ids and token lists.

Tiers are data (:mod:`kvbm.core.tiers`): an ordered chain, typically G2 (host)
then G3 (disk). Blocks go G1 → the first tier as they fill (write-through),
and tier i → tier i+1 once tier i+1's admission filter lets them (spills); a
prompt's prefix is matched tier after tier in chain order. Nothing below
names a tier: disk-only mode is a chain without G2, and a new tier is a new
entry of the chain.

Invariants:

* A block is visible to :meth:`Planner.match` only after every worker
  reported its copy (``world_size`` reports): PENDING slots are invisible.
* Slots being read (a load, or a spill reading its source) are pinned
  (refcount) until the copy is reported finished, even if the request was
  aborted meanwhile.
* A finished request whose stores are still in flight keeps its GPU blocks
  (``on_finished`` returns True) until the workers report them done.
* Work per call is proportional to the blocks it touches, never to the tiers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from functools import partial
from itertools import chain
from operator import attrgetter

from kvbm.core.cost import OnboardCost
from kvbm.core.filter import FrequencyFilter
from kvbm.core.groups import SINGLE_FULL, KVGroup, check_groups, group_root
from kvbm.core.hashing import BlockHash, extend_hashes
from kvbm.core.plan import LoadOp, LoadPart, SpillBatch, StepPlan, StoreBatch, WorkerReport
from kvbm.core.pool import BlockPool
from kvbm.core.tiers import Tier, TierIndex, TierListener, check_chain

logger = logging.getLogger(__name__)

#: Blocks per piece of deferred spill policy (:meth:`Planner.run_deferred` pauses between pieces):
#: ~100-200 µs of Python each, the longest the engine's thread may wait for the GIL back.
_DEFERRED_PIECE = 64

__all__ = ["Planner", "PlannerStats", "TierStats", "LoadOp", "LoadPart", "StoreBatch", "SpillBatch", "StepPlan",
           "WorkerReport"]

#: A match hashes the prompt in windows of this many blocks, doubling, and
#: stops at the window holding the first block no tier has: a miss costs one
#: small window, not the whole prompt (its blocks are hashed later, as they
#: are computed, by ``on_scheduled``).
_FIRST_WINDOW = 16
_VERSION = attrgetter("version")


@dataclass
class TierStats:
    """Cumulative counters of one tier."""

    hit_blocks: int = 0  # looked-up blocks found here (and loaded), counted in one group: prompt positions
    loaded_blocks: int = 0  # loaded from here into G1
    stored_blocks: int = 0  # stored here from G1 (the first tier)
    spilled_blocks: int = 0  # copied here from the tier above
    #: Matched blocks recomputed because loading them would have been slower (kvbm.core.cost).
    cost_skipped_blocks: int = 0
    bad_blocks: int = 0  # failed verification or I/O on read


@dataclass
class PlannerStats:
    """Cumulative counters; the metrics module maps them to its series."""

    lookup_requests: int = 0
    lookup_blocks: int = 0  # blocks asked for beyond what the GPU had
    matched_tokens: int = 0
    filter_rejections: int = 0
    failed_loads: int = 0
    failed_stores: int = 0
    #: Steps whose forward pass waited for an earlier store of windowed blocks, because vLLM gave
    #: one of them to a request this step; and steps that did not need to (see ``take_plan``).
    window_store_fences: int = 0
    window_store_fences_skipped: int = 0
    tiers: dict[str, TierStats] = field(default_factory=dict)

    def tier(self, name: str) -> TierStats:
        """The counters of tier ``name`` (zeros for a tier not in the chain)."""
        return self.tiers.get(name) or TierStats()

    def total(self, counter: str) -> int:
        return sum(getattr(stats, counter) for stats in self.tiers.values())

    # The names dashboards, tools and tests know (G2 = host, G3 = disk; onboard = load, offload = store).
    host_hit_blocks = property(lambda self: self.tier("G2").hit_blocks)
    disk_hit_blocks = property(lambda self: self.tier("G3").hit_blocks)
    onboarded_host_blocks = property(lambda self: self.tier("G2").loaded_blocks)  # G2→G1
    onboarded_disk_blocks = property(lambda self: self.tier("G3").loaded_blocks)  # G3→G1
    offloaded_host_blocks = property(lambda self: self.tier("G2").stored_blocks)  # G1→G2
    offloaded_disk_blocks = property(lambda self: self.tier("G3").stored_blocks)  # G1→G3 (disk only)
    spilled_blocks = property(lambda self: self.tier("G3").spilled_blocks)  # G2→G3
    cost_skipped_host_blocks = property(lambda self: self.tier("G2").cost_skipped_blocks)
    cost_skipped_disk_blocks = property(lambda self: self.tier("G3").cost_skipped_blocks)
    bad_disk_blocks = property(lambda self: self.tier("G3").bad_blocks)
    hit_blocks = property(lambda self: self.total("hit_blocks"))
    onboarded_blocks = property(lambda self: self.total("loaded_blocks"))
    offloaded_blocks = property(lambda self: self.total("stored_blocks"))

    def as_dict(self) -> dict[str, int]:
        """Every counter under its flat name (the totals and the G2/G3 names above)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "tiers"}
        for name in ("host_hit_blocks", "disk_hit_blocks", "onboarded_host_blocks", "onboarded_disk_blocks",
                     "offloaded_host_blocks", "offloaded_disk_blocks", "spilled_blocks", "cost_skipped_host_blocks",
                     "cost_skipped_disk_blocks", "bad_disk_blocks", "hit_blocks", "onboarded_blocks",
                     "offloaded_blocks"):
            out[name] = getattr(self, name)
        return out


class _Tier:
    """The planner's view of one tier: its description, index and counters."""

    def __init__(self, spec: Tier, index: TierIndex, stats: TierStats) -> None:
        self.spec = spec
        self.name = spec.name
        self.index = index
        self.stats = stats
        self.next: _Tier | None = None


@dataclass
class _Seq:
    """One KV-cache group's share of a request: its hash chain and its GPU blocks."""

    root: BlockHash | None
    hashes: list[BlockHash] = field(default_factory=list)
    gpu_blocks: list[int] = field(default_factory=list)
    next_store: int = 0  # first block index not yet considered for storing
    #: blocks before this were sighted when loaded (``on_alloc``): finding them READY when
    #: stored is not another sighting (they were loaded, not computed again)
    sighted_upto: int = 0


@dataclass
class _Match:
    """A hit: blocks ``start .. end - 1`` of the request, and per group where they come from."""

    start: int  # the first block vLLM does not hold
    end: int
    asked: int  # blocks looked up (for the stats)
    #: Per group: (its first block to load, slots per tier in chain order). A full-attention
    #: group loads from ``start``; a windowed group only the window before ``end``.
    parts: list[tuple[int, list[list[int]]]]
    tokens: Sequence[int] = ()  # the prompt it was made for (to trim it if vLLM takes less)

    @property
    def blocks(self) -> int:
        return self.end - self.start


@dataclass
class _Request:
    root: BlockHash | None  # None: never cached (e.g. prompt embeddings)
    seqs: list[_Seq]  # one per KV-cache group
    last_batch: int = -1  # newest store batch holding one of its blocks
    candidate: _Match | None = None
    #: (num_computed, num_tokens, index versions) of the last match, to answer
    #: vLLM's repeated asks for a waiting request in O(1).
    match_key: tuple[int, ...] | None = None
    last_match: _Match | None = None
    #: Blocks per tier of the candidate that the cost rule left to recompute.
    skipped: list[int] | None = None

    @property
    def hashes(self) -> list[BlockHash]:
        """The first group's chain (the request's identity in traces)."""
        return self.seqs[0].hashes


@dataclass
class _PendingBatch:
    tier: _Tier
    slots: list[int]
    hashes: list[BlockHash]
    source: tuple[_Tier, list[int]] | None = None  # a spill: its source tier and pinned slots
    reports: int = 0


@dataclass
class _Loading:
    parts: list[tuple[_Tier, list[int]]]  # pinned slots, per group and tier
    sync: bool = False
    first_block: int = 0  # the request's block index where the load starts


class Planner:
    """Scheduler-side state of kvbm for one engine."""

    def __init__(
        self,
        chain: Sequence[Tier],
        block_size: int,
        world_size: int = 1,
        *,
        sightings: FrequencyFilter | None = None,
        cost: OnboardCost | None = None,
        indexes: Mapping[str, TierIndex] | None = None,
        groups: Sequence[KVGroup] = SINGLE_FULL,
        null_block: int | None = None,
        drop_last_hit_block: bool = False,
    ) -> None:
        """``chain``: the tiers, in order. ``sightings``: the table of block frequencies the
        admission filters read (built with defaults when a tier has a filter and none is
        given). ``cost``: the load-or-recompute rule; None loads whatever matched.
        ``indexes``: a tier's own index (a shared tier's); by default a BlockPool.
        ``groups``: the model's KV-cache groups (:mod:`kvbm.core.groups`); with more than
        one, GPU block ids come as one list per group. ``null_block``: the GPU block id vLLM
        puts where a group keeps no block (outside a sliding window): never stored or loaded.
        ``drop_last_hit_block``: the engine runs an EAGLE/MTP drafter, whose KV at a block's
        last position was written with the token after it; vLLM recomputes the last block of
        every hit for that reason, and so does a hit from the chain (same hit as vLLM's own)."""
        check_chain(chain)
        check_groups(groups)
        self.chain = tuple(chain)
        self.groups = tuple(groups)
        self.null_block = null_block
        self.drop_last_hit_block = drop_last_hit_block
        #: The group whose parts the cost rule weighs: the first full-attention one.
        self._lead = next((i for i, g in enumerate(self.groups) if not g.windowed), None)
        #: One full-attention group (most models): on_scheduled's fast path.
        self._single_full = len(self.groups) == 1 and not self.groups[0].windowed
        self.stats = PlannerStats()
        indexes = indexes or {}
        self._tiers = [_Tier(t, indexes.get(t.name) or BlockPool(t.capacity, t.name),
                             self.stats.tiers.setdefault(t.name, TierStats())) for t in self.chain]
        for upper, lower in zip(self._tiers, self._tiers[1:]):
            upper.next = lower
        self._by_name = {t.name: t for t in self._tiers}
        self._indexes = [t.index for t in self._tiers]
        self._position = {t.name: i for i, t in enumerate(self._tiers)}
        filtered = any(t.filter_threshold is not None for t in self.chain[1:])
        self.filter = (sightings if sightings is not None else FrequencyFilter()) if filtered else None
        self.cost = cost
        self.block_size = block_size
        self.world_size = world_size
        self._requests: dict[str, _Request] = {}
        self._loading: dict[str, _Loading] = {}
        self._pending: dict[int, _PendingBatch] = {}
        #: Store batches not reported yet -> the windowed groups' GPU blocks they read. vLLM frees
        #: such blocks while their request runs; a step that allocates one must wait for the store.
        self._window_stores: dict[int, set[int]] = {}
        self._step_window_blocks: list[int] = []  # this step's windowed blocks being stored
        #: GPU block lists vLLM handed out this step, gathered while a windowed store is in flight.
        self._step_allocated: list[Sequence[int]] = []
        self._awaiting_release: set[str] = set()
        self._next_batch_id = 0
        self._plan = StepPlan()
        #: tier -> (hashes, slots) committed since the last take, for persistent tiers (the journal): two
        #: lists, not a tuple per block (tens of thousands a minute for the GC to track and collect).
        self._committed: dict[str, tuple[list[BlockHash], list[int]]] = {
            t.name: ([], []) for t in self.chain if t.persistent}
        self.listener: TierListener | None = None
        #: The spill policy (the filter's sightings, spill decisions) queued rather than run inside
        #: the call that causes it, for :meth:`run_deferred`: the leader runs it on a thread of its
        #: own while the engine runs the step (kvbm.runtime.leader). Off: decided at once.
        self.defer_policy = False
        self._deferred: list[tuple[Callable[..., None], tuple]] = []

    def set_listener(self, listener: TierListener | None) -> None:
        """Report blocks entering and leaving tiers to ``listener`` (KV events); None stops."""
        self.listener = listener
        for tier in self._tiers:
            if hasattr(tier.index, "on_removed"):  # a shared tier (G4) is never told of evictions
                tier.index.on_removed = None if listener is None else partial(listener.removed, tier.name)

    def index(self, tier: str) -> TierIndex | None:
        """The index of ``tier`` (None if the chain has no such tier)."""
        t = self._by_name.get(tier)
        return t.index if t is not None else None

    @property
    def host(self) -> TierIndex | None:
        """G2's index (tests and tools that inspect the host tier)."""
        return self.index("G2")

    @property
    def disk(self) -> TierIndex | None:
        """G3's index."""
        return self.index("G3")

    # ---- request lifecycle --------------------------------------------
    def add_request(self, req_id: str, root: BlockHash | None, hashes: Sequence[BlockHash] = ()) -> None:
        """Track a request. ``hashes``: its block hashes when already known (``kvbm plan``
        replays a trace of hashes without tokens); blocks they cover are never hashed again."""
        seqs = [_Seq(group_root(root, g) if root is not None else None) for g in self.groups]
        seqs[0].hashes = list(hashes)
        self._requests[req_id] = _Request(root=root, seqs=seqs)

    def request_hashes(self, req_id: str) -> Sequence[BlockHash]:
        """Hashes of the request's blocks computed so far (read-only; empty if untracked)."""
        req = self._requests.get(req_id)
        return req.hashes if req is not None else ()

    def match(self, req_id: str, tokens: Sequence[int], num_computed: int) -> int | None:
        """Tokens beyond ``num_computed`` that the chain can supply (a multiple of the
        block size). Safe to call repeatedly: it only records a candidate.

        None: not known yet. A shared tier's lookup is still out and nothing before it
        matched; vLLM then asks again next step. When an earlier tier did match, that
        match is answered now (a local hit is never held back by a remote server)."""
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
        req.candidate, req.skipped = None, None
        if start >= max_blocks:
            return 0
        key = (num_computed, len(tokens), *map(_VERSION, self._indexes))
        if key != req.match_key:
            found, known = self._match_groups(req, tokens, start, max_blocks)
            if self.drop_last_hit_block and found.blocks:
                # vLLM's own hit already dropped its last block; ours ends one before what we hold
                found, known_shorter = self._match_groups(req, tokens, start, found.end - 1)
                known &= known_shorter
            found.asked = max_blocks - start
            req.last_match = found
            req.match_key = key if known else None  # not known: ask the tiers again next time
            if not known and not found.blocks:
                return None
        found = req.last_match
        assert found is not None
        if self.cost is not None and found.blocks:
            found = self._weigh(req, found)
        req.candidate = found
        return found.blocks * bs

    def _match_groups(self, req: _Request, tokens: Sequence[int], start: int,
                      limit: int) -> tuple[_Match, bool]:
        """The longest hit from block ``start`` (ending at or before ``limit``) that every
        group can serve, and whether it is known (see :meth:`_match_tiers`).

        vLLM's own rule: each full-attention group bounds the hit by its run from ``start``;
        a windowed group needs only the window before the hit's end, and where that window
        has a gap the hit ends before it. Shortening the hit for one windowed group moves
        every other window, so they are asked again until the end settles (it only moves
        down, so this ends); full-attention runs stay valid for any shorter hit."""
        end, known = limit, True
        parts: list[tuple[int, list[list[int]]]] = [(start, [[] for _ in self._tiers]) for _ in self.groups]
        for i, group in enumerate(self.groups):
            if not group.windowed and end > start:
                got, ok = self._match_tiers(req.seqs[i], tokens, start, end)
                known &= ok
                end = start + sum(map(len, got))
                parts[i] = (start, got)
        windowed = [i for i, g in enumerate(self.groups) if g.windowed]
        settled = not windowed
        while not settled and end > start:
            settled = True
            for i in windowed:
                window = self.groups[i].window_blocks
                assert window is not None
                reach, first, got, ok = self._match_window(req.seqs[i], tokens, start, end, window)
                known &= ok
                parts[i] = (first, got)
                if reach < end:
                    end, settled = reach, False
                    break
        for i, group in enumerate(self.groups):  # trim full runs to the settled end
            if not group.windowed:
                parts[i] = (start, _take(parts[i][1], end - start))
        if end == start:
            parts = [(start, [[] for _ in self._tiers]) for _ in self.groups]
        return _Match(start, end, limit - start, parts, tokens), known

    def _match_window(self, seq: _Seq, tokens: Sequence[int], start: int, end: int,
                      window: int) -> tuple[int, int, list[list[int]], bool]:
        """(end, first, slots per tier, known) of the latest window of ``window`` blocks ending at
        or before ``end`` that the chain holds (blocks before ``start`` are vLLM's own: a window
        reaching back past it needs only its part from ``start``)."""
        known = True
        while end > start:
            first = max(start, end - window)
            got, ok = self._match_tiers(seq, tokens, first, end)
            known &= ok
            reach = first + sum(map(len, got))
            if reach == end:
                return end, first, got, known
            end = reach  # a window must end at or before the first block it lacks
        return start, start, [[] for _ in self._tiers], known

    def _weigh(self, req: _Request, found: _Match) -> _Match:
        """The load-or-recompute rule (kvbm.core.cost) over the lead group's parts: the hit
        keeps what loads faster than it computes, shortened at a slow tier."""
        assert self.cost is not None
        if self._lead is None:
            return found  # windows only: a few blocks per group, always worth loading
        _, parts = found.parts[self._lead]
        keep = self.cost.choose([(t.name, len(p)) for t, p in zip(self._tiers, parts)])
        req.skipped = [len(p) - k for p, k in zip(parts, keep)]
        if not any(req.skipped):
            return found
        if len(self.groups) == 1:
            return _Match(found.start, found.start + sum(keep), found.asked,
                          [(found.start, [p[:k] for p, k in zip(parts, keep)])], found.tokens)
        trimmed, _ = self._match_groups(req, found.tokens, found.start, found.start + sum(keep))
        trimmed.asked = found.asked
        return trimmed

    def _match_tiers(self, seq: _Seq, tokens: Sequence[int], start: int,
                     max_blocks: int) -> tuple[list[list[int]], bool]:
        """Per tier, the slots of the longest stored run from block ``start``: the first
        tier's run, then the next tier continuing it, and so on; hashing only as far as
        the run reaches (doubling windows; a shared tier is asked once for the rest).
        Also whether the run is known: False when a tier's answer is not there yet (the
        run then stops before that tier)."""
        parts: list[list[int]] = [[] for _ in self._tiers]
        bs = self.block_size
        pos, window, i = start, _FIRST_WINDOW, 0
        while pos < max_blocks and i < len(self._tiers):
            end = min(max_blocks, pos + window)
            window *= 2
            extend_hashes(seq.hashes, tokens, bs, seq.root, end * bs)
            while i < len(self._tiers):
                tier = self._tiers[i]
                if tier.spec.shared and end < max_blocks:  # one round trip for the whole rest
                    end = max_blocks
                    extend_hashes(seq.hashes, tokens, bs, seq.root, end * bs)
                got = tier.index.match_prefix(seq.hashes, pos, end)
                if got is None:
                    return parts, False
                parts[i] += got
                pos += len(got)
                if pos == end:
                    break  # the next window continues in this tier
                i += 1  # this tier's run ended: the next tier may continue it from here
        return parts, True

    def load_is_async(self, req_id: str) -> bool:
        """Whether the load of the match just made for ``req_id`` is asynchronous."""
        req = self._requests.get(req_id)
        if req is None or req.candidate is None:
            return True
        return not self._sync(req.candidate)

    def _sync(self, found: _Match) -> bool:
        """In-step only if every tier that serves a part loads in-step and no group with a part
        needs its blocks before the step starts (KVGroup.load_before_step)."""
        for group, (_, parts) in zip(self.groups, found.parts):
            if any(parts) and group.load_before_step:
                return False
        return all(tier.spec.sync_load for _, parts in found.parts for tier, slots in zip(self._tiers, parts) if slots)

    def _per_group(self, gpu_blocks: Sequence[int] | Sequence[Sequence[int]]) -> Sequence[Sequence[int]]:
        """GPU block ids as one list per group (a model with one group may pass its list)."""
        if len(self.groups) == 1 and (not gpu_blocks or isinstance(gpu_blocks[0], int)):
            return (gpu_blocks,)  # type: ignore[return-value]
        if len(gpu_blocks) != len(self.groups):
            raise ValueError(f"kvbm: {len(gpu_blocks)} block lists for {len(self.groups)} KV-cache groups")
        return gpu_blocks  # type: ignore[return-value]

    def on_alloc(self, req_id: str, gpu_blocks: Sequence[int] | Sequence[Sequence[int]],
                 num_external_tokens: int) -> None:
        """vLLM allocated GPU blocks (per group, with several); ``num_external_tokens`` of them
        are ours to load."""
        req = self._requests.get(req_id)
        if req is None:
            return
        per_group = self._per_group(gpu_blocks)
        if self._window_stores:
            self._step_allocated.extend(per_group)
        found, req.candidate = req.candidate, None
        skipped, req.skipped = req.skipped, None
        for tier, n in zip(self._tiers, skipped or ()):
            tier.stats.cost_skipped_blocks += n
        if found is not None:
            self.stats.lookup_requests += 1
            self.stats.lookup_blocks += found.asked
        if num_external_tokens <= 0 or found is None:
            return
        n = num_external_tokens // self.block_size
        if n > found.blocks:
            raise RuntimeError(
                f"kvbm: vLLM asked to load {n} blocks for {req_id} but only {found.blocks} were matched; "
                "this is a kvbm bug, please report it"
            )
        if n < found.blocks:  # vLLM took less than offered: the windows move with the end
            found, _ = self._match_groups(req, found.tokens, found.start, found.start + n)
            if found.blocks != n:
                raise RuntimeError(f"kvbm: cannot serve {req_id}'s shortened hit of {n} blocks; please report it")
        start, end = found.start, found.end
        op = LoadOp(req_id, [], sync=self._sync(found))
        loaded: list[tuple[_Tier, list[int]]] = []
        sighted: list[tuple[_Seq, int, list[list[int]]]] = []
        # Hit blocks count positions in the prompt, as lookup_blocks does: one group's blocks (the
        # first full-attention one), so a hybrid model's hit rate stays a fraction.
        counted = self._lead or 0
        for g, (seq, group, blocks, (first, parts)) in enumerate(zip(req.seqs, self.groups, per_group, found.parts)):
            if group.windowed and self.null_block is not None:
                # vLLM keeps a window's blocks only: where it put its null block there is nothing
                # to load; where it put a real block the KV must land (or the step reads garbage).
                if any(b != self.null_block for b in blocks[start:first]):
                    raise RuntimeError(f"kvbm: vLLM kept blocks of {req_id} before the window kvbm matched "
                                       f"({group.tag}); please report it")
                skip = 0
                while first + skip < end and blocks[first + skip] == self.null_block:
                    skip += 1
                parts, first = _drop(parts, skip), first + skip
            sighted.append((seq, first, parts))
            seq.sighted_upto = end
            # Scheduling happens between match() and here without any eviction,
            # so the slots must still hold the hashes; check anyway, cheaply.
            at = first
            for tier, slots in zip(self._tiers, parts):
                now = list(map(tier.index.ready_slot, seq.hashes[at : at + len(slots)]))
                if now != slots:
                    slot = next((s for s, n in zip(slots, now) if s != n), slots[-1])
                    raise RuntimeError(f"kvbm: {tier.name} slot {slot} changed under a pending load")
                at += len(slots)
            at = first
            for tier, slots in zip(self._tiers, parts):
                if slots:
                    tier.index.acquire(slots)  # every part pinned before a sighting below may evict
                    if g == counted:
                        tier.stats.hit_blocks += len(slots)
                    hashes = seq.hashes[at : at + len(slots)] if tier.spec.keyed else []
                    op.gpu_blocks.extend(blocks[at : at + len(slots)])
                    op.parts.append(LoadPart(tier.name, slots, hashes))
                    loaded.append((tier, slots))
                at += len(slots)
        self._loading[req_id] = _Loading(loaded, op.sync, start)
        self._plan.loads.append(op)
        self.stats.matched_tokens += n * self.block_size
        if self.filter is not None:
            # A hit is a sighting: hot blocks earn the next tier. Each block's spill reads only the
            # frequency its own sighting returned, so the load's sightings are counted first, in one
            # batch (the blocks are distinct: chain positions and groups).
            runs = []
            for seq, first, parts in sighted:
                at = first
                for tier, slots in zip(self._tiers, parts):
                    if tier.next is not None and slots:
                        runs.append((tier, seq.hashes[at : at + len(slots)], slots))
                    at += len(slots)
            if self.defer_policy:
                self._deferred.append((self._sight_runs, (runs,)))
            else:
                self._sight_runs(runs)

    def _sight_runs(self, runs: list[tuple[_Tier, list[BlockHash], list[int]]]) -> None:
        """A hit's sightings: ``(tier, hashes, slots)`` runs of the blocks it loads, counted in one
        batch, then each run carried on (:meth:`_sighted_run`)."""
        assert self.filter is not None
        freqs = self.filter.observe_distinct([h for _, run, _ in runs for h in run])
        at = 0
        for tier, run, slots in runs:
            n = len(run)
            run_freqs = freqs[at : at + n]
            at += n
            if self.defer_policy:
                run, slots, run_freqs = _still_ready(tier.index, run, slots, run_freqs)
            self._sighted_run(tier, run, slots, run_freqs)

    def on_scheduled(
        self,
        req_id: str,
        tokens: Sequence[int],
        new_gpu_blocks: Sequence[int] | Sequence[Sequence[int]] | None,
        replace_blocks: bool,
        num_computed_after_step: int,
        num_computed_before_step: int | None = None,
    ) -> None:
        """The request runs this step; store every block it fills (write-through to the first tier).

        ``new_gpu_blocks``: its new GPU blocks (one list per group with several groups).
        ``num_computed_before_step``: where this step starts; a windowed group stores only the
        blocks this step computes, because vLLM frees its older blocks while the request runs
        (such a block, stored a step late, could hold another request's KV)."""
        req = self._requests.get(req_id)
        if req is None:
            return
        if self._single_full:
            # One full-attention group (most models): called for every running request every
            # step, mostly to store nothing (a decode step inside a block), so kept short.
            (seq,) = req.seqs
            blocks = self._per_group(new_gpu_blocks)[0] if new_gpu_blocks is not None else ()
            if replace_blocks:
                seq.gpu_blocks = list(blocks)
            elif blocks:
                seq.gpu_blocks.extend(blocks)
            if req.root is not None:
                computed, n_tokens = num_computed_after_step, len(tokens)
                n_full = (computed if computed < n_tokens else n_tokens) // self.block_size
                if (n_full if n_full < len(seq.gpu_blocks) else len(seq.gpu_blocks)) > seq.next_store:
                    self._store(req_id, req, seq, tokens, n_full, volatile=False, lead=True)
            return
        per_group = self._per_group(new_gpu_blocks) if new_gpu_blocks is not None else None
        if per_group is not None and self._window_stores:
            self._step_allocated.extend(per_group)
        for i, seq in enumerate(req.seqs):
            blocks = per_group[i] if per_group is not None else ()
            if replace_blocks:
                seq.gpu_blocks = list(blocks)
            elif blocks:
                seq.gpu_blocks.extend(blocks)
        if req.root is None:
            return
        # Only blocks whose every token is known and computed by this step.
        n_full = min(num_computed_after_step, len(tokens)) // self.block_size
        lead = self._lead or 0
        for i, (seq, group) in enumerate(zip(req.seqs, self.groups)):
            if group.windowed:
                if num_computed_before_step is not None:
                    seq.next_store = max(seq.next_store, num_computed_before_step // self.block_size)
            elif min(n_full, len(seq.gpu_blocks)) <= seq.next_store:
                continue  # a decode step inside a block: nothing to store (most calls)
            self._store(req_id, req, seq, tokens, n_full, volatile=group.windowed, lead=i == lead)

    def _store(self, req_id: str, req: _Request, seq: _Seq, tokens: Sequence[int], n_full: int, volatile: bool,
               lead: bool) -> None:
        """Add ``seq``'s blocks up to ``n_full`` that the first tier lacks to this step's store.
        ``lead``: the group whose blocks stand for the request's positions in KV events (one per
        position: a router matches positions, not groups).

        One pass over the blocks, in order (a reservation may evict a block that a later one
        would have found, and a sighting may spill): the index's lookups are bound once, and
        the batch's lists grow by one ``extend`` each at the end."""
        n_full = min(n_full, len(seq.gpu_blocks))
        start = seq.next_store
        if n_full <= start:
            return
        extend_hashes(seq.hashes, tokens, self.block_size, seq.root, n_full * self.block_size)
        first = self._tiers[0]
        index = first.index
        null = self.null_block
        ready_slot, contains, reserve, touch = index.ready_slot, index.contains, index.reserve, index.touch
        filt = self.filter
        sighting = self._sighted if filt is not None else None
        sight = filt.observe if filt is not None else None
        storing = self.listener.storing if self.listener is not None and lead else None
        hashes, gpu_blocks = seq.hashes, seq.gpu_blocks
        store: StoreBatch | None = None
        gpus: list[int] = []
        slots: list[int] = []
        stored: list[BlockHash] = []
        stop = n_full
        for b in range(start, n_full):
            gpu = gpu_blocks[b]
            if gpu == null:
                continue  # vLLM keeps no block here (outside a sliding window)
            block_hash = hashes[b]
            ready = ready_slot(block_hash)
            if ready is not None:
                # Stored already: write once, but keep it as fresh as the blocks
                # stored after it, or storing this chain's tail could evict its head.
                touch((ready,))
                if sighting is not None and b >= seq.sighted_upto:
                    sighting(first, block_hash, ready, sight(block_hash))  # computed again: a sighting
                continue
            if contains(block_hash):
                continue  # being stored by another request
            slot = reserve(block_hash)
            if slot is None:
                if volatile:
                    continue  # its GPU block may be gone next step: now or never
                # Every slot is pinned or pending: resume from here next step
                # (storing later blocks alone would be unreachable by prefix).
                stop = b
                break
            if store is None:
                store = self._plan.store
                if store is None:  # its batch id is taken here, after any spill decided above
                    store = self._plan.store = StoreBatch(self._new_batch_id(), first.name, [], [])
            gpus.append(gpu)
            slots.append(slot)
            stored.append(block_hash)
            if storing is not None:
                storing(req_id, b, block_hash)
        if store is not None:
            store.gpu_blocks += gpus
            store.slots += slots
            store.hashes += stored
            if volatile:
                self._step_window_blocks += gpus
            req.last_batch = store.batch_id
        seq.next_store = stop

    def on_preempted(self, req_id: str) -> None:
        """vLLM freed the request's GPU blocks; it gets new ones on resume."""
        req = self._requests.get(req_id)
        if req is not None:
            for seq in req.seqs:
                seq.gpu_blocks = []
                seq.next_store = seq.sighted_upto = 0
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

    # ---- spills: tier i → tier i+1 ----------------------------------------
    def _sighted(self, tier: _Tier, block_hash: BlockHash, slot: int, freq: int) -> None:
        """A sighting of a READY block of ``tier``, counted by the filter (``freq``: the frequency
        it returned); carry it one tier further down the chain, from the deepest tier already
        holding it, once that tier's filter admits it."""
        assert self.filter is not None
        dst = tier.next
        while dst is not None and dst.index.contains(block_hash):
            tier, dst = dst, dst.next
            slot = tier.index.ready_slot(block_hash)
            if slot is None:
                return  # still being copied there
        if dst is None:
            return
        self._spill_admitted(tier, dst, [block_hash], [slot], [freq])

    def _sighted_run(self, tier: _Tier, hashes: list[BlockHash], slots: list[int], freqs: list[int]) -> None:
        """:meth:`_sighted` for each block of a run of ``tier``, in order. When the next tier is the
        last one (G2 -> G3, the usual chain) a block is carried there or is there already: one
        batch, with no walk down the chain per block."""
        dst = tier.next
        if dst is None:
            return
        if dst.next is None:
            self._spill_admitted(tier, dst, hashes, slots, freqs)
            return
        for block_hash, slot, freq in zip(hashes, slots, freqs):
            self._sighted(tier, block_hash, slot, freq)

    def _spill_batch(self, src: _Tier, dst: _Tier) -> SpillBatch:
        """This step's spill batch into ``dst`` (made on its first block)."""
        spills = self._plan.spills
        if spills and spills[-1].dst == dst.name:  # the usual case: the batch of the last spill
            return spills[-1]
        spill = next((s for s in spills if s.dst == dst.name), None)
        if spill is None:
            spill = SpillBatch(self._new_batch_id(), src.name, dst.name, [], [], [])
            spills.append(spill)
        return spill

    def _spill_committed(self, src: _Tier, hashes: list[BlockHash], slots: list[int]) -> None:
        """The spill of each block of a batch just committed to ``src``, once the next tier's filter
        admits it. Nothing here sights a block, so the frequencies are read for the whole batch
        at once."""
        dst = src.next
        assert dst is not None
        filt = self.filter if dst.spec.filter_threshold is not None else None
        self._spill_admitted(src, dst, hashes, slots, filt.frequencies(hashes) if filt is not None else None)

    def _spill_committed_later(self, src: _Tier, hashes: list[BlockHash], slots: list[int]) -> None:
        """:meth:`_spill_committed` for the deferred policy: the batch was pinned when it committed
        (so that the step's own stores could not evict it before this decision); the spills pin
        their sources again, and the commit's pins go. A block dropped meanwhile (a bad slot) is not
        spilled."""
        kept, kept_slots, _ = _still_ready(src.index, hashes, slots)
        if kept:
            self._spill_committed(src, kept, kept_slots)
        src.index.release(slots)

    def _spill_admitted(self, src: _Tier, dst: _Tier, hashes: Sequence[BlockHash], slots: Sequence[int],
                        freqs: Sequence[int] | None) -> None:
        """Spill the READY blocks ``hashes`` (at ``slots`` of ``src``) that ``dst`` lacks and its filter
        admits (``freqs``: their frequencies; None: an unfiltered tier), in order: a slot reserved in
        ``dst`` each, the source slots pinned for the copy.

        Most blocks of a busy server are seen once: the filter's rejections are found and counted
        in C-level passes (against ``dst`` as it was before this call's reservations). The admitted
        ones go one by one, each looked up in ``dst`` when its turn comes: a reservation may evict
        a later block of the batch from ``dst``, which then spills again."""
        threshold = dst.spec.filter_threshold
        contains = dst.index.contains
        if freqs is None or threshold is None:
            admitted: Iterable[int] = range(len(hashes))
        else:
            admitted = [i for i, freq in enumerate(freqs) if freq >= threshold]
            if len(admitted) < len(hashes):
                held = list(map(contains, hashes))
                rejected = sum(1 for freq, inside in zip(freqs, held) if freq < threshold and not inside)
                self.filter.count_decisions(0, rejected)  # type: ignore[union-attr]
                self.stats.filter_rejections += rejected
        reserve = dst.index.reserve
        src_slots: list[int] = []
        dst_slots: list[int] = []
        spilled: list[BlockHash] = []
        counted = 0
        for i in admitted:
            block_hash = hashes[i]
            if contains(block_hash):
                continue
            counted += 1
            dst_slot = reserve(block_hash)
            if dst_slot is None:
                continue  # every slot of dst is pinned or pending
            src_slots.append(slots[i])
            dst_slots.append(dst_slot)
            spilled.append(block_hash)
        if threshold is not None and self.filter is not None:
            self.filter.count_decisions(counted, 0)
        if spilled:
            spill = self._spill_batch(src, dst)
            spill.src_slots += src_slots
            spill.dst_slots += dst_slots
            spill.hashes += spilled
            # The copies read them: no eviction meanwhile (reservations only touch dst).
            src.index.acquire(src_slots)

    # ---- the deferred spill policy ----------------------------------------
    @property
    def has_deferred(self) -> bool:
        """Spill-policy work is queued (:attr:`defer_policy`) for :meth:`run_deferred`."""
        return bool(self._deferred)

    def run_deferred(self, pause: Callable[[], None] | None = None) -> None:
        """Run the queued spill policy, in the order it was queued: its spills join the plan being
        built (the next :meth:`take_plan`), a step later than :attr:`defer_policy` off would put
        them. A committed batch stays pinned until its decision; a block that left its slot
        meanwhile (dropped as bad; a hit's block evicted) is not carried on.

        Not thread-safe against the planner's other methods: the caller runs it while nothing
        else calls the planner (kvbm.runtime.leader waits for it before every other call).
        ``pause`` is called between pieces of work (the leader's thread hands the GIL back to
        the engine's thread there)."""
        work, self._deferred = self._deferred, []
        for fn, args in work:
            fn(*args)
            if pause is not None:
                pause()

    # ---- per step -------------------------------------------------------
    def _new_batch_id(self) -> int:
        self._next_batch_id += 1
        return self._next_batch_id

    def take_plan(self) -> StepPlan:
        plan, self._plan = self._plan, StepPlan()
        if self._window_stores:
            # A windowed group's stored blocks may be freed by vLLM as the window moves on, and
            # written for another request once it hands them out again: this step's forward pass
            # waits for the stores still reading them only if vLLM handed one out this step (it
            # hands out recently freed blocks last, so that is rare). Any earlier store not yet
            # reported counts as in flight; a block allocated while it is, fences that step.
            allocated = set(chain.from_iterable(self._step_allocated))
            if any(not blocks.isdisjoint(allocated) for blocks in self._window_stores.values()):
                plan.fence_stores = True
                self.stats.window_store_fences += 1
            else:
                self.stats.window_store_fences_skipped += 1
        self._step_allocated = []
        if self._step_window_blocks:
            assert plan.store is not None
            self._window_stores[plan.store.batch_id] = set(self._step_window_blocks)
            self._step_window_blocks = []
        if plan.store is not None:
            if self.filter is not None:
                # Computing a block is a sighting: the step's stored blocks are counted here, in one
                # batch (distinct: a block being stored is not stored again), not per request.
                if self.defer_policy:
                    self._deferred.append((self.filter.observe_distinct, (plan.store.hashes,)))
                else:
                    self.filter.observe_distinct(plan.store.hashes)
            tier = self._by_name[plan.store.tier]
            self._pending[plan.store.batch_id] = _PendingBatch(tier, plan.store.slots, plan.store.hashes)
            if not tier.spec.keyed:
                plan.store.hashes = []  # host rows carry no hash: don't ship them
        plan.spills.sort(key=lambda spill: self._position[spill.dst])
        for spill in plan.spills:
            self._pending[spill.batch_id] = _PendingBatch(
                self._by_name[spill.dst], spill.dst_slots, spill.hashes,
                source=(self._by_name[spill.src], spill.src_slots),
            )
        return plan

    def on_worker_report(
        self,
        stored: Mapping[int, int] | None = None,
        failed_batches: Iterable[int] = (),
        finished_loads: Iterable[str] = (),
        failed_loads: Iterable[str] = (),
        released: Iterable[str] = (),
        bad_slots: Mapping[str, Iterable[int]] | None = None,
    ) -> None:
        """Apply what the workers did. ``stored`` maps batch id to the number
        of workers that completed it in this report; ``bad_slots`` maps a tier to
        slots that failed verification on read."""
        for batch_id in failed_batches:
            self._window_stores.pop(batch_id, None)
            pending = self._pending.pop(batch_id, None)
            if pending is not None:
                self.stats.failed_stores += len(pending.slots)
                for slot in pending.slots:
                    pending.tier.index.drop(slot)
                if pending.source is not None:
                    pending.source[0].index.release(pending.source[1])
        for batch_id, reports in (stored or {}).items():
            pending = self._pending.get(batch_id)
            if pending is None:
                continue
            pending.reports += reports
            if pending.reports >= self.world_size:
                del self._pending[batch_id]
                self._window_stores.pop(batch_id, None)
                if self.defer_policy and pending.source is not None:
                    # A spill's commit goes with the policy: its blocks are still visible in the tier
                    # above (pinned there until this commit), so a step's delay costs no hit.
                    self._deferred.append((self._commit, (pending,)))
                else:
                    self._commit(pending)
        for name, slots in (bad_slots or {}).items():
            tier = self._by_name.get(name)
            bad = set(slots)
            if tier is None or not bad:
                continue
            tier.stats.bad_blocks += len(bad)
            for slot in bad:
                tier.index.drop(slot)  # frees once the failed load releases it
        failed = set(failed_loads)
        for req_id in finished_loads:
            loading = self._loading.pop(req_id, None)
            if loading is None:
                continue
            for tier, slots in loading.parts:
                tier.index.release(slots)
            if req_id in failed:
                self.stats.failed_loads += 1
                req = self._requests.get(req_id)
                if loading.sync and req is not None:
                    # The step that used it ran, and its stores were dropped; vLLM recomputes
                    # from the first bad block. Store what it recomputes (it is good KV; a
                    # windowed group stores it as the step that recomputes it runs).
                    for seq in req.seqs:
                        seq.next_store = min(seq.next_store, loading.first_block)
            else:
                for tier, slots in loading.parts:
                    tier.stats.loaded_blocks += len(slots)
        self._awaiting_release.difference_update(released)

    def _commit(self, pending: _PendingBatch) -> None:
        tier = pending.tier
        # Newest first, so a chain's head is the most recently used and LRU
        # eviction takes tails first (a head alone is still a hit).
        tier.index.commit_many(pending.slots[::-1])
        if tier.spec.persistent:
            hashes, slots = self._committed[tier.name]
            hashes += pending.hashes
            slots += pending.slots
        if self.listener is not None:
            self.listener.committed(tier.name, pending.hashes)
        if pending.source is not None:
            pending.source[0].index.release(pending.source[1])
            tier.stats.spilled_blocks += len(pending.slots)
        else:
            tier.stats.stored_blocks += len(pending.slots)
        if tier.next is not None:
            if self.defer_policy:  # pinned until decided; in pieces (the policy's thread pauses between them)
                hashes, slots = pending.hashes, pending.slots
                tier.index.acquire(slots)
                self._deferred.extend((self._spill_committed_later, (tier, hashes[i : i + _DEFERRED_PIECE],
                                                                     slots[i : i + _DEFERRED_PIECE]))
                                      for i in range(0, len(hashes), _DEFERRED_PIECE))
            else:
                self._spill_committed(tier, pending.hashes, pending.slots)

    def take_commits(self, tier: str) -> tuple[list[BlockHash], list[int]]:
        """(hashes, slots) of blocks of a persistent tier made visible since the last call (for its
        journal), in commit order; two empty lists when none."""
        commits = self._committed.get(tier)
        if commits is None or not commits[0]:
            return [], []
        self._committed[tier] = ([], [])
        return commits

    def restore(self, tier: str, entries: dict[BlockHash, int]) -> int:
        """Rebuild a persistent tier's index from its journal after a restart; returns blocks restored."""
        return self._by_name[tier].index.restore(entries)

    # ---- introspection --------------------------------------------------
    def load_sources(self, req_id: str) -> dict[str, int]:
        """Blocks per tier (every tier of the chain, in order) of the request's in-flight load."""
        sources = dict.fromkeys(self._by_name, 0)
        for tier, slots in self._loading[req_id].parts if req_id in self._loading else ():
            sources[tier.name] += len(slots)
        return sources

    @property
    def busy(self) -> bool:
        """Work is in flight that needs more engine steps to be reported."""
        return bool(self._pending or self._loading or self._awaiting_release)

    def num_tracked_requests(self) -> int:
        return len(self._requests)


def _still_ready(index: TierIndex, hashes: list[BlockHash], slots: list[int], extra: list[int] | None = None
                 ) -> tuple[list[BlockHash], list[int], list[int] | None]:
    """``hashes``/``slots`` (and ``extra``, per block) without the blocks no longer READY at their
    slot: the deferred policy (:meth:`Planner.run_deferred`) decides after other calls ran."""
    now = list(map(index.ready_slot, hashes))
    if now == slots:
        return hashes, slots, extra
    kept = [i for i, (s, n) in enumerate(zip(slots, now)) if s == n]
    return ([hashes[i] for i in kept], [slots[i] for i in kept],
            None if extra is None else [extra[i] for i in kept])


def _take(parts: list[list[int]], n: int) -> list[list[int]]:
    """The first ``n`` blocks of per-tier runs laid end to end."""
    out = []
    for slots in parts:
        out.append(slots[: max(0, n)])
        n -= len(out[-1])
    return out


def _drop(parts: list[list[int]], n: int) -> list[list[int]]:
    """Per-tier runs laid end to end, less their first ``n`` blocks."""
    out = []
    for slots in parts:
        cut = min(n, len(slots))
        out.append(slots[cut:])
        n -= cut
    return out
