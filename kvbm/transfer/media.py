"""Block media: tiers whose blocks move whole, one host row each, on an I/O thread.

G2 is host memory that the copy engines address directly. Every other tier
(a G3 file, a G4 store shared by servers, a test's dict) is a *block medium*:
the transfer executor hands it host rows to fill or to write, keyed by slot
and block hash, and runs it on a thread of its own so the engine step never
waits for it. A medium says per block whether it moved; a block that did not
is a miss, never served.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from kvbm.core.hashing import BlockHash
from kvbm.storage.disk import DiskArena

if TYPE_CHECKING:
    from kvbm.storage.remote import RemoteStore  # imports redis: only where G4 is configured

logger = logging.getLogger(__name__)

__all__ = ["BlockMedium", "DiskMedium", "RemoteMedium"]


class BlockMedium(Protocol):
    """One tier's blocks behind a read/write interface (called from one I/O thread)."""

    def read(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        """Fill ``rows`` (writable 1-D byte buffers, one block each); True per verified block.
        A False row's contents are unspecified: never use them."""
        ...

    def write(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        """Store ``rows`` under ``slots``/``hashes``; True per block stored (and durable
        where the tier persists)."""
        ...

    def errors(self) -> dict[str, int]:
        """Failures by kind since the last call (for metrics). Called on the step thread every
        step: it must cost O(1) and never wait for I/O (see :class:`_Counted`)."""
        ...

    def close(self) -> None: ...

    # Optional: ``jobs_at_once`` (int, default 1), how many of the executor's jobs may call
    # ``read``/``write`` at once, each from a thread of its own (see :class:`DiskMedium`).


class _Counted:
    """Per-call counters that cost the step thread nothing.

    The storage keeps cumulative counters under its own lock (a disk arena's I/O pool, a Redis
    client's round trips). Reading them every step would take that lock on vLLM's scheduler
    thread for nothing; instead the thread that did the I/O takes the differences right after
    it (so only steps with I/O pay, and off the step thread), and the step thread swaps out
    what gathered, under a lock held for a dict update."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, Any] = {}
        self._pending: dict[str, Any] = {}

    def gather(self, now: dict[str, Any], delta: Callable[[Any, Any], Any | None],
               add: Callable[[Any, Any], Any]) -> None:
        """Fold ``now`` (cumulative values by key) into what is pending since the last take."""
        with self._lock:
            for key, value in now.items():
                change = delta(value, self._seen.get(key))
                self._seen[key] = value
                if change is not None:
                    self._pending[key] = add(self._pending[key], change) if key in self._pending else change

    def take(self) -> dict[str, Any]:
        with self._lock:
            out, self._pending = self._pending, {}
        return out


def _int_delta(now: int, before: int | None) -> int | None:
    change = now - (before or 0)
    return change if change > 0 else None


def _hist_delta(now: list[float], before: list[float] | None) -> list[float] | None:
    before = before or [0.0] * len(now)
    return [x - y for x, y in zip(now, before)] if now[-2] > before[-2] else None  # [-2]: the count


#: DiskArena counters -> error kinds of kvbm_disk_errors (read = I/O error or short read,
#: checksum = header or payload CRC mismatch, mismatch = the slot holds another block,
#: write = a failed write).
_DISK_ERRORS = {"read": "read_failures", "checksum": "checksum_failures", "mismatch": "mismatches",
                "write": "write_failures"}


class DiskMedium:
    """G3: this rank's :class:`DiskArena` file.

    ``durable``: the tier persists across restarts, so a write batch is
    fdatasync'ed before it reports success (the leader journals it then).
    ``delete_on_close``: a per-process file goes when the server does.

    ``jobs_at_once``: how many of the executor's jobs call the arena at once. With the I/O
    threads, 2: the arena's threads then start the second call's reads as the first call's run
    out, instead of idling while the first call's last reads finish and its caller verifies,
    polls and submits the next job (a few percent of a 64-block call of 2 MiB blocks); its reads
    in flight stay at most its ``io_threads``. With native AIO (each call submits all its reads
    and waits in the kernel, not on the threads), 4: four calls' reads in flight keep the drive
    busy through each call's last completions and verification (64-block loads of 128 KiB blocks
    0.84-0.93 of raw reads with 2, 0.97-1.04 with 4; ``bench/disk.py --executor``).
    """

    def __init__(self, arena: DiskArena, *, durable: bool = False, delete_on_close: bool = False) -> None:
        self.arena = arena
        self.durable = durable
        self.delete_on_close = delete_on_close
        self.jobs_at_once = 4 if arena.native_aio else 2
        self._errors = _Counted()

    def read(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        ok = self.arena.read_blocks(list(zip(slots, hashes, rows)))
        self._count()
        return ok

    def write(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        ok = self.arena.write_blocks(list(zip(slots, hashes, rows)))
        if self.durable and all(ok):
            self.arena.sync()  # durable before the leader journals it
        self._count()
        return ok

    def _count(self) -> None:
        now = self.arena.stats()
        self._errors.gather({kind: int(now[counter]) for kind, counter in _DISK_ERRORS.items()}, _int_delta,
                            int.__add__)

    def errors(self) -> dict[str, int]:
        return self._errors.take()

    def close(self) -> None:
        path = self.arena.path
        self.arena.close()
        if self.delete_on_close:
            try:
                os.unlink(path)
            except OSError:
                pass


class RemoteMedium:
    """G4: this rank's :class:`RemoteStore` (Redis), shared by servers and keyed by block
    hash: slots are not used. A block another server evicted is a failed read (a miss)."""

    def __init__(self, store: RemoteStore) -> None:
        self.store = store
        self._errors = _Counted()
        self._rtt = _Counted()

    def read(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        ok = self.store.read_blocks(list(zip(hashes, rows)))
        self._count()
        return ok

    def write(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        ok = self.store.write_blocks(list(zip(hashes, rows)))
        self._count()
        return ok

    def _count(self) -> None:
        stats = self.store.stats()
        self._errors.gather({**stats["errors"], **stats["bad_values"]}, _int_delta, int.__add__)
        self._rtt.gather({op: [n for _, n in h["buckets"]] + [h["sum"]] for op, h in stats["latency"].items()},
                         _hist_delta, lambda a, b: [x + y for x, y in zip(a, b)])

    def errors(self) -> dict[str, int]:
        return self._errors.take()

    def round_trips(self) -> dict[str, list[float]]:
        """Redis round trips by operation since the last call (see WorkerReport.round_trips)."""
        return self._rtt.take()

    def close(self) -> None:
        self.store.close()
