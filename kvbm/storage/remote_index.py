"""G4's index on the leader: the planner's :class:`~kvbm.core.tiers.TierIndex` of a shared tier.

A local tier's index (:class:`~kvbm.core.pool.BlockPool`) knows every block
because this server put it there. G4 is filled by every server on the same
Redis, and Redis evicts on its own (``allkeys-lru``, TTLs), so the truth is in
Redis and this index only asks:

* ``match_prefix`` is one batched ``EXISTS`` round trip for the whole rest of a
  prompt (:meth:`RemoteStore.contains_prefix`), and its answer is cached for
  ``lookup_ttl_s``: vLLM asks again for a waiting request at every step, and
  those asks must not each cost a round trip. A stale answer costs a
  recompute or a failed load (a miss), never wrong KV: values are verified
  when read.
* With ``wait_s`` (the leader passes :data:`LOOKUP_WAIT_S`) the round trip
  runs on one background thread, so a Redis that stalls (accepts the
  connection, never answers) cannot hold vLLM's scheduler for the socket
  timeout: the caller waits at most ``wait_s`` per scheduler step in total
  (:meth:`begin_step` refills it), and an answer not there by then is
  "not known yet" (``None``), picked up by the next ask of the same range.
  A lookup not answered ``timeout_s`` after it was asked is a miss (cached
  like any answer), so no request waits longer than that.
* Addresses are placeholders handed out per hash (Redis is keyed by hash;
  workers get the hashes with every job), stable while the hash is known.
* Pins are no-ops: another server may evict a block before it is loaded;
  the worker's read then fails verification (absent), the load fails and
  vLLM recomputes, and the address is dropped here.
* ``contains`` is what this server knows: blocks it stored or saw in a
  lookup, and blocks being stored. So a block another server stored is not
  stored again, and a known block is not reserved twice.

Any error answers "not there". Memory is bounded (``max_known`` hashes,
``max_lookups`` cached answers, ``max_pending`` lookups queued or running);
work per call is proportional to the blocks it names.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import TYPE_CHECKING

from kvbm.core.hashing import BlockHash
from kvbm.core.pool import PoolStats
from kvbm.storage.kinds import BAD_VALUE_KINDS, ERROR_KINDS, LATENCY_BUCKETS_S

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.storage.remote import RemoteStore

logger = logging.getLogger(__name__)

__all__ = ["BAD_VALUE_KINDS", "ERROR_KINDS", "LATENCY_BUCKETS_S", "LOOKUP_WAIT_S", "RemoteIndex", "open_remote",
           "remote_key"]

#: Seconds vLLM's scheduler waits for G4 lookups per step, in total, before answering "not known
#: yet" for a request (vLLM then asks again next step). Loopback and LAN round trips are 0.1-3 ms,
#: a 32K-token prompt's lookup about 3 ms, so a healthy Redis still answers in the same step; a
#: stalled one costs each step at most this, never the socket timeout. A constant, not a setting:
#: an answer that misses it only moves one request's G4 hit to the next step.
LOOKUP_WAIT_S = 0.005



def remote_key(identity: str) -> str:
    """The 32-hex-digit key an engine's G4 blocks live under (the handshake's
    ``TierPlan.remote_key``): servers with the same model identity, and only those, share blocks."""
    return blake2b(b"kvbm-g4-engine|" + identity.encode(), digest_size=16).hexdigest()


def open_remote(config: KvbmConfig, key: str, *, rank: int, world_size: int, announce: bool = False) -> RemoteStore:
    """G4's store of one rank, or a :class:`RemoteSetupError` naming the setting to fix. The
    leader looks up every rank's keys through rank 0's store, and ``announce``s (logs once per
    server) that values are unauthenticated without a secret. redis is imported only here."""
    from kvbm.storage.remote import RemoteStore

    return RemoteStore.from_config(config, key, rank=rank, world_size=world_size, announce=announce)


@dataclass(eq=False)
class _Lookup:
    """One lookup handed to the background thread; the thread writes only ``found``,
    ``finished_at`` and ``done``, everything else belongs to the scheduler's thread."""

    hashes: Sequence[BlockHash]
    failed: int  # the index's failed-load count when it was asked (see ``_failed``)
    deadline: float  # asked + timeout_s: past it, the asker takes a miss and nobody waits for it
    done: threading.Event = field(default_factory=threading.Event)
    found: int = 0
    finished_at: float = 0.0
    abandoned: bool = False


