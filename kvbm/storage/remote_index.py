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
* Addresses are placeholders handed out per hash (Redis is keyed by hash;
  workers get the hashes with every job), stable while the hash is known.
* Pins are no-ops: another server may evict a block before it is loaded;
  the worker's read then fails verification (absent), the load fails and
  vLLM recomputes, and the address is dropped here.
* ``contains`` is what this server knows: blocks it stored or saw in a
  lookup, and blocks being stored. So a block another server stored is not
  stored again, and a known block is not reserved twice.

Any error answers "not there". Memory is bounded (``max_known`` hashes,
``max_lookups`` cached answers); work per call is proportional to the blocks
it names.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from hashlib import blake2b
from typing import TYPE_CHECKING

from kvbm.core.hashing import BlockHash
from kvbm.core.pool import PoolStats

if TYPE_CHECKING:
    from kvbm.config import KvbmConfig
    from kvbm.storage.remote import RemoteStore

logger = logging.getLogger(__name__)

__all__ = ["BAD_VALUE_KINDS", "ERROR_KINDS", "LATENCY_BUCKETS_S", "RemoteIndex", "open_remote", "remote_key"]

# What kvbm.storage.remote measures and kvbm.metrics exports: here, so that the metrics need not import redis.
#: Redis round-trip latency histogram bounds (seconds), Prometheus-style ``le``.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
#: Errors by kind: shard-level (the node is then down) and per-command replies.
ERROR_KINDS = ("connection", "timeout", "auth", "oom", "moved", "readonly", "busy", "response", "unroutable",
               "other")
#: Values that did not verify, by kind.
BAD_VALUE_KINDS = ("foreign", "corrupt")


def remote_key(identity: str) -> str:
    """The 32-hex-digit key an engine's G4 blocks live under (the handshake's
    ``TierSizes.remote_key``): servers with the same model identity, and only those, share blocks."""
    return blake2b(b"kvbm-g4-engine|" + identity.encode(), digest_size=16).hexdigest()


def open_remote(config: KvbmConfig, key: str, *, rank: int, world_size: int) -> RemoteStore:
    """G4's store of one rank, or a :class:`RemoteSetupError` naming the setting to fix. The
    leader looks up every rank's keys through rank 0's store. redis is imported only here."""
    from kvbm.storage.remote import RemoteStore

    return RemoteStore.from_config(config, key, rank=rank, world_size=world_size)


class RemoteIndex:
    """The leader's index of G4 (see the module docstring)."""

    def __init__(self, store: RemoteStore, name: str = "G4", *, lookup_ttl_s: float = 1.0,
                 max_known: int = 1 << 16, max_lookups: int = 4096) -> None:
        if lookup_ttl_s <= 0 or max_known <= 0 or max_lookups <= 0:
            raise ValueError("RemoteIndex: lookup_ttl_s, max_known and max_lookups must be > 0")
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

    @property
    def version(self) -> int:
        """Changes when an address may have been forgotten, and every ``lookup_ttl_s``, so the
        planner's cached matches never outlive the addresses or the answers they hold."""
        return self._forgotten + int(time.monotonic() / self.lookup_ttl_s)

    # ---- lookups -----------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[BlockHash], start: int = 0, stop: int | None = None) -> list[int]:
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
            found = cached[1]
        else:
            found = self._lookup(hashes[start:stop])
            self._lookups[key] = (now + self.lookup_ttl_s, found, self._failed)
            self._lookups.move_to_end(key)
            while len(self._lookups) > self.max_lookups:
                self._lookups.popitem(last=False)
        found = min(found, self.max_known)  # every address handed out stays known until it is loaded
        return [self._see(h) for h in hashes[start:start + found]]

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
