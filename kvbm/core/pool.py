"""One tier's slot pool: which block hash lives in which slot, and who uses it.

State per slot is explicit: FREE, PENDING (a copy into it is in flight; the
hash is reserved so nobody stores it twice, but lookups do not see it) or
READY (visible to lookups). READY slots with refcount 0 sit in an LRU
(``OrderedDict``: O(1) touch, O(1) evict). Nothing here is O(pool size) per
call, so the scheduler can consult it every step.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from kvbm.core.hashing import BlockHash


class SlotState(Enum):
    FREE = 0
    PENDING = 1
    READY = 2


_PENDING = SlotState.PENDING
_READY = SlotState.READY


@dataclass
class PoolStats:
    stored: int = 0
    evicted: int = 0
    dropped: int = 0  # failed copies and bad slots


class BlockPool:
    """Registry hash→slot with refcounts and LRU eviction for one tier."""

    def __init__(self, num_slots: int, name: str = "pool") -> None:
        if num_slots <= 0:
            raise ValueError(f"{name}: num_slots must be > 0, got {num_slots}")
        self.name = name
        self.num_slots = num_slots
        self._free: list[int] = list(range(num_slots - 1, -1, -1))
        self._slot_of: dict[BlockHash, int] = {}  # PENDING and READY (dedup)
        self._ready: dict[BlockHash, int] = {}  # READY only (lookups, at C speed)
        self._hash_of: list[BlockHash | None] = [None] * num_slots
        self._state: list[SlotState] = [SlotState.FREE] * num_slots
        self._refs: list[int] = [0] * num_slots
        self._lru: OrderedDict[int, None] = OrderedDict()  # evictable slots, oldest first
        self.stats = PoolStats()
        #: Bumped whenever the set of READY hashes changes, so callers can
        #: cache lookups (vLLM re-asks for waiting requests every step).
        self.version = 0
        #: Called with a hash that leaves the pool (evicted, or dropped: a failed copy or a bad
        #: slot), so KV events can tell the router (kvbm.runtime.events). O(1) per call.
        self.on_removed: Callable[[BlockHash], None] | None = None
        # The two lookups the planner makes for every block of every step, bound straight to the
        # dicts' C methods (no Python frame per call; the dicts are never replaced, only mutated).
        #: True if the hash is stored or being stored (dedup check).
        self.contains: Callable[[BlockHash], bool] = self._slot_of.__contains__
        #: The READY slot of a hash, or None.
        self.ready_slot: Callable[[BlockHash], int | None] = self._ready.get

    # ---- lookups -------------------------------------------------------
    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0, stop: int | None = None) -> list[int]:
        """Slots of the longest run of READY hashes in ``hashes[start:stop]``.

        One C-level pass (``map`` over the READY dict), no Python loop: the
        scheduler asks this for every new request, over every prompt block.
        """
        slots = list(map(self._ready.get, hashes[start:stop]))
        if None in slots:
            del slots[slots.index(None):]
        return slots  # type: ignore[return-value]

    # ---- storing -------------------------------------------------------
    def reserve(self, block_hash: BlockHash) -> int | None:
        """Reserve a PENDING slot for ``block_hash``; None if stored already or full.

        Evicts the least recently used unreferenced READY block when no slot
        is free. A PENDING slot is invisible until :meth:`commit`.
        """
        slot_of = self._slot_of
        if block_hash in slot_of:
            return None
        if self._free:
            slot = self._free.pop()
        elif self._lru:
            slot, _ = self._lru.popitem(last=False)
            old = self._hash_of[slot]
            del slot_of[old]  # type: ignore[arg-type]
            del self._ready[old]  # type: ignore[arg-type]
            self.stats.evicted += 1
            self.version += 1
            if self.on_removed is not None:
                self.on_removed(old)  # type: ignore[arg-type]
        else:
            return None
        slot_of[block_hash] = slot
        self._hash_of[slot] = block_hash
        self._state[slot] = _PENDING
        return slot

    def commit(self, slot: int) -> None:
        """The copy into ``slot`` completed: make it visible and evictable."""
        self.commit_many((slot,))

    def commit_many(self, slots: Sequence[int]) -> None:
        """:meth:`commit` each of ``slots``, in order (a whole batch in one call)."""
        state, ready, hash_of, refs, lru = self._state, self._ready, self._hash_of, self._refs, self._lru
        done = 0
        for slot in slots:
            if state[slot] is not _PENDING:
                continue
            state[slot] = _READY
            ready[hash_of[slot]] = slot  # type: ignore[index]
            done += 1
            if refs[slot] == 0:
                lru[slot] = None
        self.stats.stored += done
        self.version += done

    def drop(self, slot: int) -> None:
        """Forget a slot's content (failed copy, corrupt data). Refs are kept
        so a reader finishing later still releases cleanly."""
        h = self._hash_of[slot]
        if h is None:
            return
        if self._slot_of.get(h) == slot:
            del self._slot_of[h]
            self._ready.pop(h, None)
        self._hash_of[slot] = None
        self._lru.pop(slot, None)
        self.stats.dropped += 1
        self.version += 1
        self._state[slot] = SlotState.FREE
        if self.on_removed is not None:
            self.on_removed(h)
        if self._refs[slot] == 0:
            self._free.append(slot)

    def restore(self, entries: dict[BlockHash, int]) -> int:
        """Adopt READY blocks at given slots (a persisted tier after a restart).

        Only for an empty pool; one pass, so restoring a large tier stays
        linear. Entries with an out-of-range or repeated slot are skipped.
        Returns the number of blocks adopted.
        """
        if self._slot_of:
            raise RuntimeError(f"{self.name}: restore() needs an empty pool")
        taken: set[int] = set()
        for block_hash, slot in entries.items():
            if not 0 <= slot < self.num_slots or slot in taken:
                continue
            taken.add(slot)
            self._slot_of[block_hash] = slot
            self._ready[block_hash] = slot
            self._hash_of[slot] = block_hash
            self._state[slot] = SlotState.READY
            self._lru[slot] = None
        self._free = [slot for slot in range(self.num_slots - 1, -1, -1) if slot not in taken]
        self.version += 1
        return len(taken)

    # ---- readers -------------------------------------------------------
    def acquire(self, slots: Iterable[int]) -> None:
        """Pin slots for a reader (a load in flight) so they are not evicted."""
        refs, lru = self._refs, self._lru
        for slot in slots:
            refs[slot] += 1
            lru.pop(slot, None)

    def release(self, slots: Sequence[int]) -> None:
        """Unpin; slots return to the LRU with the first of a chain most recent."""
        refs, state, lru = self._refs, self._state, self._lru
        for slot in reversed(slots):
            refs[slot] -= 1
            if refs[slot] > 0:
                continue
            if state[slot] is _READY:
                lru[slot] = None  # most recently used
            elif state[slot] is SlotState.FREE and self._hash_of[slot] is None:
                self._free.append(slot)

    def touch(self, slots: Iterable[int]) -> None:
        """Mark slots most recently used (a lookup hit them)."""
        for slot in slots:
            if slot in self._lru:
                self._lru.move_to_end(slot)

    # ---- introspection -------------------------------------------------
    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def refcount(self, slot: int) -> int:
        return self._refs[slot]

    def state(self, slot: int) -> SlotState:
        return self._state[slot]

    def lru_order(self) -> list[int]:
        """Evictable slots, next victim first (for tests and debugging)."""
        return list(self._lru)