class RemoteIndex:
    """The leader's index of G4 (see the module docstring)."""

    def __init__(self, store: RemoteStore, name: str = "G4", *, lookup_ttl_s: float = 1.0,
                 max_known: int = 1 << 16, max_lookups: int = 4096, wait_s: float | None = None,
                 timeout_s: float = 2.0, max_pending: int = 64) -> None:
        """``wait_s``: None asks Redis on the caller's thread (tools and tests); a number asks on
        a background thread and waits at most that long per step (see the module docstring).
        ``timeout_s``: how long a background lookup may take before it counts as a miss (the
        store's socket timeout). ``max_pending``: lookups queued or running; more are misses."""
        if lookup_ttl_s <= 0 or max_known <= 0 or max_lookups <= 0 or timeout_s <= 0 or max_pending <= 0 \
                or (wait_s is not None and wait_s < 0):
            raise ValueError("RemoteIndex: lookup_ttl_s, max_known, max_lookups, timeout_s and max_pending must "
                             "be > 0, wait_s None or >= 0")
        self.store = store
        self.name = name
        self.num_slots = 0  # shared: sized by Redis's maxmemory, not here
        self.stats = PoolStats()
        self.lookup_ttl_s = lookup_ttl_s
        self.max_known, self.max_lookups = max_known, max_lookups
        self._known: OrderedDict[BlockHash, int] = OrderedDict()  # believed in G4 -> address (LRU)
        self._pending: dict[int, BlockHash] = {}  # reserved, being stored
        self._pending_hashes: set[BlockHash] = set()
        self._hash_of: dict[int, BlockHash] = {}  # every live address
        #: (first hash, last hash) of a looked-up range -> (valid until, blocks found, failures then)
        self._lookups: OrderedDict[tuple[BlockHash, BlockHash], tuple[float, int, int]] = OrderedDict()
        self._failed = 0  # known blocks dropped (a failed load): invalidates every cached answer
        self._next = 0
        self._forgotten = 0  # known hashes pushed out of the bounded table (invalidates matches)
        self.lookup_errors = 0
        self.wait_s, self.timeout_s, self.max_pending = wait_s, timeout_s, max_pending
        self._wait_left = wait_s or 0.0
        #: range -> its lookup, queued or running or answered but not yet asked for again (oldest first)
        self._inflight: OrderedDict[tuple[BlockHash, BlockHash], _Lookup] = OrderedDict()
        self._queue: queue.Queue[_Lookup | None] = queue.Queue(max_pending)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.deferred = 0  # asks answered "not known yet"
        self.gave_up = 0  # lookups not answered within timeout_s (misses)

    @property
    def version(self) -> int:
        """Changes when an address may have been forgotten, and every ``lookup_ttl_s``, so the
        planner's cached matches never outlive the addresses or the answers they hold."""
        return self._forgotten + int(time.monotonic() / self.lookup_ttl_s)

    # ---- lookups -----------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0,
                     stop: int | None = None) -> list[int] | None:
        """Addresses of the longest run G4 holds in ``hashes[start:stop]``; None: not known yet
        (a background lookup is still out; ask again next step)."""
        stop = len(hashes) if stop is None else min(stop, len(hashes))
        if start >= stop:
            return []
        key = (hashes[start], hashes[stop - 1])  # a block's hash covers its whole prefix
        now = time.monotonic()
        cached = self._lookups.get(key)
        # A cached answer holds until it expires, unless a known block failed its load since
        # (evicted, or Redis went down: ask again rather than fail the same load again), or this
        # server has since stored the block it stopped at.
        if cached is not None and cached[0] > now and cached[2] == self._failed and (
                start + cached[1] >= stop or hashes[start + cached[1]] not in self._known):
            found: int | None = cached[1]
        elif self.wait_s is None:
            found = self._lookup(hashes[start:stop])
            self._cache(key, now, found, self._failed)
        else:
            found = self._ask(key, hashes[start:stop], now)
            if found is None:
                return None
        found = min(found, self.max_known)  # every address handed out stays known until it is loaded
        return [self._see(h) for h in hashes[start:start + found]]

    def begin_step(self) -> None:
        """A new scheduler step: the time the caller may wait for lookups is ``wait_s`` again."""
        self._wait_left = self.wait_s or 0.0

    def _cache(self, key: tuple[BlockHash, BlockHash], when: float, found: int, failed: int) -> None:
        """Remember an answer measured at ``when`` for ``lookup_ttl_s`` (bounded, oldest out)."""
        self._lookups[key] = (when + self.lookup_ttl_s, found, failed)
        self._lookups.move_to_end(key)
        while len(self._lookups) > self.max_lookups:
            self._lookups.popitem(last=False)

    def _ask(self, key: tuple[BlockHash, BlockHash], hashes: Sequence[BlockHash], now: float) -> int | None:
        """The background lookup of ``key``: its answer, None while it is out, or a miss once it
        is ``timeout_s`` late or cannot be queued. Waits at most what is left of this step's wait."""
        entry = self._inflight.get(key)
        if entry is not None and entry.done.is_set() and (
                entry.finished_at + self.lookup_ttl_s <= now or entry.failed != self._failed):
            del self._inflight[key]  # answered too long ago, or a load failed since: ask again
            entry = None
        if entry is None:
            entry = self._submit(key, hashes, now)
            if entry is None:
                return 0  # too many lookups out (a stalled Redis) or closed: a miss, not cached
        if not entry.done.is_set() and self._wait_left > 0:
            began = time.monotonic()
            entry.done.wait(self._wait_left)
            now = time.monotonic()
            self._wait_left -= now - began
        if entry.done.is_set():
            del self._inflight[key]
            self._cache(key, entry.finished_at, entry.found, entry.failed)
            return entry.found
        if now < entry.deadline:
            self.deferred += 1
            return None
        self._abandon(key, entry)
        self._cache(key, now, 0, self._failed)
        return 0

    def _submit(self, key: tuple[BlockHash, BlockHash], hashes: Sequence[BlockHash], now: float) -> _Lookup | None:
        # Lookups finish in the order they were asked, so the answered and the late ones are at the
        # front: harvest (answered) or give up (late) from there; O(1) per lookup overall.
        while self._inflight:
            old_key, old = next(iter(self._inflight.items()))
            if old.done.is_set():
                del self._inflight[old_key]
                self._cache(old_key, old.finished_at, old.found, old.failed)
            elif old.deadline <= now:
                self._abandon(old_key, old)
            else:
                break
        if self._closed or len(self._inflight) >= self.max_pending:
            return None
        entry = _Lookup(hashes, self._failed, now + self.timeout_s)
        try:
            self._queue.put_nowait(entry)
        except queue.Full:  # abandoned lookups still queued behind a stalled one
            return None
        self._inflight[key] = entry
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name=f"kvbm-{self.name}-lookup", daemon=True)
            self._thread.start()
        return entry

    def _abandon(self, key: tuple[BlockHash, BlockHash], entry: _Lookup) -> None:
        del self._inflight[key]
        entry.abandoned = True  # the thread skips it if it has not started it
        self.gave_up += 1
        if self.gave_up == 1:
            logger.warning("kvbm: a %s lookup took longer than %g s (Redis stalled?); answering misses for it "
                           "(further ones are only counted)", self.name, self.timeout_s)

    def _serve(self) -> None:
        """The lookup thread: one lookup at a time, in the order asked."""
        while True:
            entry = self._queue.get()
            if entry is None or self._closed:
                return
            if entry.abandoned or time.monotonic() >= entry.deadline:
                continue  # the asker takes a miss anyway: spare Redis the round trip
            entry.found = self._lookup(entry.hashes)
            entry.finished_at = time.monotonic()
            entry.done.set()

    def close(self) -> None:
        """Stop the lookup thread (waiting at most ``timeout_s`` for a lookup in progress); later
        lookups are misses. Call before closing the store."""
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass  # the thread sees _closed when it takes the next lookup
        thread.join(timeout=self.timeout_s)

    def _lookup(self, hashes: Sequence[BlockHash]) -> int:
        try:
            return self.store.contains_prefix(hashes)
        except Exception:  # a lookup never fails a schedule: G4 just has nothing
            self.lookup_errors += 1
            if self.lookup_errors == 1:
                logger.exception("kvbm: G4 lookup failed; answering misses (further failures are only counted)")
            return 0

    def _see(self, block_hash: BlockHash) -> int:
        """The address of a block G4 holds, remembered as known (most recent)."""
        slot = self._known.get(block_hash)
        if slot is not None:
            self._known.move_to_end(block_hash)
            return slot
        slot = self._address(block_hash)
        self._remember(block_hash, slot)
        return slot

    def _address(self, block_hash: BlockHash) -> int:
        self._next += 1
        self._hash_of[self._next] = block_hash
        return self._next

    def _remember(self, block_hash: BlockHash, slot: int) -> None:
        old = self._known.get(block_hash)
        if old is not None and old != slot:  # seen in a lookup while we stored it too: keep one address
            self._hash_of.pop(old, None)
            self._forgotten += 1
        self._known[block_hash] = slot
        self._known.move_to_end(block_hash)
        while len(self._known) > self.max_known:
            old_hash, old_slot = self._known.popitem(last=False)
            self._hash_of.pop(old_slot, None)
            self._forgotten += 1
            self.stats.evicted += 1

    def ready_slot(self, block_hash: BlockHash) -> int | None:
        return self._known.get(block_hash)

    def contains(self, block_hash: BlockHash) -> bool:
        return block_hash in self._known or block_hash in self._pending_hashes

    # ---- stores ------------------------------------------------------------------
    def reserve(self, block_hash: BlockHash) -> int | None:
        if self.contains(block_hash):
            return None
        slot = self._address(block_hash)
        self._pending[slot] = block_hash
        self._pending_hashes.add(block_hash)
        return slot

    def commit(self, slot: int) -> None:
        block_hash = self._pending.pop(slot, None)
        if block_hash is None:
            return
        self._pending_hashes.discard(block_hash)
        self._remember(block_hash, slot)
        self.stats.stored += 1

    def commit_many(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self.commit(slot)

    def drop(self, slot: int) -> None:
        """A failed store, or a block that failed its read (evicted by Redis or another server)."""
        block_hash = self._hash_of.pop(slot, None)
        if block_hash is None:
            return
        if self._pending.pop(slot, None) is not None:
            self._pending_hashes.discard(block_hash)
        elif self._known.get(block_hash) == slot:
            del self._known[block_hash]
            self._forgotten += 1
            self._failed += 1
        self.stats.dropped += 1

    # ---- pins: none (another server may evict a block at any time) -----------------
    def acquire(self, slots: Iterable[int]) -> None:
        pass

    def release(self, slots: Sequence[int]) -> None:
        pass

    def touch(self, slots: Iterable[int]) -> None:
        for slot in slots:
            block_hash = self._hash_of.get(slot)
            if block_hash is not None and block_hash in self._known:
                self._known.move_to_end(block_hash)

    def restore(self, entries: dict[BlockHash, int]) -> int:
        return 0  # nothing to restore: Redis is the index

    @property
    def num_used(self) -> int:
        """Blocks this server knows to be in G4 or is storing there."""
        return len(self._known) + len(self._pending)
