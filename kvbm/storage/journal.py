"""The leader's crash-safe index of the disk tier: which block hash is in which G3 slot.

With persistence on, a restarted server reads this journal to know what the
disk tier already holds instead of starting cold. The file is a header (magic,
format version, the caller's *identity* string) followed by append-only
fixed-size records, each with its own CRC-32:

* ``STORED(hash, slot)``: ``slot`` now holds ``hash`` (replacing whatever it held),
* ``EVICTED(slot)``: ``slot`` holds nothing.

``load`` replays records up to the first one that does not verify (a torn
tail after a crash, or garbage) and drops the rest, so a crash can lose the
newest unflushed records but never yields a mapping that was not journaled.
The index is a hint, not the truth: the data file's own per-slot header
(hash + CRC) is what guarantees a stale entry is a miss, never wrong data.

The identity must change whenever old blocks must not match (model, dtype,
KV layout, block size, TP rank layout): a journal written under another
identity loads as empty and is started afresh.

Not thread-safe: one owner (the leader's scheduler thread) calls it.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib

logger = logging.getLogger(__name__)

MAGIC = b"KVBMJRN\x01"
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sHI")  # magic, version, identity length; then identity; then crc32
_CRC = struct.Struct("<I")
#: kind, padding, block hash, slot, crc32 of the preceding 24 bytes, padding -> 32 bytes
_REC = struct.Struct("<B7xQQ")
_REC_SIZE = 32
_STORED = 1
_EVICTED = 2
_U64 = 1 << 64
_MAX_IDENTITY = 1 << 20
#: Compact on flush when the file holds this many times more records than live entries.
_COMPACT_RATIO = 4
_COMPACT_MIN_RECORDS = 1 << 16


def _record(kind: int, block_hash: int, slot: int) -> bytes:
    body = _REC.pack(kind, block_hash, slot)
    return body + _CRC.pack(zlib.crc32(body)) + b"\x00" * (_REC_SIZE - _REC.size - _CRC.size)


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

    def __init__(self, path: str, *, identity: str, auto_compact: bool = True) -> None:
        raw = identity.encode("utf-8")
        if len(raw) > _MAX_IDENTITY:
            raise ValueError(f"journal identity is {len(raw)} bytes; keep it under {_MAX_IDENTITY}")
        self.path = os.path.abspath(path)
        self.identity = identity
        self._identity = raw
        self._auto_compact = auto_compact
        self._fd = -1
        self._durable_size = 0  # bytes of the file known to be valid and flushed
        self._pending = bytearray()
        self._slot_of: dict[int, int] = {}
        self._hash_of: dict[int, int] = {}
        self._records = 0  # records in the file (for the compaction heuristic)
        self._loaded = False

    # ---- state ---------------------------------------------------------------
    def _apply(self, kind: int, block_hash: int, slot: int) -> None:
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

    # ---- loading -------------------------------------------------------------
    def load(self) -> dict[int, int]:
        """Replay the journal: ``{block_hash: slot}`` of the last durable state.

        Returns ``{}`` (and starts a fresh journal) when the file is missing,
        unreadable, of another format, or written under another identity; the
        log says which. A torn or corrupt tail is cut off. Afterwards the
        journal is open for appending.
        """
        self._close_fd()
        self._slot_of.clear()
        self._hash_of.clear()
        self._pending.clear()
        self._records = 0
        self._loaded = True
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            self._start_fresh(None)
            return {}
        except OSError as e:
            self._start_fresh(f"cannot read it ({e.strerror}); starting an empty disk index")
            return {}
        reason, end = self._parse(data)
        if reason is not None:
            self._start_fresh(reason)
            return {}
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if end < len(data):
                logger.warning(
                    "kvbm: disk index %s: ignoring %d bytes after the last valid record at offset %d "
                    "(torn write from a crash, or corruption); %d entries recovered",
                    self.path, len(data) - end, end, len(self._slot_of),
                )
                os.ftruncate(self._fd, end)
                os.fsync(self._fd)
        except OSError as e:
            self._close_fd()
            self._start_fresh(f"cannot open it for appending ({e.strerror})")
            return {}
        self._durable_size = end
        logger.info("kvbm: disk index %s: %d blocks recovered", self.path, len(self._slot_of))
        return dict(self._slot_of)

    def _parse(self, data: bytes) -> tuple[str | None, int]:
        """Replay ``data`` into the state; (reason it is unusable or None, valid end offset)."""
        if len(data) < _HEAD.size + _CRC.size:
            return "it is too short to hold a header", 0
        magic, version, id_len = _HEAD.unpack_from(data, 0)
        if magic != MAGIC:
            return "it is not a kvbm disk index", 0
        if version != FORMAT_VERSION:
            return f"it has format version {version}, this kvbm reads {FORMAT_VERSION}", 0
        head_end = _HEAD.size + id_len
        if id_len > _MAX_IDENTITY or len(data) < head_end + _CRC.size:
            return "its header is truncated", 0
        (crc,) = _CRC.unpack_from(data, head_end)
        if crc != zlib.crc32(data[:head_end]):
            return "its header checksum does not match", 0
        identity = data[_HEAD.size : head_end]
        if identity != self._identity:
            return (
                f"it was written for another model/layout (identity {identity.decode('utf-8', 'replace')!r}, "
                f"now {self.identity!r}); old disk blocks will not be reused",
                0,
            )
        off = head_end + _CRC.size
        while off + _REC_SIZE <= len(data):
            body = data[off : off + _REC.size]
            (crc,) = _CRC.unpack_from(data, off + _REC.size)
            if crc != zlib.crc32(body):
                break
            kind, block_hash, slot = _REC.unpack(body)
            if kind not in (_STORED, _EVICTED):
                break
            self._apply(kind, block_hash, slot)
            self._records += 1
            off += _REC_SIZE
        return None, off

    def _start_fresh(self, reason: str | None) -> None:
        """Replace the file with an empty journal under our identity."""
        if reason is not None:
            logger.warning("kvbm: disk index %s not used: %s", self.path, reason)
        self._slot_of.clear()
        self._hash_of.clear()
        self._records = 0
        self._rewrite(b"")

    def _rewrite(self, records: bytes) -> None:
        """Atomically replace the file: temp file, fsync, rename, fsync the directory."""
        self._close_fd()
        directory = os.path.dirname(self.path)
        os.makedirs(directory, exist_ok=True)
        tmp = f"{self.path}.tmp.{os.getpid()}"
        content = _header(self._identity) + records
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            _write_all(fd, content)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        os.close(fd)
        os.replace(tmp, self.path)
        _fsync_dir(self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._durable_size = len(content)

    # ---- recording -----------------------------------------------------------
    def _ensure_loaded(self) -> None:
        if not self._loaded:
            self.load()

    def record_stored(self, entries: list[tuple[int, int]]) -> None:
        """``(block_hash, slot)``: the slot now holds that block. Durable after :meth:`flush`.

        Journal a block only once its data is durable in the data file
        (worker-side ``DiskArena.sync``); otherwise a crash leaves an entry
        whose read fails verification, which costs a miss, not correctness.
        """
        self._ensure_loaded()
        for block_hash, slot in entries:
            if not 0 <= block_hash < _U64 or not 0 <= slot < _U64:
                raise ValueError(f"journal entry ({block_hash}, {slot}): hash and slot must be u64")
            self._pending += _record(_STORED, block_hash, slot)
            self._apply(_STORED, block_hash, slot)

    def record_evicted(self, slots: list[int]) -> None:
        """These slots no longer hold anything. Durable after :meth:`flush`."""
        self._ensure_loaded()
        for slot in slots:
            if not 0 <= slot < _U64:
                raise ValueError(f"journal slot {slot} is not an unsigned 64-bit int")
            self._pending += _record(_EVICTED, 0, slot)
            self._apply(_EVICTED, 0, slot)

    def flush(self) -> bool:
        """Append pending records and fdatasync. False (logged) if the write failed.

        On failure the file is cut back to its last durable size and the
        records stay pending, so a later flush retries them and no partial
        record can hide later ones.
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
            logger.warning(
                "kvbm: cannot write disk index %s (%s); %d records kept for retry. A restart "
                "would reuse fewer disk blocks, nothing worse.",
                self.path, e.strerror or e, len(self._pending) // _REC_SIZE,
            )
            try:
                if self._fd >= 0:
                    os.ftruncate(self._fd, self._durable_size)
            except OSError:
                pass
            return False
        self._records += len(self._pending) // _REC_SIZE
        self._durable_size += len(self._pending)
        self._pending.clear()
        if self._auto_compact and self._records >= max(
            _COMPACT_MIN_RECORDS, _COMPACT_RATIO * len(self._slot_of)
        ):
            try:
                self.compact()
            except OSError as e:
                logger.warning("kvbm: compacting disk index %s failed: %s", self.path, e)
        return True

    def compact(self) -> None:
        """Rewrite the file with only the live entries (includes pending records).

        Atomic: a crash leaves either the old or the new file, both valid.
        """
        self._ensure_loaded()
        records = b"".join(_record(_STORED, h, s) for h, s in self._slot_of.items())
        before = self._records
        self._rewrite(records)
        self._pending.clear()
        self._records = len(self._slot_of)
        logger.info(
            "kvbm: disk index %s compacted: %d records -> %d", self.path, before, self._records,
        )

    def snapshot(self) -> dict[int, int]:
        """Current in-memory state (including records not yet flushed)."""
        return dict(self._slot_of)

    # ---- closing -------------------------------------------------------------
    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        """Flush pending records and close the file."""
        if self._loaded and self._pending:
            self.flush()
        self._close_fd()

    def __enter__(self) -> DiskJournal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
