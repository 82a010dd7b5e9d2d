"""The disk offload filter: only blocks seen more than once go G2 -> G3.

Most blocks of a serving workload are seen once (a unique question, a
one-off document). Writing each of them to the SSD costs bandwidth and drive
endurance for nothing, so a block is offloaded to disk only once its
frequency reaches ``threshold`` (spec §4, same rule as the reference):

* first sighting -> 1; each later sighting doubles it (saturating at ``CAP``);
* every ``decay_period_s`` all frequencies drop by 1 and those at <= 0 are
  forgotten, so a block that stops being used stops counting;
* the table is bounded: when a new entry would exceed ``max_entries`` the
  filter decays early, as many steps as needed, and the period restarts
  (the reference's background task does the same when it is told the map is
  over size).

Decay is applied lazily on calls, from the clock: one pass over the table per
decay (catching up several missed periods in that one pass), nothing
O(table) otherwise. Pure Python; not thread-safe (the leader's scheduler
thread owns it).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

#: Frequencies saturate here (doubling must not grow unboundedly).
CAP = 1 << 30


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
        threshold: int = 2,
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
        self._freq: dict[Hashable, int] = {}
        self._period_start = clock()
        self.stats = FilterStats()

    # ---- decay ---------------------------------------------------------------
    def _decay(self, steps: int) -> None:
        """Apply ``steps`` decay steps at once: subtract and forget those at <= 0."""
        if steps <= 0:
            return
        before = len(self._freq)
        self._freq = {h: f - steps for h, f in self._freq.items() if f > steps}
        self.stats.decays += steps
        self.stats.forgotten += before - len(self._freq)

    def _catch_up(self) -> None:
        now = self._clock()
        elapsed = now - self._period_start
        if elapsed < self.decay_period_s:
            return
        periods = int(elapsed // self.decay_period_s)
        self._period_start += periods * self.decay_period_s
        self._decay(periods)

    def _make_room(self) -> None:
        """Decay early until a new entry fits (size < max_entries), then restart the period.

        Equivalent to repeating single decay steps until under the bound, but
        the number of steps is computed at once (the smallest k such that
        enough entries have frequency <= k), so it costs one pass even when
        hot entries would need many steps.
        """
        excess = len(self._freq) - self.max_entries + 1
        if excess <= 0:
            return
        steps = heapq.nsmallest(excess, self._freq.values())[-1]
        self._decay(steps)
        self.stats.early_decays += steps
        self._period_start = self._clock()

    # ---- API -----------------------------------------------------------------
    def observe(self, block_hash: Hashable) -> int:
        """Count one sighting of ``block_hash``; returns its new frequency (1, 2, 4, ...)."""
        self._catch_up()
        self.stats.observed += 1
        freq = self._freq.get(block_hash)
        if freq is None:
            self._make_room()
            new = 1
        else:
            new = min(freq * 2, CAP)
        self._freq[block_hash] = new
        return new

    def frequency(self, block_hash: Hashable) -> int:
        """Current frequency (0 if unknown or forgotten)."""
        self._catch_up()
        return self._freq.get(block_hash, 0)

    def should_offload(self, block_hash: Hashable) -> bool:
        """True if the block has been seen often enough to be worth a disk write."""
        self._catch_up()
        ok = self._freq.get(block_hash, 0) >= self.threshold
        if ok:
            self.stats.admitted += 1
        else:
            self.stats.rejections += 1
        return ok

    def __len__(self) -> int:
        self._catch_up()
        return len(self._freq)

    def __contains__(self, block_hash: object) -> bool:
        self._catch_up()
        return block_hash in self._freq
