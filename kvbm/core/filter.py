"""The admission filter of a spill: only blocks seen more than once go on to the next tier
(G2 -> G3 by default: the "disk offload filter").

Most blocks of a serving workload are seen once (a unique question, a
one-off document). Writing each of them to the SSD costs bandwidth and drive
endurance for nothing, so a block is spilled to a filtered tier only once its
frequency reaches that tier's threshold (spec §4, same rule as the reference).
One table of sightings serves every tier of the chain:

* first sighting -> 1; each later sighting doubles it (saturating at ``CAP``);
* every ``decay_period_s`` all frequencies drop by 1 and those at <= 0 are
  forgotten, so a block that stops being used stops counting;
* the table is bounded: when a new entry would exceed ``max_entries`` the
  filter decays early, as many steps as needed, and the period restarts
  (the reference's background task does the same when it is told the map is
  over size).

Nothing is O(table) per call. A decay step subtracts 1 from every frequency
at once by raising a common offset (an entry stores ``offset + frequency``);
entries are grouped by stored value, and a min-heap of those values finds the
groups that reach 0, so a decay costs O(1) per entry it forgets. This matters once the table is full: a
full table of mostly hot blocks decays early on nearly every new block, and
a pass over a million entries each time stalled the scheduler. Decay is
applied lazily on calls, from the clock. Pure Python; not thread-safe (the
leader's scheduler thread owns it).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

#: Frequencies saturate here (doubling must not grow unboundedly).
CAP = 1 << 30
#: Seen twice (a first sighting counts 1, the next doubles it): the default admission.
DEFAULT_THRESHOLD = 2


@dataclass
class FilterStats:
    observed: int = 0
    admitted: int = 0  # should_offload() -> True
    rejections: int = 0  # should_offload() -> False
    decays: int = 0  # decay steps applied (periodic + early), a step subtracts 1 from all
    early_decays: int = 0  # decay steps forced by the size bound
    forgotten: int = 0  # entries dropped by decay


class FrequencyFilter:
    """Per-block-hash frequency with doubling, periodic decay and a size bound."""

    def __init__(
        self,
        *,
        threshold: int = DEFAULT_THRESHOLD,
        decay_period_s: float = 600.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold < 1:
            raise ValueError(f"FrequencyFilter: threshold must be >= 1, got {threshold}")
        if not decay_period_s > 0:
            raise ValueError(f"FrequencyFilter: decay_period_s must be > 0, got {decay_period_s}")
        if max_entries < 1:
            raise ValueError(f"FrequencyFilter: max_entries must be >= 1, got {max_entries}")
        self.threshold = threshold
        self.decay_period_s = float(decay_period_s)
        self.max_entries = max_entries
        self._clock = clock
        #: hash -> its stored value, ``offset + frequency`` as of its last change.
        self._stored: dict[Hashable, int] = {}
        #: stored value -> hashes holding it; a decay forgets whole buckets.
        self._buckets: dict[int, set[Hashable]] = {}
        #: Min-heap of bucket values (an emptied bucket's value stays until it surfaces).
        self._values: list[int] = []
        #: Decay steps applied so far.
        self._offset = 0
        self._period_start = clock()
        self.stats = FilterStats()

    # ---- decay ---------------------------------------------------------------------
    def _lowest(self) -> int | None:
        """The lowest stored value in the table (None if empty)."""
        values = self._values
        while values and values[0] not in self._buckets:
            heapq.heappop(values)
        return values[0] if values else None

    def _decay(self, steps: int) -> None:
        """Apply ``steps`` decay steps at once: subtract and forget those at <= 0."""
        if steps <= 0:
            return
        self._offset += steps
        self.stats.decays += steps
        while (lowest := self._lowest()) is not None and lowest <= self._offset:
            heapq.heappop(self._values)
            bucket = self._buckets.pop(lowest)
            for block_hash in bucket:
                del self._stored[block_hash]
            self.stats.forgotten += len(bucket)

    def _catch_up(self) -> None:
        now = self._clock()
        if now - self._period_start >= self.decay_period_s:
            self._catch_up_to(now)

    def _catch_up_to(self, now: float) -> None:
        elapsed = now - self._period_start
        if elapsed < self.decay_period_s:
            return
        periods = int(elapsed // self.decay_period_s)
        self._period_start += periods * self.decay_period_s
        self._decay(periods)

    def _make_room(self) -> None:
        """Decay early until a new entry fits (size < max_entries), then restart the period.

        Equivalent to repeating single decay steps until under the bound:
        entries arrive one at a time, so one must go, and the number of steps
        is the lowest frequency in the table, which the heap knows.
        """
        if len(self._stored) < self.max_entries:
            return
        lowest = self._lowest()
        assert lowest is not None
        steps = lowest - self._offset
        self._decay(steps)
        self.stats.early_decays += steps
        self._period_start = self._clock()

    # ---- API -----------------------------------------------------------------
    def observe(self, block_hash: Hashable) -> int:
        """Count one sighting of ``block_hash``; returns its new frequency (1, 2, 4, ...).

        Called for every block the scheduler computes or loads, so the decay check is written
        out here (two Python frames per sighting)."""
        now = self._clock()
        if now - self._period_start >= self.decay_period_s:
            self._catch_up_to(now)
        self.stats.observed += 1
        stored = self._stored.get(block_hash)
        if stored is None:
            if len(self._stored) >= self.max_entries:
                self._make_room()
            new = 1
        else:
            new = min((stored - self._offset) * 2, CAP)
        self._place(block_hash, stored, self._offset + new)
        return new

    def _place(self, block_hash: Hashable, stored: int | None, value: int) -> None:
        """Move ``block_hash`` from the bucket of stored value ``stored`` (None: a new entry)
        to the bucket of ``value``; a bucket's value joins the heap when the bucket appears."""
        buckets = self._buckets
        if stored is not None:
            bucket = buckets[stored]
            if len(bucket) == 1:
                del buckets[stored]
            else:
                bucket.remove(block_hash)
        self._stored[block_hash] = value
        bucket = buckets.get(value)
        if bucket is None:
            buckets[value] = {block_hash}
            heapq.heappush(self._values, value)
        else:
            bucket.add(block_hash)

    def has_room(self, entries: int) -> bool:
        """True if ``entries`` new entries fit without an early decay: until then the order of
        sightings of different blocks cannot change any frequency (a caller may batch them)."""
        return len(self._stored) + entries < self.max_entries

    def observe_distinct(self, hashes: Sequence[Hashable]) -> None:
        """:meth:`observe` each of ``hashes`` (no repeats), the new ones added in bulk.

        A step stores hundreds of blocks, most seen for the first time: they join the
        frequency-1 bucket with one ``dict.update`` and one ``set.update``."""
        if not self.has_room(len(hashes)):
            for block_hash in hashes:  # an early decay may come between two of them: in order
                self.observe(block_hash)
            return
        now = self._clock()
        if now - self._period_start >= self.decay_period_s:
            self._catch_up_to(now)
        self.stats.observed += len(hashes)
        stored_of = self._stored
        buckets = self._buckets
        offset = self._offset
        fresh = []
        for block_hash in hashes:
            stored = stored_of.get(block_hash)
            if stored is None:
                fresh.append(block_hash)
                continue
            self._place(block_hash, stored, offset + min((stored - offset) * 2, CAP))
        if fresh:
            value = offset + 1
            stored_of.update(dict.fromkeys(fresh, value))
            bucket = buckets.get(value)
            if bucket is None:
                buckets[value] = set(fresh)
                heapq.heappush(self._values, value)
            else:
                bucket.update(fresh)

    def frequency(self, block_hash: Hashable) -> int:
        """Current frequency (0 if unknown or forgotten)."""
        self._catch_up()
        stored = self._stored.get(block_hash)
        return 0 if stored is None else stored - self._offset

    def frequencies(self, hashes: Sequence[Hashable]) -> list[int]:
        """:meth:`frequency` of each of ``hashes``, one decay check for them all (no stats counted:
        see :meth:`count_decisions`)."""
        self._catch_up()
        offset = self._offset
        return [0 if stored is None else stored - offset for stored in map(self._stored.get, hashes)]

    def count_decisions(self, admitted: int, rejected: int) -> None:
        """Count admissions decided from :meth:`frequencies` (as :meth:`should_offload` counts its own)."""
        self.stats.admitted += admitted
        self.stats.rejections += rejected

    def should_offload(self, block_hash: Hashable, threshold: int | None = None) -> bool:
        """True if the block has been seen often enough to be worth a write to the next tier
        (``threshold``: that tier's, instead of this filter's own)."""
        now = self._clock()
        if now - self._period_start >= self.decay_period_s:
            self._catch_up_to(now)
        stored = self._stored.get(block_hash)
        ok = (0 if stored is None else stored - self._offset) >= (self.threshold if threshold is None else threshold)
        if ok:
            self.stats.admitted += 1
        else:
            self.stats.rejections += 1
        return ok

    def __len__(self) -> int:
        self._catch_up()
        return len(self._stored)

    def __contains__(self, block_hash: object) -> bool:
        self._catch_up()
        return block_hash in self._stored
