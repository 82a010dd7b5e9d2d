"""The leader's crash-safe index of the disk tier: which block hash is in which G3 slot.

With persistence on, a restarted server reads this journal to know what the
disk tier already holds instead of starting cold. The file is a header (magic,
format version, the caller's *identity* string, CRC-32) followed by
append-only records of 40 bytes, each framed by a sync marker and carrying its
own CRC-32:

* ``STORED(hash, slot)``: ``slot`` now holds ``hash`` (replacing whatever it held),
* ``EVICTED(slot)``: ``slot`` holds nothing.

Record, format version 2 (little-endian): ``KVJR`` (4), kind (u8), 3 zero
bytes, slot (u64), block hash (16 bytes), CRC-32 of those 32 bytes, 4 zero
bytes. Version 1 (64-bit hashes, no marker) is ignored with one log line and
replaced by an empty journal: its blocks become misses.

``load`` replays every record that verifies. A record that does not (a flipped
byte, a torn write) is skipped and replay resumes at the next sync marker that
starts a valid record, so damage costs only the damaged records' blocks; bytes
after the last valid record (a torn tail after a crash) are cut off, and a
journal with damage inside is rewritten clean. A crash can lose the newest
unflushed records but never yields a mapping that was not journaled. The index
is a hint, not the truth: the data file's own per-slot header (hash + CRC) is
what guarantees that a stale or lost entry is a miss, never wrong data.

The identity must change whenever old blocks must not match (model, dtype,
KV layout, block size, TP rank layout): a journal written under another
identity loads as empty and is started afresh.

Files: the journal is opened without following links and must be a regular
file owned by this user (a planted link or another user's journal is refused
with :class:`~kvbm.storage.files.DiskSetupError`); its replacement is written
to a fresh ``mkstemp`` file in the same directory and renamed over it.

One writer: :meth:`DiskJournal.load` takes an exclusive ``flock`` on
``<journal>.lock`` (a side file: the journal itself is replaced by renames,
which a lock on its inode would not survive) and holds it until
:meth:`~DiskJournal.close`. A second process on the same journal (another
server with the same directory, or data-parallel engines given one journal)
is refused with a message instead of silently interleaving two histories,
where the last writer's compaction erases the other's entries. Data-parallel
engines each get a journal of their own (:func:`~kvbm.storage.files.g3_journal_path`).

If writes keep failing (full disk), pending records are bounded: beyond
``max_pending`` the oldest are dropped (counted and logged). A dropped record
only makes its block a miss after a restart.

Not thread-safe: one owner (the leader's scheduler thread) calls it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import struct
import tempfile
import threading
import time
import zlib
from collections.abc import Sequence

import numpy as np

from kvbm.config import env_var
from kvbm.core.hashing import HASH_BYTES, BlockHash
from kvbm.storage.files import CACHE_DIR_VAR, DiskSetupError, open_private_file

logger = logging.getLogger(__name__)

MAGIC = b"KVBMJRN\x01"
FORMAT_VERSION = 2
_HEAD = struct.Struct("<8sHI")  # magic, version, identity length; then identity; then crc32
_CRC = struct.Struct("<I")
_SYNC = b"KVJR"
#: sync marker, kind, padding, slot, block hash; then crc32 of these 32 bytes, padding -> 40 bytes
_REC = struct.Struct(f"<4sB3xQ{HASH_BYTES}s")
_REC_SIZE = 40
_REC_PAD = b"\x00" * (_REC_SIZE - _REC.size - _CRC.size)
_STORED = 1
_EVICTED = 2
_NO_HASH = b"\x00" * HASH_BYTES
_U64 = 1 << 64
_MAX_IDENTITY = 1 << 20
#: Compact on flush when the file holds this many times more records than live entries.
_COMPACT_RATIO = 4
_COMPACT_MIN_RECORDS = 1 << 16
#: Records kept for retry while flushes fail (40 bytes each): 2.6 MB.
DEFAULT_MAX_PENDING = 1 << 16


#: From this many records on, numpy packs them (its ~100 us of fixed cost per call beats ~0.3 us per
#: record one by one only past ~1,000: a compaction's rewrite of the index, a backlog of flushes).
_VECTOR_MIN = 1024
#: Records packed per numpy pass (~0.3 ms); between passes the writer thread lets the step thread
#: run (``time.sleep(0)`` drops the GIL), so a compaction of a large index never holds it for long.
_VECTOR_CHUNK = 2048


def _crc_table() -> np.ndarray:
    """zlib's CRC-32 (reflected, polynomial 0xEDB88320) one byte at a time, as a lookup table."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(0xEDB88320), table >> 1).astype(np.uint32)
    return table


