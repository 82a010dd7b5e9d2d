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
at once by raising a common offset (an entry stores ``offset + frequency``;
one stored at or below the offset has frequency 0 and counts as forgotten).
Entries are filed by value, and a min-heap of the filed values finds those a
decay reached. A sighting only rewrites the entry's stored value (one dict
write: the scheduler thread pays it for every block it stores or loads); the
entry stays filed where it was, below its value, until the sweep reaches that
filing and files it again at its value, or drops it if it fell to 0. The sweep
after a decay looks at most at ``SWEEP_BATCH`` filed entries per batch call
(:meth:`FrequencyFilter.observe_distinct`, :meth:`FrequencyFilter.frequencies`):
the first periodic decay after a busy period reaches every entry first seen in
it, and sweeping a full table of a million entries in one call stalled the
scheduler for up to ~0.4 s; it is now spread over the following steps. An early
decay (a full table) sweeps, a batch at a time, until an entry is dropped. An entry is filed
again at most once per sighting. Decay is applied lazily on calls, from the
clock. Pure Python; not thread-safe (the leader's scheduler thread owns it).
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
#: Filed entries one batch call looks at after a decay, at most (~0.4 ms of the scheduler's step).
SWEEP_BATCH = 1024


@dataclass
class FilterStats:
    observed: int = 0
    admitted: int = 0  # should_offload() -> True
    rejections: int = 0  # should_offload() -> False
    decays: int = 0  # decay steps applied (periodic + early), a step subtracts 1 from all
    early_decays: int = 0  # decay steps forced by the size bound
    forgotten: int = 0  # entries a decay took to 0 (counted when swept, or when seen again first)


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
        #: hash -> its stored value, ``offset + frequency`` as of its last sighting.
        self._stored: dict[Hashable, int] = {}
        #: value -> hashes filed there. Each entry is filed once, at a value no higher than its stored
        #: value: a new entry at its own; a sighting raises the stored value and leaves it filed where
        #: it was (a dict write per sighting, the common case); the decay that reaches a filed value
        #: forgets the entries that fell to 0 there and files the others again, at their own value.
        self._filed: dict[int, list[Hashable]] = {}
        #: Min-heap of the filed values.
        self._values: list[int] = []
        #: Decay steps applied so far.
        self._offset = 0
        self._period_start = clock()
        self.stats = FilterStats()

    # ---- decay ---------------------------------------------------------------------
    def _file(self, block_hash: Hashable, value: int) -> None:
        """File ``block_hash`` at ``value`` (a filing's value joins the heap when it appears)."""
        filed = self._filed.get(value)
        if filed is None:
            self._filed[value] = [block_hash]
            heapq.heappush(self._values, value)
        else:
            filed.append(block_hash)

    def _decay(self, steps: int) -> None:
        """Apply ``steps`` decay steps at once: every frequency drops by ``steps`` (O(1); those
        at <= 0 are forgotten now and dropped from the table by :meth:`_sweep`)."""
        if steps <= 0:
            return
        self._offset += steps
        self.stats.decays += steps

    def _sweep(self, budget: int | None) -> None:
        """Look at up to ``budget`` (None: all) entries filed at values a decay reached: drop
        those at 0, file the others (seen since they were filed) again at their own value.

        O(1) per entry dropped or filed again; a big filing is taken in parts."""
        offset, stored_of, values, filed_at = self._offset, self._stored, self._values, self._filed
        left = budget
        forgotten = 0
        while values and values[0] <= offset and (left is None or left > 0):
            hashes = filed_at[values[0]]
            take = len(hashes) if left is None else min(len(hashes), left)
            for _ in range(take):
                block_hash = hashes.pop()
                value = stored_of[block_hash]
                if value <= offset:
                    del stored_of[block_hash]
                    forgotten += 1
                else:
                    self._file(block_hash, value)  # seen since it was filed
            if left is not None:
                left -= take
            if not hashes:
                del filed_at[heapq.heappop(values)]
        self.stats.forgotten += forgotten

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

        Equivalent to repeating single decay steps until under the bound: entries arrive one at
        a time, so one must go, and the number of steps is the lowest frequency in the table.
        The lowest filed value is no higher than that: decaying to it forgets the entries at
        that frequency, or only files entries again (seen since they were filed) and the next
        filed value is tried; the steps add up to the lowest frequency.
        """
        if len(self._stored) < self.max_entries:
            return
        while len(self._stored) >= self.max_entries:
            steps = self._values[0] - self._offset
            if steps > 0:  # else entries a decay already took to 0 are still in the table: sweep first
                self._decay(steps)
                self.stats.early_decays += steps
            self._sweep(SWEEP_BATCH)  # entries at or below the offset are at 0 already: dropping more is free
        self._period_start = self._clock()

    # ---- API -----------------------------------------------------------------
    def observe(self, block_hash: Hashable) -> int:
        """Count one sighting of ``block_hash``; returns its new frequency (1, 2, 4, ...).

        Called for every block the scheduler computes or loads, so the decay check is written
        out here (one Python frame per sighting of a known block)."""
        now = self._clock()
        if now - self._period_start >= self.decay_period_s:
            self._catch_up_to(now)
        self.stats.observed += 1
        stored = self._stored.get(block_hash)
        if stored is None:
            if len(self._stored) >= self.max_entries:
                self._make_room()
            self._stored[block_hash] = self._offset + 1
            self._file(block_hash, self._offset + 1)
            return 1
        if stored <= self._offset:  # forgotten, not swept yet: still filed, at or below the offset
            self.stats.forgotten += 1
            self._stored[block_hash] = self._offset + 1
            return 1
        new = min((stored - self._offset) * 2, CAP)
        self._stored[block_hash] = self._offset + new  # it stays filed where it is
        return new

    def has_room(self, entries: int) -> bool:
        """True if ``entries`` new entries fit without an early decay: until then the order of
        sightings of different blocks cannot change any frequency (a caller may batch them)."""
        return len(self._stored) + entries < self.max_entries

    def observe_distinct(self, hashes: Sequence[Hashable]) -> list[int]:
        """:meth:`observe` each of ``hashes`` (no repeats), the new ones added in bulk; returns
        their new frequencies, in order (a hit's spills read them).

        A step stores hundreds of blocks, many seen for the first time: they are added with one
        ``dict.update`` and filed with one ``list.extend``."""
        if not self.has_room(len(hashes)):
            # an early decay may come between two of them: in order
            return [self.observe(block_hash) for block_hash in hashes]
        now = self._clock()
        if now - self._period_start >= self.decay_period_s:
            self._catch_up_to(now)
        self._sweep(SWEEP_BATCH)
        self.stats.observed += len(hashes)
        stored_of = self._stored
        offset = self._offset
        olds = list(map(stored_of.get, hashes))
        fresh_count = olds.count(None)
        if fresh_count == len(olds):  # all seen for the first time (a new prompt's blocks)
            fresh = list(hashes)
            self._add_fresh(fresh, offset)
            return [1] * len(fresh)
        # In comprehensions, not a loop of branches: a new entry and one a decay took to 0 start
        # at 1 (the latter is still filed, at or below the offset); a known one doubles. Every
        # entry's stored value is rewritten in one update; only the new ones are filed.
        freqs = [1 if old is None or old <= offset else min((old - offset) * 2, CAP) for old in olds]
        self.stats.forgotten += sum(1 for old in olds if old is not None and old <= offset)
        stored_of.update(zip(hashes, [offset + freq for freq in freqs]))
        if fresh_count:
            self._file_all([block_hash for block_hash, old in zip(hashes, olds) if old is None], offset + 1)
        return freqs

    def _add_fresh(self, fresh: list[Hashable], offset: int) -> None:
        """Add new entries (frequency 1) in bulk: one ``dict.update``, filed with one ``list.extend``."""
        self._stored.update(dict.fromkeys(fresh, offset + 1))
        self._file_all(fresh, offset + 1)

    def _file_all(self, hashes: list[Hashable], value: int) -> None:
        """:meth:`_file` each of ``hashes`` at ``value`` (the list may become the filing itself)."""
        filed = self._filed.get(value)
        if filed is None:
            self._filed[value] = hashes
            heapq.heappush(self._values, value)
        else:
            filed += hashes

    def frequency(self, block_hash: Hashable) -> int:
        """Current frequency (0 if unknown or forgotten)."""
        self._catch_up()
        return self._frequency_of(self._stored.get(block_hash))

    def _frequency_of(self, stored: int | None) -> int:
        """The frequency of a stored value (0: unknown, or a decay took it to 0 before its sweep)."""
        return 0 if stored is None or stored <= self._offset else stored - self._offset

    def frequencies(self, hashes: Sequence[Hashable]) -> list[int]:
        """:meth:`frequency` of each of ``hashes``, one decay check for them all (no stats counted:
        see :meth:`count_decisions`)."""
        self._catch_up()
        self._sweep(SWEEP_BATCH)
        offset = self._offset
        return [0 if stored is None or stored <= offset else stored - offset
                for stored in map(self._stored.get, hashes)]

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
        ok = self._frequency_of(self._stored.get(block_hash)) >= (self.threshold if threshold is None else threshold)
        if ok:
            self.stats.admitted += 1
        else:
            self.stats.rejections += 1
        return ok

    def __len__(self) -> int:
        """Entries with a frequency above 0 (sweeps what is left to sweep: not for the step)."""
        self._catch_up()
        self._sweep(None)
        return len(self._stored)

    def __contains__(self, block_hash: object) -> bool:
        self._catch_up()
        return self._frequency_of(self._stored.get(block_hash)) > 0  # type: ignore[call-overload]
