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
from collections.abc import Sequence
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
        """Failures by kind since the last call (for metrics)."""
        ...

    def close(self) -> None: ...


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
    """

    def __init__(self, arena: DiskArena, *, durable: bool = False, delete_on_close: bool = False) -> None:
        self.arena = arena
        self.durable = durable
        self.delete_on_close = delete_on_close
        self._seen = dict.fromkeys(_DISK_ERRORS, 0)

    def read(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        return self.arena.read_blocks(list(zip(slots, hashes, rows)))

    def write(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        ok = self.arena.write_blocks(list(zip(slots, hashes, rows)))
        if self.durable and all(ok):
            self.arena.sync()  # durable before the leader journals it
        return ok

    def errors(self) -> dict[str, int]:
        now = self.arena.stats()
        out = {}
        for kind, counter in _DISK_ERRORS.items():
            value = int(now[counter])
            if value > self._seen[kind]:
                out[kind] = value - self._seen[kind]
            self._seen[kind] = value
        return out

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
        self._seen: dict[str, int] = {}
        self._rtt: dict[str, list[float]] = {}

    def read(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        return self.store.read_blocks(list(zip(hashes, rows)))

    def write(self, slots: Sequence[int], hashes: Sequence[BlockHash], rows: Sequence[Any]) -> list[bool]:
        return self.store.write_blocks(list(zip(hashes, rows)))

    def errors(self) -> dict[str, int]:
        stats = self.store.stats()
        now = {**stats["errors"], **stats["bad_values"]}
        out = {kind: n - self._seen.get(kind, 0) for kind, n in now.items() if n > self._seen.get(kind, 0)}
        self._seen = now
        return out

    def round_trips(self) -> dict[str, list[float]]:
        """Redis round trips by operation since the last call (see WorkerReport.round_trips)."""
        now = {op: [n for _, n in h["buckets"]] + [h["sum"]] for op, h in self.store.stats()["latency"].items()}
        out = {}
        for op, hist in now.items():
            before = self._rtt.get(op) or [0.0] * len(hist)
            if hist[-2] > before[-2]:  # the +Inf bucket: the count
                out[op] = [x - y for x, y in zip(hist, before)]
        self._rtt = now
        return out

    def close(self) -> None:
        self.store.close()