_CRC_TABLE = _crc_table()
_HEAD_BYTES = 8  # sync marker, kind, padding: the same for every record of a kind


def _record(kind: int, block_hash: BlockHash, slot: int) -> bytes:
    body = _REC.pack(_SYNC, kind, slot, block_hash)
    return body + _CRC.pack(zlib.crc32(body)) + _REC_PAD


def _records(kind: int, hashes: list[bytes], slots: list[int]) -> bytes:
    """``b"".join(_record(kind, h, s) for h, s in zip(hashes, slots))``, byte for byte, but packed
    and checksummed by numpy over all the records at once (columns, not records: 24 table lookups
    over arrays instead of a ``zlib.crc32`` call per record). Large inputs go in chunks with the
    GIL dropped between them. Callers have checked the hashes (bytes of ``HASH_BYTES``) and slots
    (ints in ``[0, 2**64)``)."""
    n = len(hashes)
    if n < _VECTOR_MIN:
        return b"".join(map(_record, [kind] * n, hashes, slots))
    head = _REC.pack(_SYNC, kind, 0, _NO_HASH)[:_HEAD_BYTES]
    seed = zlib.crc32(head) ^ 0xFFFFFFFF  # the CRC register after the constant first 8 bytes
    out = []
    for lo in range(0, n, _VECTOR_CHUNK):
        if lo:
            time.sleep(0)  # let the step thread take the GIL between chunks
        part = hashes[lo : lo + _VECTOR_CHUNK]
        m = len(part)
        buf = np.zeros((m, _REC_SIZE), dtype=np.uint8)
        buf[:, :_HEAD_BYTES] = np.frombuffer(head, dtype=np.uint8)
        buf[:, 8:16] = np.array(slots[lo : lo + _VECTOR_CHUNK], dtype="<u8").view(np.uint8).reshape(m, 8)
        buf[:, 16:32] = np.frombuffer(b"".join(part), dtype=np.uint8).reshape(m, HASH_BYTES)
        crc = np.full(m, seed, dtype=np.uint32)
        for col in range(_HEAD_BYTES, _REC.size):
            crc = _CRC_TABLE[(crc ^ buf[:, col]) & 0xFF] ^ (crc >> 8)
        crc ^= np.uint32(0xFFFFFFFF)
        buf[:, 32:36] = crc.astype("<u4").view(np.uint8).reshape(m, 4)
        out.append(buf.tobytes())
    return b"".join(out)


def _valid_entries(hashes: tuple, slots: tuple) -> bool:
    """Every hash is ``bytes`` of ``HASH_BYTES`` and every slot an ``int`` in ``[0, 2**64)`` (C-level
    passes; anything else goes record by record, which raises the precise error)."""
    return (
        set(map(type, hashes)) <= {bytes}
        and set(map(len, hashes)) <= {HASH_BYTES}
        and set(map(type, slots)) <= {int}
        and (not slots or (min(slots) >= 0 and max(slots) < _U64))
    )


def _parse_record(data: bytes, off: int) -> tuple[int, BlockHash, int] | None:
    """(kind, hash, slot) of a valid record at ``off``, else None."""
    if data[off : off + 4] != _SYNC or off + _REC_SIZE > len(data):
        return None
    (crc,) = _CRC.unpack_from(data, off + _REC.size)
    if crc != zlib.crc32(data[off : off + _REC.size]):
        return None
    _, kind, slot, block_hash = _REC.unpack_from(data, off)
    if kind not in (_STORED, _EVICTED):
        return None
    return kind, block_hash, slot


def _header(identity: bytes) -> bytes:
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, len(identity)) + identity
    return head + _CRC.pack(zlib.crc32(head))


