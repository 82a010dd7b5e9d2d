"""G4's byte budget: how much of Redis this rank may fill, with stored bytes freed as their TTL runs out.

Best effort: Redis's ``maxmemory`` is the hard bound, and this count does not
see evictions or other writers. It keeps one server from taking the whole
shared store (``remote_budget_gb``, split between the ranks). Apart from
:mod:`kvbm.storage.remote` so that the store's I/O reads without the accounting.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque

from kvbm.config import env_var

logger = logging.getLogger(__name__)

__all__ = ["RemoteBudget"]


class RemoteBudget:
    """Bytes admitted against ``budget_bytes`` (None: no budget); ``ttl_secs`` frees them again.

    ``lock`` is the owning store's, so that its stats read ``used`` in the same snapshot as
    its counters.
    """

    def __init__(self, budget_bytes: int | None, ttl_secs: int | None, *, lock: threading.Lock) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_secs = ttl_secs
        self._lock = lock
        self.used = 0
        self._expiry: deque[tuple[float, int]] = deque()
        self._logged = False

    def admit(self, sizes: list[int]) -> int:
        """How many leading values fit in the budget (best effort; Redis's maxmemory is the hard bound)."""
        if self.budget_bytes is None:
            return len(sizes)
        with self._lock:
            now = time.monotonic()
            while self._expiry and self._expiry[0][0] <= now:
                self.used -= self._expiry.popleft()[1]
            room = self.budget_bytes - self.used
        n = 0
        for size in sizes:
            if size > room:
                break
            room -= size
            n += 1
        if n < len(sizes) and not self._logged:
            self._logged = True
            logger.warning("kvbm: G4 budget of %.3f GB (%s) is used up; further stores are skipped (counted)%s",
                           self.budget_bytes / 1e9, env_var("remote_budget_gb"),
                           " until written blocks expire" if self.ttl_secs else "")
        return n

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` that Redis acknowledged (until they expire, with a TTL)."""
        if self.budget_bytes is None or not nbytes:
            return
        with self._lock:
            self.used += nbytes
            if self.ttl_secs:  # an expired key no longer takes room in Redis
                self._expiry.append((time.monotonic() + self.ttl_secs, nbytes))
