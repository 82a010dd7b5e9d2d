"""What the leader tells the workers each step, and what they report back.

The plan names tiers (``"G2"``, ``"G3"``, ...) and their slots; a worker's
transfer executor knows which medium each tier is. Everything here is plain
data that vLLM carries between processes (pickled), so it holds ids, never
objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from kvbm.core.hashing import BlockHash


@dataclass
class LoadPart:
    """One tier's share of a load: its slots, in prefix order."""

    tier: str
    slots: list[int]
    #: Hashes of those blocks for a keyed tier (checked on read, or the keys themselves).
    hashes: list[BlockHash] = field(default_factory=list)


@dataclass
class LoadOp:
    """Load one request's prefix into ``gpu_blocks``: the parts, in chain order, fill
    them one after the other (the first part the first blocks, and so on)."""

    req_id: str
    gpu_blocks: list[int]
    parts: list[LoadPart] = field(default_factory=list)
    #: Synchronous: the request is scheduled in this very step, so the copy must land
    #: before the forward pass reads it (the worker orders it so); otherwise the
    #: request waits, unscheduled, until the workers report the load finished.
    sync: bool = False

    def slots(self, tier: str) -> list[int]:
        """The slots loaded from ``tier`` (empty if none)."""
        return next((part.slots for part in self.parts if part.tier == tier), [])


@dataclass
class StoreBatch:
    """All G1 → first tier copies of one engine step; completes as one unit per worker."""

    batch_id: int
    tier: str
    gpu_blocks: list[int]
    slots: list[int]
    hashes: list[BlockHash] = field(default_factory=list)  # keyed tiers only


@dataclass
class SpillBatch:
    """Tier ``src`` → the next tier ``dst``: copies decided this step (its filter admitted them)."""

    batch_id: int
    src: str
    dst: str
    src_slots: list[int]
    dst_slots: list[int]
    hashes: list[BlockHash]


@dataclass
class StepPlan:
    """What the workers do in one engine step."""

    loads: list[LoadOp] = field(default_factory=list)
    store: StoreBatch | None = None
    spills: list[SpillBatch] = field(default_factory=list)  # at most one per pair of tiers, in chain order
    #: (req_id, batch_id): report the request as finished sending once this
    #: worker completed that store batch (vLLM then frees its GPU blocks).
    release_after_store: list[tuple[str, int]] = field(default_factory=list)
    #: Requests were preempted: their GPU blocks may be reused this step, so
    #: in-flight stores from them must complete before the forward pass.
    drain_stores: bool = False
    #: vLLM gave a request this step a GPU block of a windowed KV-cache group that an earlier
    #: store may still be reading (vLLM frees a window's older blocks while the request runs):
    #: this step's forward pass waits for the stores submitted so far (without blocking the CPU).
    fence_stores: bool = False

    def is_empty(self) -> bool:
        return not (self.loads or self.store or self.spills or self.release_after_store or self.drain_stores
                    or self.fence_stores)


@dataclass
class WorkerReport:
    """Worker → leader: what one rank did since its last report.

    Reports of several ranks add up (:meth:`merged`); the leader makes a batch
    visible only once ``world_size`` ranks reported it.
    """

    #: batch id -> ranks that completed it
    stored: dict[int, int] = field(default_factory=dict)
    failed_batches: set[int] = field(default_factory=set)
    #: tier -> slots that failed verification or I/O on read: the leader drops them.
    bad_slots: dict[str, set[int]] = field(default_factory=dict)
    #: Requests whose load failed on this rank (recomputed). vLLM 0.30+ also says so
    #: through failed_recving; older releases only through block ids, so kvbm carries it.
    failed_loads: set[str] = field(default_factory=set)
    #: Synchronous loads whose copies completed on this rank (vLLM does not track them):
    #: the leader unpins their slots once every rank reported.
    sync_loaded: dict[str, int] = field(default_factory=dict)
    #: Bytes moved and seconds spent per direction (kvbm.core.tiers.move, e.g. "G2->G1"),
    #: summed over ranks; the leader divides seconds by the rank count.
    transfer_bytes: dict[str, int] = field(default_factory=dict)
    transfer_seconds: dict[str, float] = field(default_factory=dict)
    #: tier -> failures by kind (e.g. G3: read, checksum, mismatch, write).
    errors: dict[str, dict[str, int]] = field(default_factory=dict)
    #: G4 round trips by operation ("read", "write"): cumulative histogram counts per
    #: bucket (kvbm.storage.remote_index.LATENCY_BUCKETS_S, then +Inf), then the seconds.
    round_trips: dict[str, list[float]] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in fields(WorkerReport))

    def add_transfer(self, direction: str, nbytes: int, seconds: float) -> None:
        self.transfer_bytes[direction] = self.transfer_bytes.get(direction, 0) + nbytes
        self.transfer_seconds[direction] = self.transfer_seconds.get(direction, 0.0) + seconds

    def merged(self, other: WorkerReport) -> dict:
        """The fields of both reports added up (keyword arguments for a new report)."""
        return {
            "stored": _add(self.stored, other.stored),
            "failed_batches": self.failed_batches | other.failed_batches,
            "bad_slots": _union(self.bad_slots, other.bad_slots),
            "failed_loads": self.failed_loads | other.failed_loads,
            "sync_loaded": _add(self.sync_loaded, other.sync_loaded),
            "transfer_bytes": _add(self.transfer_bytes, other.transfer_bytes),
            "transfer_seconds": _add(self.transfer_seconds, other.transfer_seconds),
            "errors": {tier: _add(self.errors.get(tier, {}), other.errors.get(tier, {}))
                       for tier in self.errors.keys() | other.errors.keys()},
            "round_trips": add_histograms(self.round_trips, other.round_trips),
        }


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out


def add_histograms(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    """Histograms by key added bucket by bucket (a key only one side has is copied)."""
    return {key: [x + y for x, y in zip(a[key], b[key])] if key in a and key in b else list(a.get(key) or b[key])
            for key in a.keys() | b.keys()}


def _union(a: dict[str, set[int]], b: dict[str, set[int]]) -> dict[str, set[int]]:
    return {key: a.get(key, set()) | b.get(key, set()) for key in a.keys() | b.keys()}