def _write_all(fd: int, data: bytes) -> None:
    done = 0
    while done < len(data):
        done += os.write(fd, data[done:] if done else data)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DiskJournal:
    """Append-only, CRC-protected record of hash -> G3 slot for one disk tier."""

    def __init__(
        self, path: str, *, identity: str, auto_compact: bool = True, max_pending: int = DEFAULT_MAX_PENDING
    ) -> None:
        raw = identity.encode("utf-8")
        if len(raw) > _MAX_IDENTITY:
            raise ValueError(f"journal identity is {len(raw)} bytes; keep it under {_MAX_IDENTITY}")
        if max_pending < 1:
            raise ValueError(f"journal max_pending must be >= 1, got {max_pending}")
        self.path = os.path.abspath(path)
        self.identity = identity
        self._identity = raw
        self._auto_compact = auto_compact
        self._max_pending = max_pending
        self._fd = -1
        self._lock_fd = -1  # flock on <path>.lock while this journal is in use
        self._durable_size = 0  # bytes of the file known to be valid and flushed
        self._pending = bytearray()
        self._slot_of: dict[BlockHash, int] = {}
        self._hash_of: dict[int, BlockHash] = {}
        self._records = 0  # records in the file (for the compaction heuristic)
        self._loaded = False
        #: Records dropped unwritten because flushes kept failing (each: a future miss).
        self.dropped_records = 0
        self._dropped_logged = 0  # dropped_records when the last failure episode ended
        self._failing = False  # a flush failed and none has succeeded since (log once per episode)
        #: Damaged records skipped by the last load (each: its blocks are misses).
        self.damaged_records = 0

    # ---- state ---------------------------------------------------------------
    def _apply(self, kind: int, block_hash: BlockHash, slot: int) -> None:
        if kind == _STORED:
            old = self._hash_of.pop(slot, None)
            if old is not None and self._slot_of.get(old) == slot:
                del self._slot_of[old]
            prev_slot = self._slot_of.get(block_hash)
            if prev_slot is not None:
                self._hash_of.pop(prev_slot, None)
            self._slot_of[block_hash] = slot
            self._hash_of[slot] = block_hash
        elif kind == _EVICTED:
            old = self._hash_of.pop(slot, None)
            if old is not None and self._slot_of.get(old) == slot:
                del self._slot_of[old]

    def __len__(self) -> int:
        return len(self._slot_of)

    @property
    def num_records(self) -> int:
        return self._records

    @property
    def num_pending(self) -> int:
        """Records waiting for a successful flush."""
        return len(self._pending) // _REC_SIZE

    # ---- loading -------------------------------------------------------------
    def load(self) -> dict[BlockHash, int]:
        """Replay the journal: ``{block_hash: slot}`` of the last durable state.

        Returns ``{}`` (and starts a fresh journal) when the file is missing,
        unreadable, of another format, or written under another identity; the
        log says which. Damaged records are skipped, a torn tail is cut off.
        Afterwards the journal is open for appending. Raises
        :class:`DiskSetupError` (naming the setting) when the journal is a
        link, not a regular file, belongs to another user, or cannot be
        created (full or read-only directory).
        """
        self._close_fd()
        self._lock()
        self._slot_of.clear()
        self._hash_of.clear()
        self._pending.clear()
        self._records = 0
        self.damaged_records = 0
        self._loaded = True
        try:
            fd = open_private_file(self.path, os.O_RDONLY, "disk index")
        except FileNotFoundError:
            self._start_fresh(None)
            return {}
        except OSError as e:
            self._start_fresh(f"cannot read it ({e.strerror}); starting an empty disk index")
            return {}
        try:
            with os.fdopen(fd, "rb") as f:
                data = f.read()
        except OSError as e:
            self._start_fresh(f"cannot read it ({e.strerror}); starting an empty disk index")
            return {}
        reason, end, lost = self._parse(data)
        if reason is not None:
            self._start_fresh(reason)
            return {}
        if self.damaged_records:
            logger.warning(
                "kvbm: disk index %s: skipped %d damaged record(s) (%d bytes) and resumed after them; "
                "their blocks will be misses. %d entries recovered; rewriting the index clean.",
                self.path, self.damaged_records, lost, len(self._slot_of),
            )
            try:
                self._rewrite(self._live_records())
                self._records = len(self._slot_of)
            except OSError as e:  # no room to rewrite: append after the damage, which replay skips
                logger.warning("kvbm: disk index %s could not be rewritten (%s); appending after the damage",
                               self.path, e.strerror or e)
        if self._fd < 0:
            try:
                self._fd = open_private_file(self.path, os.O_WRONLY | os.O_APPEND, "disk index")
                if end < len(data) and not self.damaged_records:
                    logger.warning(
                        "kvbm: disk index %s: ignoring %d bytes after the last valid record at offset %d "
                        "(torn write from a crash, or corruption); %d entries recovered",
                        self.path, len(data) - end, end, len(self._slot_of),
                    )
                    os.ftruncate(self._fd, end)
                    os.fsync(self._fd)
                # Whatever follows the last valid record (after a failed rewrite) is skipped on replay.
                self._durable_size = os.fstat(self._fd).st_size
            except OSError as e:
                self._close_fd()
                self._start_fresh(f"cannot open it for appending ({e.strerror})")
                return {}
        logger.info("kvbm: disk index %s: %d blocks recovered", self.path, len(self._slot_of))
        return dict(self._slot_of)

    def _parse(self, data: bytes) -> tuple[str | None, int, int]:
        """Replay ``data`` into the state: (reason it is unusable or None,
        end of the last valid record, bytes skipped inside as damaged)."""
        if len(data) < _HEAD.size + _CRC.size:
            return "it is too short to hold a header", 0, 0
        magic, version, id_len = _HEAD.unpack_from(data, 0)
        if magic != MAGIC:
            return "it is not a kvbm disk index", 0, 0
        if version != FORMAT_VERSION:
            return (f"it has format version {version}, this kvbm reads {FORMAT_VERSION}; the blocks it "
                    f"lists will be misses"), 0, 0
        head_end = _HEAD.size + id_len
        if id_len > _MAX_IDENTITY or len(data) < head_end + _CRC.size:
            return "its header is truncated", 0, 0
        (crc,) = _CRC.unpack_from(data, head_end)
        if crc != zlib.crc32(data[:head_end]):
            return "its header checksum does not match", 0, 0
        identity = data[_HEAD.size : head_end]
        if identity != self._identity:
            return (
                f"it was written for another model/layout (identity {identity.decode('utf-8', 'replace')!r}, "
                f"now {self.identity!r}); old disk blocks will not be reused",
                0, 0,
            )
        off = end = head_end + _CRC.size
        lost = 0
        while off + _REC_SIZE <= len(data):
            record = _parse_record(data, off)
            if record is None:
                # Damaged (or the torn tail): resume at the next marker that starts a valid record.
                off = data.find(_SYNC, off + 1)
                if off < 0:
                    break
                continue
            if off != end:  # valid again after a damaged stretch
                self.damaged_records += max(1, round((off - end) / _REC_SIZE))
                lost += off - end
            kind, block_hash, slot = record
            self._apply(kind, block_hash, slot)
            self._records += 1
            off = end = off + _REC_SIZE
        return None, end, lost

    def _live_records(self) -> bytes:
        return _records(_STORED, list(self._slot_of), list(self._slot_of.values()))

    def _start_fresh(self, reason: str | None) -> None:
        """Replace the file with an empty journal under our identity."""
        if reason is not None:
            logger.warning("kvbm: disk index %s not used: %s", self.path, reason)
        self._slot_of.clear()
        self._hash_of.clear()
        self._records = 0
        self._rewrite_or_fail(b"")

    def _rewrite_or_fail(self, records: bytes) -> None:
        """:meth:`_rewrite` at start-up: an OSError becomes a message naming the setting."""
        try:
            self._rewrite(records)
        except OSError as e:
            raise DiskSetupError(
                f"cannot write the disk index {self.path}: {e.strerror} (errno {e.errno}). Free space "
                f"there or set {CACHE_DIR_VAR} to a writable directory with room (or turn "
                f"{env_var('disk_persist')} off: the index is only needed to reuse the disk after a restart)"
            ) from e

    def _rewrite(self, records: bytes) -> None:
        """Atomically replace the file: fresh temp file, fsync, rename, fsync the directory."""
        self._close_fd()
        directory, name = os.path.split(self.path)
        content = _header(self._identity) + records
        # mkstemp: O_EXCL | O_NOFOLLOW, mode 0600, an unpredictable name: never someone else's file.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
        try:
            _write_all(fd, content)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.replace(tmp, self.path)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        _fsync_dir(self.path)
        self._fd = open_private_file(self.path, os.O_WRONLY | os.O_APPEND, "disk index")
        self._durable_size = len(content)

    # ---- recording -----------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def _append(self, kind: int, block_hash: BlockHash, slot: int) -> None:
        if not isinstance(block_hash, bytes) or len(block_hash) != HASH_BYTES:
            raise ValueError(f"journal entry hash {block_hash!r} is not {HASH_BYTES} bytes")
        if not 0 <= slot < _U64:
            raise ValueError(f"journal slot {slot} is not an unsigned 64-bit int")
        self._pending += _record(kind, block_hash, slot)
        self._apply(kind, block_hash, slot)

    def _bound_pending(self) -> None:
        """Drop the oldest pending records beyond ``max_pending`` (flushes keep failing).

        Safe: a lost STORED only hides a block (a miss after a restart); a lost
        EVICTED leaves a stale entry that the data file's header check turns
        into a miss. The in-memory state stays exact, so a later compaction
        writes the truth again.
        """
        excess = self.num_pending - self._max_pending
        if excess <= 0:
            return
        del self._pending[: excess * _REC_SIZE]
        first_drop = self.dropped_records == self._dropped_logged
        self.dropped_records += excess
        if first_drop:
            logger.warning(
                "kvbm: disk index %s cannot be written and %d records are pending; dropping the oldest "
                "(those blocks will be misses after a restart, nothing worse). Dropped so far: %d.",
                self.path, self._max_pending, self.dropped_records,
            )

    def record_stored(self, entries: list[tuple[BlockHash, int]]) -> None:
        """``(block_hash, slot)``: the slot now holds that block. Durable after :meth:`flush`.

        Journal a block only once its data is durable in the data file
        (worker-side ``DiskArena.sync``); otherwise a crash leaves an entry
        whose read fails verification, which costs a miss, not correctness.
        """
        self._ensure_loaded()
        for block_hash, slot in entries:
            self._append(_STORED, block_hash, slot)
        self._bound_pending()

    def record_stored_columns(self, hashes: Sequence[BlockHash], slots: Sequence[int]) -> None:
        """:meth:`record_stored` of ``zip(hashes, slots)``: the leader's commits, as two lists (no
        tuple per entry for the GC), packed in bulk (see :func:`_records`)."""
        self._ensure_loaded()
        if not hashes:
            return
        if len(hashes) != len(slots):
            raise ValueError(f"journal: {len(hashes)} hashes for {len(slots)} slots")
        if not _valid_entries(hashes, slots):
            for block_hash, slot in zip(hashes, slots):  # raises at the first bad entry, as one by one did
                self._append(_STORED, block_hash, slot)
            self._bound_pending()
            return
        self._pending += _records(_STORED, hashes, slots)
        # The in-memory state, in order (a batch may move a hash or reuse a slot twice).
        slot_of, hash_of = self._slot_of, self._hash_of
        for block_hash, slot in zip(hashes, slots):
            old = hash_of.pop(slot, None)
            if old is not None and slot_of.get(old) == slot:
                del slot_of[old]
            prev_slot = slot_of.get(block_hash)
            if prev_slot is not None:
                hash_of.pop(prev_slot, None)
            slot_of[block_hash] = slot
            hash_of[slot] = block_hash
        self._bound_pending()

    def record_evicted(self, slots: list[int]) -> None:
        """These slots no longer hold anything. Durable after :meth:`flush`."""
        self._ensure_loaded()
        for slot in slots:
            self._append(_EVICTED, _NO_HASH, slot)
        self._bound_pending()

    def flush(self) -> bool:
        """Append pending records and fdatasync. False (logged) if the write failed.

        On failure the file is cut back to its last durable size and the
        records stay pending (at most ``max_pending``), so a later flush
        retries them and no partial record can hide later ones.
        """
        self._ensure_loaded()
        if not self._pending:
            return True
        try:
            if self._fd < 0:
                raise OSError(0, "journal file is not open")
            _write_all(self._fd, bytes(self._pending))
            os.fdatasync(self._fd)
        except OSError as e:
            if not self._failing:
                self._failing = True
                logger.warning(
                    "kvbm: cannot write disk index %s (%s); records are kept for retry (at most %d) and "
                    "this is logged again only once writes work. A restart would reuse fewer disk "
                    "blocks, nothing worse.", self.path, e.strerror or e, self._max_pending,
                )
            try:
                if self._fd >= 0:
                    os.ftruncate(self._fd, self._durable_size)
            except OSError:
                pass
            return False
        self._records += self.num_pending
        self._durable_size += len(self._pending)
        self._pending.clear()
        if self._failing:
            self._failing = False
            logger.warning("kvbm: disk index %s is writable again; %d record(s) were dropped meanwhile",
                           self.path, self.dropped_records - self._dropped_logged)
            self._dropped_logged = self.dropped_records
        if self._auto_compact and self._records >= max(
            _COMPACT_MIN_RECORDS, _COMPACT_RATIO * len(self._slot_of)
        ):
            try:
                self.compact()
            except (OSError, DiskSetupError) as e:
                logger.warning("kvbm: compacting disk index %s failed: %s", self.path, e)
        return True

    def compact(self) -> None:
        """Rewrite the file with only the live entries (includes pending records).

        Atomic: a crash leaves either the old or the new file, both valid.
        """
        self._ensure_loaded()
        before = self._records
        self._rewrite(self._live_records())
        self._pending.clear()
        self._records = len(self._slot_of)
        logger.info(
            "kvbm: disk index %s compacted: %d records -> %d", self.path, before, self._records,
        )

    def snapshot(self) -> dict[BlockHash, int]:
        """Current in-memory state (including records not yet flushed)."""
        return dict(self._slot_of)

    # ---- locking -------------------------------------------------------------
    def _lock(self) -> None:
        """Hold ``<path>.lock`` exclusively, or refuse: one process writes a journal."""
        if self._lock_fd >= 0:
            return
        lock_path = self.path + ".lock"
        try:
            fd = open_private_file(lock_path, os.O_RDWR | os.O_CREAT, "disk index lock")
        except OSError as e:
            raise DiskSetupError(
                f"cannot create the lock of the disk index {self.path}: {e.strerror} (errno {e.errno}). Set "
                f"{CACHE_DIR_VAR} to a writable directory with room (or turn {env_var('disk_persist')} off: "
                f"the index is only needed to reuse the disk after a restart)"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise DiskSetupError(
                f"disk index {self.path} is in use by another process (another kvbm server with the same "
                f"{CACHE_DIR_VAR} and model?); give each server its own {CACHE_DIR_VAR}"
            ) from None
        self._lock_fd = fd

    # ---- closing -------------------------------------------------------------
    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Flush pending records, close the file and release the lock (idempotent)."""
        if self._loaded and self._pending and self._fd >= 0:
            self.flush()
        self._close_fd()
        self._release()

    def _release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # drops the flock
            self._lock_fd = -1

    def __del__(self) -> None:
        # An abandoned journal (no close) behaves like a crashed process: nothing flushed, lock gone.
        try:
            self._close_fd()
            self._release()
        except (AttributeError, OSError):
            pass

    def __enter__(self) -> DiskJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class JournalWriter:
    """Writes a :class:`DiskJournal` on a thread of its own.

    The leader commits G3 blocks on vLLM's scheduler thread, every step; a journal flush is an
    ``fdatasync`` and now and then a whole-index compaction (fsync and rename). Here the step
    only appends the commits to a list; this thread writes whatever has gathered since its last
    flush (several steps' commits per ``fdatasync`` when the disk is slow), the pattern the G4
    lookups use. A crash loses at most the commits not yet flushed: misses after the restart,
    never wrong blocks (a journal entry is only a hint; the slot header is checked on read).
    """

    def __init__(self, journal: DiskJournal) -> None:
        self.journal = journal
        self._hashes: list[BlockHash] = []  # queued commits, as two lists (no tuple per block)
        self._slots: list[int] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="kvbm-journal", daemon=True)
        self._thread.start()

    def submit(self, hashes: list[BlockHash], slots: list[int]) -> None:
        """Journal these commits (block ``hashes[i]`` in ``slots[i]``) soon; returns at once."""
        if not hashes:
            return
        with self._lock:
            self._hashes += hashes
            self._slots += slots
            self._idle.clear()
        self._wake.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until everything submitted so far is flushed (tests, shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                hashes, slots, self._hashes, self._slots = self._hashes, self._slots, [], []
            if hashes:
                try:
                    self.journal.record_stored_columns(hashes, slots)
                    self.journal.flush()
                except Exception:  # never let the writer die: a lost record is a miss after a restart
                    logger.exception("kvbm: writing the disk index %s failed", self.journal.path)
            with self._lock:
                if not self._hashes:
                    self._idle.set()
                    if self._closed:
                        return
                else:
                    self._wake.set()

    def close(self, timeout: float = 30.0) -> None:
        """Write what is queued, stop the thread, close the journal (idempotent)."""
        with self._lock:
            self._closed = True
        self._wake.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("kvbm: the disk index writer did not finish within %.0f s; closing anyway", timeout)
        else:
            self.journal.close()
