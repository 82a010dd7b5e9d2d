"""The G3 data file of one worker rank: fixed-size slots on local disk.

One preallocated file holds ``num_slots`` slots. A slot is a 64-byte header
followed by one block's payload (at offset 64, or 4096 when the block is a
whole number of pages), padded to 4096 bytes so that every slot can be read and
written with one O_DIRECT call. The header names the block it holds (128-bit
hash, slot index, length) and carries a CRC-32 of the payload and of itself, so
a read that does not verify (torn write after a crash, stale slot, bit rot,
truncated file, a leader index that is out of date, a slot written by an older
kvbm format) is reported as a miss and never served: the reference system once
served another request's KV after a failed disk transfer, and we must not.
The header's format is :mod:`kvbm.storage.slot_header`.

Loads of page-aligned rows (pool and G2 rows) with O_DIRECT go through Linux
native AIO (:mod:`kvbm.storage.aio`): the whole load submitted in one call,
each block verified by the calling thread as its read completes, no I/O
thread and no GIL round trip per block. Everything else (writes, other
memory, buffered I/O, a kernel that refuses ``io_setup``) goes through a
small thread pool (``os.pwritev``/``os.preadv`` and the CRC release the
GIL); there too a load's blocks are verified by the thread that asked for
them as their reads land, so that the pool's threads only read (see
:meth:`DiskArena.read_blocks`); a load's blocks in consecutive slots (a
prefix stored in one batch) are read, and a stored batch's (the pool hands it
consecutive slots) written, with one call per run (:meth:`DiskArena._runs`).
Page-aligned host memory (pinned G2 rows) of page-multiple blocks moves
directly between memory and file; anything else is staged through a
per-thread page-aligned buffer, because O_DIRECT needs
aligned memory. CRC-32 was chosen over faster numpy sums after measuring:
a multiply-accumulate over 64-bit words runs at ~10 GB/s but misses pairs
of flipped high bits. The CRC is ISA-L's (:mod:`kvbm.storage.checksum`: zlib's
values at ~40 GB/s per core instead of ~3.5), so verifying a load no longer
costs as much CPU as reading it.

I/O errors never raise out of :meth:`DiskArena.write_blocks` /
:meth:`DiskArena.read_blocks`: they return per-block ``False`` (a dropped
store, a miss to recompute) and are counted and logged once per kind. Set-up
errors raise :class:`DiskSetupError` with a message that names the setting or
path to change (set-up: :mod:`kvbm.storage.disk_file`). The directory must be
private and files are opened without following links; G3 files left by crashed
servers are reclaimed at start-up (see :mod:`kvbm.storage.files`).

Fault injection (tests and the soak benchmark only, off by default): a
``fault_hook(op, slot)`` passed to the constructor (see
:mod:`kvbm.storage.disk_faults`, :class:`FaultInjector`) may fail or corrupt
a block's I/O.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kvbm.core.hashing import HASH_BYTES, BlockHash
from kvbm.storage.aio import IOVEC, AioContext
from kvbm.storage.buffers import as_u8 as _as_u8
from kvbm.storage.checksum import crc32
from kvbm.storage.disk_faults import FaultHook, FaultInjector
from kvbm.storage.disk_file import ALIGN, gb, open_data_file, round_up
from kvbm.storage.files import DiskSetupError, ensure_private_dir, g3_data_path
from kvbm.storage.slot_header import (
    FORMAT_VERSION,
    HEADER_SIZE,
    header_version,
    matching_payload_crc,
    pack_header,
    unpack_header,
)

logger = logging.getLogger(__name__)

__all__ = ["ALIGN", "HEADER_SIZE", "DiskArena", "DiskSetupError", "FaultInjector", "round_up"]


_U8 = np.dtype(np.uint8)
#: the longest coalesced read or write (:meth:`DiskArena._runs`): long enough that per-block Python stops
#: mattering at 128 KiB blocks, short enough that a 64-block load still spreads over the I/O threads
_MAX_RUN_BYTES = 4 << 20
#: and at most this many slots (two iovecs each; Linux takes 1,024 per call)
_MAX_RUN_SLOTS = 256
#: reads one native-AIO context keeps in flight (a 256-block load is submitted in waves)
_AIO_DEPTH = 128


def _aligned_buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """Anonymous mmap: page-aligned, zero-filled, as O_DIRECT needs."""
    mm = mmap.mmap(-1, nbytes)
    return mm, np.frombuffer(mm, dtype=np.uint8)


class DiskArena:
    """``num_slots`` fixed-size slots in one file; blocks in, verified blocks out.

    Thread safety: ``write_blocks``/``read_blocks`` may be called from several
    threads at once, provided no slot is written while it is read or written by
    another call (the leader's pool already guarantees that: a slot being
    written is PENDING, a slot being read is pinned).
    """

    def __init__(
        self,
        directory: str,
        num_slots: int,
        block_bytes: int,
        *,
        file_tag: str,
        zerofill_fallback: bool = False,
        disable_o_direct: bool = False,
        io_threads: int = 4,
        fallocate: Callable[[int, int, int], Any] = os.posix_fallocate,
        fault_hook: FaultHook | None = None,
        native_aio: bool = True,
    ) -> None:
        if num_slots <= 0:
            raise ValueError(f"DiskArena: num_slots must be > 0, got {num_slots}")
        if block_bytes <= 0:
            raise ValueError(f"DiskArena: block_bytes must be > 0, got {block_bytes}")
        if io_threads <= 0:
            raise ValueError(f"DiskArena: io_threads must be > 0, got {io_threads}")
        if not file_tag or "/" in file_tag or "\x00" in file_tag or file_tag in (".", ".."):
            raise ValueError(f"DiskArena: file_tag {file_tag!r} must be a plain file-name fragment")
        start = time.monotonic()
        self.directory = os.path.abspath(directory)
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        # Payload right after the 64-byte header, or, when the block is a whole
        # number of pages, on the next page: same slot size (the header needs
        # a page of its own either way) and the payload can then move straight
        # between the caller's page-aligned memory (pinned host rows) and the
        # file, with no staging copy.
        self._payload_off = ALIGN if block_bytes % ALIGN == 0 else HEADER_SIZE
        self._slot_size = round_up(self._payload_off + block_bytes)
        self._path = g3_data_path(self.directory, file_tag)
        self._io_threads = io_threads
        # Reads and writes of consecutive slots share one preadv/pwritev (see :meth:`_runs`) when
        # slots abut with no padding (page-multiple blocks: header page, payload, next header page, ...).
        self._run_slots = (max(1, min(_MAX_RUN_SLOTS, _MAX_RUN_BYTES // self._slot_size))
                           if self._slot_size == self._payload_off + block_bytes and fault_hook is None else 1)
        self._fd = -1
        self._closed = False
        self._lock = threading.Lock()
        self._logged: set[tuple[str, str]] = set()
        self._local = threading.local()
        self._fault_hook = fault_hook
        if fault_hook is not None:
            logger.warning("kvbm: disk cache %s: FAULT INJECTION ON (testing only): some block reads and "
                           "writes will fail or be corrupted on purpose", self._path)

        # counters (updated under self._lock by the calling thread)
        self.read_failures = 0  # OSError or short read (truncated file)
        self.checksum_failures = 0  # header or payload CRC mismatch: corruption or torn write
        self.mismatches = 0  # the slot holds another block (or none): stale index
        self.write_failures = 0
        self.blocks_written = 0
        self.blocks_read = 0
        self.bytes_written = 0
        self.bytes_read = 0
        self.write_seconds = 0.0
        self.read_seconds = 0.0

        self.directory = ensure_private_dir(self.directory)
        total = num_slots * self._slot_size
        self._fd, self._o_direct = open_data_file(
            self.directory, self._path, total,
            disable_o_direct=disable_o_direct, fallocate=fallocate, zerofill_fallback=zerofill_fallback,
        )
        self._pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="kvbm-g3-io")
        # Loads of page-aligned rows go through native AIO where it works (kvbm.storage.aio): one
        # context per concurrent caller, taken from and given back to this free list.
        self._aio_free: queue.SimpleQueue[tuple[AioContext, mmap.mmap]] = queue.SimpleQueue()
        self._aio_all: list[AioContext] = []
        self._aio = False
        reads = f"{io_threads} I/O threads"
        if native_aio and self._o_direct and self._payload_off == ALIGN and fault_hook is None:
            ctx, why = AioContext.open(_AIO_DEPTH)
            if ctx is None:
                reads += f" (native AIO: {why})"
            else:
                self._aio = True
                self._aio_all.append(ctx)
                self._aio_free.put((ctx, mmap.mmap(-1, ALIGN * 64)))
                reads = "native AIO"
        logger.info(
            "kvbm: disk cache (G3) ready: %s, %d slots x %d B (block %d B) = %s, %s, loads through %s, in %.2f s",
            self._path, num_slots, self._slot_size, block_bytes, gb(total),
            "O_DIRECT" if self._o_direct else "buffered I/O", reads, time.monotonic() - start,
        )

    # ---- properties ------------------------------------------------------
    @property
    def path(self) -> str:
        return self._path

    @property
    def slot_size(self) -> int:
        """Bytes per slot on disk: header + payload rounded up to 4096."""
        return self._slot_size

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in a slot: 64, or 4096 for page-multiple blocks."""
        return self._payload_off

    @property
    def o_direct(self) -> bool:
        """True if I/O bypasses the page cache (O_DIRECT)."""
        return self._o_direct

    @property
    def native_aio(self) -> bool:
        """True if loads of page-aligned rows go through native AIO (:mod:`kvbm.storage.aio`),
        False if through the I/O threads (no O_DIRECT, a fault hook, or no ``io_setup``)."""
        return self._aio

    @property
    def file_size(self) -> int:
        return self.num_slots * self._slot_size

    def stats(self) -> dict[str, float]:
        """Counters for metrics (bandwidth = bytes / seconds per direction)."""
        with self._lock:
            return {
                "blocks_written": self.blocks_written,
                "blocks_read": self.blocks_read,
                "bytes_written": self.bytes_written,
                "bytes_read": self.bytes_read,
                "write_seconds": self.write_seconds,
                "read_seconds": self.read_seconds,
                "write_failures": self.write_failures,
                "read_failures": self.read_failures,
                "checksum_failures": self.checksum_failures,
                "mismatches": self.mismatches,
            }

    # ---- I/O ---------------------------------------------------------------
    def _stage(self) -> tuple[mmap.mmap, np.ndarray]:
        """This thread's page-aligned staging buffer of one slot."""
        staged = getattr(self._local, "buf", None)
        if staged is None:
            staged = _aligned_buffer(self._slot_size)
            self._local.buf = staged  # freed with the thread (no registry: callers' threads come and go)
        return staged

    def _header_page(self) -> mmap.mmap:
        """This thread's page-aligned header buffers (the zero-copy path): one page per slot of
        the longest coalesced read or write; single reads and writes use the first."""
        page = getattr(self._local, "page", None)
        if page is None:
            page = mmap.mmap(-1, ALIGN * self._run_slots)
            self._local.page = page
        return page

    def _zero_copy(self, arr: np.ndarray) -> bool:
        """Can ``arr`` be the payload iovec itself? Always with buffered I/O;
        with O_DIRECT only for page-multiple blocks in page-aligned memory."""
        if not self._o_direct:
            return True
        return self._payload_off == ALIGN and arr.__array_interface__["data"][0] % ALIGN == 0

    def _pack_header(self, buf: mmap.mmap, slot: int, block_hash: BlockHash, payload_crc: int) -> None:
        pack_header(buf, payload_offset=self._payload_off, payload_crc=payload_crc, slot=slot,
                    block_hash=block_hash, length=self.block_bytes)

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.num_slots:
            raise IndexError(f"{self._path}: slot {slot} out of range [0, {self.num_slots})")

    def _check_hash(self, block_hash: BlockHash) -> None:
        if not isinstance(block_hash, bytes) or len(block_hash) != HASH_BYTES:
            raise ValueError(f"block hash {block_hash!r} is not {HASH_BYTES} bytes")

    def _failed(self, op: str, e: OSError) -> str:
        kind = errno.errorcode.get(e.errno or 0, str(e.errno))
        with self._lock:
            first = (op, kind) not in self._logged
            self._logged.add((op, kind))
        if first:
            logger.warning(
                "kvbm: disk cache %s failed on %s: %s (errno %s); the block is dropped (stores) or "
                "recomputed (loads). Further %s errors of this kind are only counted.",
                op, self._path, e.strerror, e.errno, op,
            )
        return "io"

    def _log_once(self, op: str, kind: str, msg: str, *args: Any) -> None:
        with self._lock:
            first = (op, kind) not in self._logged
            self._logged.add((op, kind))
        if first:
            logger.warning(msg + " Further ones are only counted.", *args)

    def write_blocks(self, items: Sequence[tuple[int, BlockHash, Any]]) -> list[bool]:
        """Write ``(slot, block_hash, data)`` items; per-item success, never raises on I/O errors.

        ``data`` is ``block_bytes`` of any C-contiguous buffer (bytes, memoryview,
        numpy array, CPU tensor); page-aligned memory (pinned host rows) of a
        page-multiple block goes to disk without a staging copy, and items of
        consecutive slots that do (in any order) with one ``pwritev`` per run
        (:meth:`_write_run`; a failed run is written again block by block). A failed item
        leaves its slot unreadable (it will not verify), so the caller must
        simply not publish it. Raises ValueError/IndexError only for caller
        bugs: a bad slot or hash or the same slot twice in one batch (before
        any I/O), or data of the wrong size or layout (found while the other
        items are written; those are written and counted).
        """
        self._ensure_open()
        items = list(items)
        self._check_items(items, "write_blocks")
        if not items:
            return []
        t0 = time.perf_counter()
        results = self._write_all(items)
        elapsed = time.perf_counter() - t0
        ok = [r is None for r in results]
        good = sum(ok)
        errors = [r for r in results if isinstance(r, Exception)]
        with self._lock:
            self.write_failures += len(ok) - good - len(errors)
            self.blocks_written += good
            self.bytes_written += good * self.block_bytes
            self.write_seconds += elapsed
        if errors:
            raise errors[0]
        return ok

    def _check_items(self, items: list[tuple[int, BlockHash, Any]], op: str) -> None:
        """Cheap checks done before any I/O (buffers are checked by the I/O threads,
        so that converting them overlaps with other items' I/O): a whole batch at once in
        the common case, item by item (for the error that names the item) otherwise."""
        try:
            slots = [slot for slot, _, _ in items]
            if (min(slots) >= 0 and max(slots) < self.num_slots and len(set(slots)) == len(slots)
                    and all(type(h) is bytes and len(h) == HASH_BYTES for _, h, _ in items)):
                return
        except Exception:
            pass  # the loop below raises the error that names the item
        seen: set[int] = set()
        for slot, block_hash, _ in items:
            self._check_slot(slot)
            self._check_hash(block_hash)
            if slot in seen:
                raise ValueError(f"slot {slot} appears twice in one {op} batch")
            seen.add(slot)

    def _fault(self, op: str, slot: int) -> str | None:
        """The injected fault for this block's I/O, if a hook is set (tests only)."""
        if self._fault_hook is None:
            return None
        fault = self._fault_hook(op, slot)
        if fault not in (None, "error", "corrupt"):
            raise ValueError(f"fault_hook returned {fault!r}; expected None, 'error' or 'corrupt'")
        return fault

    def _write_all(self, items: list[tuple[int, BlockHash, Any]]) -> list[Any]:
        """Write every item over the I/O threads, a run of consecutive slots per pull (:meth:`_runs`).

        Per item: None (written), a failure kind (str), or the exception of a caller bug (that
        item's only: the other items are still written and counted)."""
        if len(items) == 1:
            return [self._write_one(items[0])]
        results: list[Any] = [None] * len(items)
        for landed in self._each_run(items, self._write_run):
            for i, r in landed:
                results[i] = r
        return results

    def _write_run(self, items: list[tuple[int, BlockHash, Any]], run: list[int],
                   pages: mmap.mmap) -> list[tuple[int, Any]]:
        """One run's writes on an I/O thread: ``(index, outcome)`` per item.

        A run of slots whose sources all take the zero-copy path is one ``pwritev`` (each slot's
        header, with its own payload CRC, in its own page of ``pages``, then its payload straight
        from the caller's memory: the slots abut). A failed or short run write is retried block
        by block, so one bad block costs only itself; so is a run with any other source."""
        if len(run) > 1:
            srcs = [self._run_source(items[i][2]) for i in run]
            if all(src is not None for src in srcs) and self._pwritev_run(items, run, srcs, pages):
                return [(i, None) for i in run]
        results: list[tuple[int, Any]] = []
        for i in run:
            try:
                results.append((i, self._write_one(items[i])))
            except Exception as e:  # a caller bug: this item's result; the run's others are written
                results.append((i, e))
        return results

    def _run_source(self, data: Any) -> np.ndarray | None:
        """``data`` as the payload iovec of a run write, or None where :meth:`_write_one` must take
        it (memory O_DIRECT cannot write from, or a caller bug it reports)."""
        try:
            src = _as_u8(data, writable=False, what="data")
        except Exception:
            return None
        return src if src.size == self.block_bytes and self._zero_copy(src) else None

    def _pwritev_run(self, items: list[tuple[int, BlockHash, Any]], run: list[int], srcs: list[np.ndarray],
                     pages: mmap.mmap) -> bool:
        """Write a run of consecutive slots with one ``pwritev``; False if it failed or was short
        (the caller then writes the run block by block, which logs what still fails)."""
        size = self._slot_size
        first = items[run[0]][0]
        view = memoryview(pages)
        iov: list[Any] = []
        try:
            for j, (i, src) in enumerate(zip(run, srcs)):
                page = view[j * ALIGN : (j + 1) * ALIGN]  # the whole header page (payload offset ALIGN)
                self._pack_header(page, items[i][0], items[i][1], crc32(src))
                iov.append(page)
                iov.append(src)
            want = len(run) * size
            try:
                got = os.pwritev(self._fd, iov, first * size)
            except OSError as e:
                logger.debug("kvbm: write of slots %d-%d to %s failed (%s); writing them one by one",
                             first, first + len(run) - 1, self._path, e)
                return False
        finally:
            iov.clear()
            view.release()
        if got != want:
            self._log_once(
                "write", "short", "kvbm: short write to disk cache %s (slots %d-%d: %d of %d bytes; "
                "writing them one by one).", self._path, first, first + len(run) - 1, got, want,
            )
            return False
        return True

    def _write_one(self, item: tuple[int, BlockHash, Any]) -> str | None:
        slot, block_hash, data = item
        src = _as_u8(data, writable=False, what=f"data for slot {slot}")
        if src.size != self.block_bytes:
            raise ValueError(f"data for slot {slot} has {src.size} bytes, expected {self.block_bytes}")
        fault = self._fault("write", slot)
        if fault == "error":
            return self._failed("write", OSError(errno.EIO, "injected fault"))
        off = self._payload_off
        if self._zero_copy(src) and fault is None:
            page = self._header_page()
            self._pack_header(page, slot, block_hash, crc32(src))
            iov: list[Any] = [memoryview(page)[:off], src]
            want = off + self.block_bytes
        else:  # O_DIRECT from memory that is not page-aligned (or a fault to inject): stage it
            mm, buf = self._stage()
            payload = buf[off : off + self.block_bytes]
            np.copyto(payload, src)
            self._pack_header(mm, slot, block_hash, crc32(payload))
            if fault == "corrupt":  # bit rot after the checksum: the write "succeeds"
                payload[len(payload) // 2] ^= 0xFF
            iov = [mm]
            want = self._slot_size
        try:
            n = os.pwritev(self._fd, iov, slot * self._slot_size)
        except OSError as e:
            return self._failed("write", e)
        finally:
            iov.clear()
        if n != want:
            self._log_once(
                "write", "short", "kvbm: short write to disk cache %s (slot %d: %d of %d bytes).",
                self._path, slot, n, want,
            )
            return "short"
        return None

    def read_blocks(self, items: Sequence[tuple[int, BlockHash, Any]]) -> list[bool]:
        """Read ``(slot, expected_block_hash, dest)`` items; per-item True only if verified.

        False means a miss (recompute): I/O error, short read, a slot holding
        another block or nothing, or a checksum mismatch. The contents of a
        failed item's ``dest`` are unspecified (page-aligned destinations are
        read into directly, before verification): never use them. Raises
        ValueError/IndexError only for caller bugs: a bad slot or hash or the
        same slot twice (before any I/O), or a destination of the wrong size
        or read-only (found while the other items are read).

        The I/O threads only read (into the destination where it is page-aligned):
        the calling thread verifies each block (header, then payload CRC) as its
        read completes, so the threads go straight on to their next read and
        ``io_threads`` reads stay in flight while blocks are checked. Verifying on
        the I/O threads instead left one of the four idle for every CRC (~60 µs of
        every ~3 ms 2 MiB read) and made the threads queue for the GIL between
        reads (``bench/disk.py --executor``; docs/architecture.md). Two calls from
        different threads share the I/O threads: the second call's reads start as
        the first call's run out, so a caller that overlaps calls (the transfer
        executor's G3 jobs) keeps the device busy between them. Loads of zero-copy rows go
        through native AIO instead where it works (:meth:`_read_all_aio`): the same checks, on
        the same thread, with every read of the load in flight at once.
        """
        self._ensure_open()
        items = list(items)
        self._check_items(items, "read_blocks")
        if not items:
            return []
        t0 = time.perf_counter()
        results = self._read_all(items)
        elapsed = time.perf_counter() - t0
        ok = [r is None for r in results]
        good = sum(ok)
        kinds = [r for r in results if isinstance(r, str)]
        with self._lock:
            self.read_failures += sum(r in ("io", "short") for r in kinds)
            self.checksum_failures += kinds.count("checksum")
            self.mismatches += kinds.count("mismatch")
            self.blocks_read += good
            self.bytes_read += good * self.block_bytes
            self.read_seconds += elapsed
        for r in results:
            if isinstance(r, Exception):
                raise r
        return ok

    def _read_all(self, items: list[tuple[int, BlockHash, Any]]) -> list[Any]:
        """Read every item and verify each on this thread as it lands: through native AIO where
        it works and every destination is a zero-copy row, else on the I/O threads.

        Per item: None (verified), a miss kind (str), or the exception of a caller bug."""
        n = len(items)
        if n == 1:
            return [self._verified(items[0], self._read_fast(items[0], self._header_page()))]
        if self._aio:
            addresses = [self._row_address(dest) for _, _, dest in items]
            if min(addresses) >= 0:
                taken = self._take_aio(n)
                if taken is not None:
                    try:
                        return self._read_all_aio(items, addresses, *taken)
                    finally:
                        self._aio_free.put(taken)
        results: list[Any] = [None] * n
        verified = self._verified
        for landed in self._each_run(items, self._read_run):
            for i, r in landed:
                results[i] = verified(items[i], r)
        return results

    def _take_aio(self, n: int) -> tuple[AioContext, mmap.mmap] | None:
        """A free AIO context (a new one if every context is busy with another caller's load) with
        header pages for ``n`` slots; None if the kernel will not give another (threads then)."""
        try:
            ctx, pages = self._aio_free.get_nowait()
        except queue.Empty:
            ctx, why = AioContext.open(_AIO_DEPTH)
            if ctx is None:
                self._log_once("read", "aio", "kvbm: disk cache %s: no further native AIO context (%s); "
                               "loads that find every context busy use the I/O threads.", self._path, why)
                return None
            with self._lock:
                self._aio_all.append(ctx)
            pages = mmap.mmap(-1, ALIGN * 64)
        if len(pages) < ALIGN * n:
            pages.close()
            pages = mmap.mmap(-1, ALIGN * n)
        return ctx, pages

    def _read_all_aio(self, items: list[tuple[int, BlockHash, Any]], addresses: list[int], ctx: AioContext,
                      pages: mmap.mmap) -> list[Any]:
        """:meth:`_read_all` through native AIO: each run (:meth:`_runs`) one ``preadv`` request,
        every slot's header into its own page of ``pages`` and its payload straight into its row,
        the whole load submitted at once; each run is verified here as its read completes. A run
        whose read fails (or that the kernel refused) is read again block by block, so one bad
        sector costs only its block."""
        runs = self._runs(items)
        order = [i for run in runs for i in run]  # item at position p: header page p, iovecs 2p and 2p+1
        n, off, size = len(order), self._payload_off, self._slot_size
        iovecs = np.empty((2 * n, 2), dtype=IOVEC)
        page0 = np.frombuffer(pages, dtype=np.uint8).ctypes.data
        iovecs[0::2, 0] = page0 + np.arange(n, dtype=np.uint64) * ALIGN
        iovecs[0::2, 1] = off
        iovecs[1::2, 0] = [addresses[i] for i in order]
        iovecs[1::2, 1] = self.block_bytes
        lengths = np.array([len(run) for run in runs], dtype=np.int64)
        first = np.cumsum(lengths) - lengths
        offsets = np.array([items[run[0]][0] for run in runs], dtype=np.int64) * size
        results: list[Any] = [None] * len(items)
        verified, first_of = self._verified, first.tolist()

        def done(requests: np.ndarray, got: np.ndarray) -> None:
            for r, g in zip(requests.tolist(), got.tolist()):
                run, p = runs[r], first_of[r]
                if g < 0:
                    page = self._header_page()
                    for i in run:
                        results[i] = verified(items[i], self._read_fast(items[i], page))
                    continue
                for j, i in enumerate(run):
                    at = (p + j) * ALIGN
                    results[i] = verified(items[i], (min(size, max(0, g - j * size)), pages[at : at + HEADER_SIZE],
                                                     items[i][2]))

        ctx.preadv(self._fd, offsets, iovecs, 2 * first, 2 * lengths, done)
        return results

    def _each_run(self, items: list[tuple[int, BlockHash, Any]],
                  fn: Callable[[list[tuple[int, BlockHash, Any]], list[int], mmap.mmap], list[tuple[int, Any]]]
                  ) -> Iterator[list[tuple[int, Any]]]:
        """``fn(items, run, pages)`` for every run of ``items`` (:meth:`_runs`) on the I/O threads,
        each thread with its own header pages; yields each run's ``(index, outcome)`` list as it
        lands, so the caller works (verifies) while the others are still read. A run that raises
        gives its items the exception: the caller is never left waiting for it."""
        runs = self._runs(items)
        landed: queue.SimpleQueue[list[tuple[int, Any]]] = queue.SimpleQueue()
        pending = iter(runs)  # shared: next() is atomic, threads pull work as they free up

        def worker() -> None:
            pages = self._header_page()
            for run in pending:
                try:
                    landed.put(fn(items, run, pages))
                except Exception as e:
                    landed.put([(i, e) for i in run])

        futures = [self._pool.submit(worker) for _ in range(min(self._io_threads, len(runs)))]
        try:
            for _ in range(len(runs)):
                yield landed.get()
        finally:
            for f in futures:
                f.result()

    def _runs(self, items: list[tuple[int, BlockHash, Any]]) -> list[list[int]]:
        """Item indices grouped into reads or writes: items of consecutive slots (in any order)
        share one ``preadv``/``pwritev`` of up to ``_run_slots`` slots, split so that every I/O
        thread gets one.

        A request's prefix was usually stored in one batch, and the pool hands a batch
        consecutive slots, so a load is mostly runs. At 128 KiB blocks the per-block Python of
        one read each (and the hand-over to this thread) bounded loads at ~0.7 of the device's
        random reads; a run costs one call and one hand-over (docs/architecture.md)."""
        n = len(items)
        if self._run_slots == 1:
            return [[i] for i in range(n)]
        order = sorted(range(n), key=lambda i: items[i][0])
        cap = max(1, min(self._run_slots, -(-n // self._io_threads)))
        runs: list[list[int]] = []
        run = [order[0]]
        prev = items[order[0]][0]
        for i in order[1:]:
            slot = items[i][0]
            if slot == prev + 1 and len(run) < cap:
                run.append(i)
            else:
                runs.append(run)
                run = [i]
            prev = slot
        runs.append(run)
        return runs

    def _read_run(self, items: list[tuple[int, BlockHash, Any]], run: list[int],
                  pages: mmap.mmap) -> list[tuple[int, Any]]:
        """One run's reads on an I/O thread: ``(index, outcome for :meth:`_verified`)`` per item.

        A run of slots whose destinations all take the zero-copy path is one ``preadv`` (each
        slot's header into its own page of ``pages``, its payload straight into its row); a
        failed run read is retried block by block, so one bad sector costs only its block."""
        if len(run) > 1 and all(self._direct_row(items[i][2]) for i in run):
            off, size = self._payload_off, self._slot_size
            view = memoryview(pages)
            iov: list[Any] = []
            for j, i in enumerate(run):
                iov.append(view[j * ALIGN : j * ALIGN + off])
                iov.append(items[i][2])
            try:
                got = os.preadv(self._fd, iov, items[run[0]][0] * size)
            except OSError:
                got = -1
            finally:
                iov.clear()
                view.release()
            if got >= 0:
                return [(i, (min(size, max(0, got - j * size)), pages[j * ALIGN : j * ALIGN + HEADER_SIZE],
                             items[i][2])) for j, i in enumerate(run)]
        read = self._read_fast
        return [(i, read(items[i], pages)) for i in run]

    def _direct_row(self, dest: Any) -> bool:
        """Is ``dest`` a row the fast path reads straight into? (See :meth:`_row_address`.)"""
        return self._row_address(dest) >= 0

    def _row_address(self, dest: Any) -> int:
        """The address of ``dest`` if it is a row the fast path reads straight into (a page-aligned
        uint8 row of one block, as pool and host rows are) with no fault hook; else -1."""
        if not (type(dest) is np.ndarray and dest.dtype == _U8 and dest.ndim == 1 and dest.size == self.block_bytes
                and dest.flags.c_contiguous and dest.flags.writeable and self._fault_hook is None):
            return -1
        address: int = dest.__array_interface__["data"][0]
        if self._o_direct and (self._payload_off != ALIGN or address % ALIGN):
            return -1
        return address

    def _read_fast(self, item: tuple[int, BlockHash, Any], page: mmap.mmap) -> Any:
        """One item's read on an I/O thread, with as little Python as it takes (at 128 KiB blocks
        the per-block Python of all threads together decides how many reads stay in flight:
        they take turns for the GIL). The common case, a :meth:`_direct_row` destination, is
        read straight into the row and returned as (bytes read or the OSError, header bytes,
        row) for :meth:`_verified`; anything else goes through :meth:`_read_one` (checked,
        staged, verified on this thread). Never raises: a caller bug's exception is the
        item's result."""
        try:
            slot, _, dest = item
            if self._direct_row(dest):
                try:
                    got: Any = os.preadv(self._fd, [memoryview(page)[: self._payload_off], dest],
                                         slot * self._slot_size)
                except OSError as e:
                    got = e
                return got, page[:HEADER_SIZE], dest
            return self._read_one(item)
        except Exception as e:
            return e

    def _verified(self, item: tuple[int, BlockHash, Any], r: Any) -> Any:
        """The outcome of :meth:`_read_fast`: a fast read's header and payload checked here (the
        calling thread, so that the I/O threads go on reading), anything else as it came."""
        if type(r) is not tuple:
            return r
        got, hdr, dst = r
        if isinstance(got, OSError):
            return self._failed("read", got)
        slot, block_hash, _ = item
        want = self._payload_off + self.block_bytes
        if got < want:
            self._log_once(
                "read", "short", "kvbm: short read from disk cache %s (slot %d: %d of %d bytes; "
                "file truncated?).", self._path, slot, got, want,
            )
            return "short"
        payload_crc = matching_payload_crc(hdr, payload_offset=self._payload_off, slot=slot, block_hash=block_hash,
                                           length=self.block_bytes)
        if payload_crc is None:
            return self._verify(item, hdr, dst)  # not this block's header: which miss (logged once)
        if crc32(dst) != payload_crc:
            return self._payload_mismatch(slot, block_hash)
        return None

    def _read_one(self, item: tuple[int, BlockHash, Any]) -> str | None:
        """One item read and verified on this thread (what :meth:`_read_fast` does not take:
        other buffer types, staged reads, fault injection): None or the miss kind."""
        slot, block_hash, dest = item
        dst = _as_u8(dest, writable=True, what=f"destination for slot {slot}")
        if dst.size != self.block_bytes:
            raise ValueError(f"destination for slot {slot} has {dst.size} bytes, expected {self.block_bytes}")
        fault = self._fault("read", slot)
        if fault == "error":
            return self._failed("read", OSError(errno.EIO, "injected fault"))
        off = self._payload_off
        direct = self._zero_copy(dst)
        if direct:
            hdr: Any = self._header_page()
            iov: list[Any] = [memoryview(hdr)[:off], dst]
            payload = dst
        else:
            hdr, buf = self._stage()
            iov = [hdr]
            payload = buf[off : off + self.block_bytes]
        want = off + self.block_bytes  # the slot's padding may lie past a truncated end
        try:
            n = os.preadv(self._fd, iov, slot * self._slot_size)
        except OSError as e:
            return self._failed("read", e)
        finally:
            iov.clear()
        if n < want:
            self._log_once(
                "read", "short", "kvbm: short read from disk cache %s (slot %d: %d of %d bytes; "
                "file truncated?).", self._path, slot, n, want,
            )
            return "short"
        if fault == "corrupt":
            payload[len(payload) // 2] ^= 0xFF
        r = self._verify(item, hdr, payload)
        if r is None and not direct:
            np.copyto(dst, payload)
        return r

    def _verify(self, item: tuple[int, BlockHash, Any], hdr: Any, payload: np.ndarray) -> str | None:
        """None if the header names this block and the payload matches its CRC; else the miss kind."""
        slot, block_hash, _ = item
        version = header_version(hdr)
        if version is None:
            return "mismatch"  # never written (zeros) or not ours
        if version != FORMAT_VERSION:
            self._log_once(
                "read", "version", "kvbm: disk cache %s holds blocks of format version %d (slot %d); this "
                "kvbm reads version %d, so they are misses and get overwritten.",
                self._path, version, slot, FORMAT_VERSION,
            )
            return "mismatch"
        header = unpack_header(hdr)
        if header is None:
            self._log_once(
                "read", "header-crc", "kvbm: corrupt block header in disk cache %s (slot %d).",
                self._path, slot,
            )
            return "checksum"
        if header.payload_offset != self._payload_off:
            return "mismatch"
        if header.slot != slot or header.block_hash != block_hash or header.length != self.block_bytes:
            return "mismatch"  # the slot holds another block: the index is stale
        if crc32(payload) != header.payload_crc:
            return self._payload_mismatch(slot, block_hash)
        return None

    def _payload_mismatch(self, slot: int, block_hash: BlockHash) -> str:
        self._log_once(
            "read", "payload-crc", "kvbm: checksum mismatch in disk cache %s (slot %d, block "
            "%s): data corrupted or torn write; treated as a miss.", self._path, slot, block_hash.hex(),
        )
        return "checksum"

    def sync(self) -> None:
        """Make written blocks durable (fdatasync): data, and the extent
        conversions of preallocated space that O_DIRECT writes alone do not
        persist. Needed before a leader journals them as stored."""
        self._ensure_open()
        os.fdatasync(self._fd)

    def _ensure_open(self) -> None:
        if self._closed or self._fd < 0:
            raise RuntimeError(f"DiskArena {self._path} is closed")

    def close(self) -> None:
        """Stop the I/O threads and close the file (which stays on disk)."""
        if self._closed:
            return
        self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)
        for ctx in getattr(self, "_aio_all", ()):
            ctx.close()
        if self._fd >= 0:
            os.close(self._fd)  # also drops the flock
            self._fd = -1

    def __enter__(self) -> DiskArena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._closed and self._fd >= 0:
                self.close()
        except Exception:
            pass
