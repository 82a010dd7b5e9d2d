"""Fault injection for the G3 data file (tests and the soak benchmark only, off by default).

A ``fault_hook(op, slot)`` passed to :class:`~kvbm.storage.disk.DiskArena` is
asked before each block's I/O (``op`` is ``"read"`` or ``"write"``) and may
answer ``"error"`` (the I/O fails as with EIO) or ``"corrupt"`` (one payload
byte is flipped on its way to or from the file, as bit rot would).
:class:`FaultInjector` draws these at random rates; servers get one from
``disk_fault_injection`` (see config). Apart from the arena so that its I/O
code reads without the test machinery.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Mapping

__all__ = ["FaultHook", "FaultInjector"]

FaultHook = Callable[[str, int], "str | None"]


class FaultInjector:
    """Test-only fault hook: fails or corrupts a random share of block I/O, or slows reads.

    ``rates`` maps ``read_error``, ``read_corrupt``, ``write_error`` and
    ``write_corrupt`` to probabilities per block; ``seed`` makes runs
    repeatable. ``injected`` counts what was injected, per kind.
    ``read_delay_ms`` (not a rate) sleeps that long per block read: a slow or
    busy disk, for the load-or-recompute benchmark (bench/fast_hits.py).
    """

    KINDS = ("read_error", "read_corrupt", "write_error", "write_corrupt")

    def __init__(self, rates: Mapping[str, float], seed: int = 0) -> None:
        rates = dict(rates)
        self.read_delay_s = float(rates.pop("read_delay_ms", 0.0)) / 1e3
        unknown = set(rates) - set(self.KINDS)
        if unknown:
            raise ValueError(f"FaultInjector: unknown kinds {sorted(unknown)}; known: {', '.join(self.KINDS)}")
        self.rates = {kind: float(rates.get(kind, 0.0)) for kind in self.KINDS}
        self.injected = dict.fromkeys(self.KINDS, 0)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def __call__(self, op: str, slot: int) -> str | None:
        if op == "read" and self.read_delay_s:
            time.sleep(self.read_delay_s)
        with self._lock:
            draw = self._rng.random()
            error, corrupt = self.rates[f"{op}_error"], self.rates[f"{op}_corrupt"]
            fault = "error" if draw < error else "corrupt" if draw < error + corrupt else None
            if fault is not None:
                self.injected[f"{op}_{fault}"] += 1
        return fault
