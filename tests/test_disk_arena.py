"""The G3 data file on real filesystems: round trips, corruption, full disks, refusals.

Filesystem conditions are real: tmpfs/ramfs/ext2 mounts made for the test
(skipped with a reason where mounting is not permitted). The only seam is
``fallocate=`` to force a refusal on filesystems that support it.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kvbm.storage import disk_file as disk_file_mod
from kvbm.storage.disk import HEADER_SIZE, DiskArena, DiskSetupError
from kvbm.tools.disk_probe import probe_disk

LOGGER = "kvbm.storage.disk"
FILE_LOGGER = "kvbm.storage.disk_file"  # set-up: fallocate, zero-fill, O_DIRECT


# ---- helpers -------------------------------------------------------------------
@pytest.fixture
def mount(tmp_path):
    """mount(fstype, options, source=None) -> a fresh mount point, unmounted after the test."""
    mounted: list[Path] = []

    def _mount(fstype: str, options: str | None = None, source: str | None = None) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip(f"mounting a {fstype} needs root and mount(8)")
        target = tmp_path / f"mnt-{fstype}-{len(mounted)}"
        target.mkdir()
        cmd = ["mount", "-t", fstype] + (["-o", options] if options else []) + [source or fstype, str(target)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount {fstype} here ({r.stderr.strip()}); needs CAP_SYS_ADMIN")
        mounted.append(target)
        return target

    yield _mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def rand_blocks(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    return [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def page_aligned(n: int) -> np.ndarray:
    """Page-aligned memory, as pinned host rows are (enables the zero-copy path)."""
    arr = np.frombuffer(mmap.mmap(-1, max(n, 1)), dtype=np.uint8)[:n]
    assert arr.__array_interface__["data"][0] % 4096 == 0
    return arr


def unaligned(n: int) -> np.ndarray:
    """Memory that is certainly not page-aligned (forces the staged path)."""
    return np.frombuffer(mmap.mmap(-1, n + 4096), dtype=np.uint8)[64 : 64 + n]


def H(n: int) -> bytes:
    """A 128-bit block hash from a small number (tests name blocks by number)."""
    return n.to_bytes(16, "little")


def read_back(arena: DiskArena, slot: int, block_hash: int, aligned: bool = False) -> tuple[bool, np.ndarray]:
    dst = page_aligned(arena.block_bytes) if aligned else unaligned(arena.block_bytes)
    (ok,) = arena.read_blocks([(slot, H(block_hash), dst)])
    return ok, dst


def flip_byte(path: str, offset: int) -> None:
    fd = os.open(path, os.O_RDWR)  # buffered: bypasses the arena, lands on disk
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- round trips -----------------------------------------------------------------
@pytest.mark.parametrize("io_threads", [1, 4])
@pytest.mark.parametrize("disable_o_direct", [False, True])
@pytest.mark.parametrize("pages", [False, True], ids=["odd_size", "page_multiple"])
def test_round_trip_random_blocks(tmp_path, io_threads, disable_o_direct, pages):
    rng = np.random.default_rng(io_threads + 10 * disable_o_direct + 100 * pages)
    if pages:  # a whole number of pages: payload on its own page, zero-copy from aligned memory
        block_bytes = 4096 * int(rng.integers(1, 17))
    else:
        block_bytes = int(rng.integers(5000, 70000)) | 1  # odd: never a multiple of 4096
    num_slots = 97
    with DiskArena(
        str(tmp_path / "g3"), num_slots, block_bytes, file_tag="r0",
        io_threads=io_threads, disable_o_direct=disable_o_direct,
    ) as arena:
        assert arena.slot_size % 4096 == 0
        assert arena.slot_size >= HEADER_SIZE + block_bytes
        assert os.path.getsize(arena.path) == num_slots * arena.slot_size
        assert arena.o_direct is (not disable_o_direct)
        slots = rng.permutation(num_slots)[:80].tolist()
        hashes = [rng.bytes(16) for _ in slots]  # any 128-bit hash
        data = rand_blocks(rng, len(slots), block_bytes)
        for i in range(0, len(data), 2):  # half of them in page-aligned memory
            data[i] = page_aligned(block_bytes)
            data[i][:] = rng.integers(0, 256, block_bytes, dtype=np.uint8)
        for lo in range(0, len(slots), 17):  # several batches
            batch = [(slots[i], hashes[i], data[i]) for i in range(lo, min(lo + 17, len(slots)))]
            assert arena.write_blocks(batch) == [True] * len(batch)
        arena.sync()
        order = rng.permutation(len(slots)).tolist()
        dests = [page_aligned(block_bytes) if k % 3 else unaligned(block_bytes) for k in order]
        ok = arena.read_blocks([(slots[i], hashes[i], d) for i, d in zip(order, dests, strict=True)])
        assert ok == [True] * len(order)
        for i, d in zip(order, dests, strict=True):
            np.testing.assert_array_equal(d, data[i])
        assert arena.bytes_written == arena.bytes_read == len(slots) * block_bytes
        assert arena.write_seconds > 0 and arena.read_seconds > 0
        assert arena.read_failures == arena.checksum_failures == arena.write_failures == 0


def test_consecutive_slots_share_reads_in_any_order(tmp_path, monkeypatch):
    """Items of consecutive slots (a prefix stored in one batch) are read with one preadv per run,
    whatever order the load lists them in; a run with a destination the fast path cannot take is
    read block by block; every block still verifies on its own."""
    rng = np.random.default_rng(21)
    block = 8192
    with DiskArena(str(tmp_path), 40, block, file_tag="runs", io_threads=2) as arena:
        blocks = rand_blocks(rng, 40, block)
        assert all(arena.write_blocks([(i, H(i + 1), b) for i, b in enumerate(blocks)]))
        arena.sync()
        calls: list[int] = []
        real = os.preadv

        def counting(fd, buffers, offset):
            calls.append(len(buffers))
            return real(fd, buffers, offset)

        monkeypatch.setattr(os, "preadv", counting)
        slots = list(range(20, 4, -1)) + [30, 33, 32, 31]  # one descending run, one shuffled
        rows = [page_aligned(block) for _ in slots]
        rows[-1] = unaligned(block)  # slot 31's row takes the staged path: its run goes block by block
        assert arena.read_blocks([(s, H(s + 1), r) for s, r in zip(slots, rows, strict=True)]) == [True] * 20
        for s, r in zip(slots, rows, strict=True):
            np.testing.assert_array_equal(r, blocks[s])
        # slots 5-14 and 15-20 (at most half of the 20 items per read: both threads get one; two iovecs
        # a slot); 30, 32, 33 one by one (their run holds 31) and 31 staged (one iovec, the whole slot)
        assert sorted(calls) == [1, 2, 2, 2, 12, 20]


def _count_pwritev(monkeypatch, fail=None) -> list[tuple[int, int]]:
    """Wrap os.pwritev: record (iovecs, offset) per call; ``fail(buffers, offset)`` may return
    an OSError to raise or a number of leading iovecs to write (a short write) instead."""
    calls: list[tuple[int, int]] = []
    real = os.pwritev

    def counting(fd, buffers, offset):
        calls.append((len(buffers), offset))
        what = fail(buffers, offset) if fail else None
        if isinstance(what, OSError):
            raise what
        return real(fd, buffers if what is None else list(buffers)[:what], offset)

    monkeypatch.setattr(os, "pwritev", counting)
    return calls


def _all_read_back(arena: DiskArena, blocks: list[np.ndarray], slots: list[int]) -> None:
    rows = [page_aligned(arena.block_bytes) for _ in slots]
    assert arena.read_blocks([(s, H(s + 1), r) for s, r in zip(slots, rows, strict=True)]) == [True] * len(slots)
    for s, r in zip(slots, rows, strict=True):
        np.testing.assert_array_equal(r, blocks[s])


def test_consecutive_slots_share_writes_in_any_order(tmp_path, monkeypatch):
    """Items of consecutive slots (a batch the pool handed consecutive slots) are written with one
    pwritev per run, whatever order the batch lists them in: each slot's header page, then its
    payload; every block reads back and verifies on its own."""
    rng = np.random.default_rng(22)
    block = 8192
    with DiskArena(str(tmp_path), 40, block, file_tag="wruns", io_threads=2) as arena:
        blocks = [page_aligned(block) for _ in range(40)]
        for b in blocks:
            b[:] = rng.integers(0, 256, block, dtype=np.uint8)
        calls = _count_pwritev(monkeypatch)
        slots = list(range(20, 4, -1)) + [30, 33, 32, 31]  # one descending run, one shuffled
        assert arena.write_blocks([(s, H(s + 1), blocks[s]) for s in slots]) == [True] * 20
        # slots 5-14 and 15-20 (at most half of the 20 items per write: both threads get one), 30-33
        size = arena.slot_size
        assert sorted(calls) == [(8, 30 * size), (12, 15 * size), (20, 5 * size)]
        assert (arena.blocks_written, arena.bytes_written, arena.write_failures) == (20, 20 * block, 0)
        monkeypatch.undo()
        arena.sync()
        _all_read_back(arena, blocks, slots)
        # a shuffled batch of 40: two runs of 20 slots
        calls = _count_pwritev(monkeypatch)
        order = rng.permutation(40).tolist()
        assert arena.write_blocks([(s, H(s + 1), blocks[s]) for s in order]) == [True] * 40
        assert sorted(calls) == [(40, 0), (40, 20 * size)]
        monkeypatch.undo()
        _all_read_back(arena, blocks, order)


def test_run_write_with_a_staged_source_goes_block_by_block(tmp_path, monkeypatch):
    """A run holding a source the zero-copy path cannot take (memory that is not page-aligned
    under O_DIRECT; with buffered I/O any memory is zero-copy) is written one block at a time."""
    rng = np.random.default_rng(23)
    block = 8192
    with DiskArena(str(tmp_path), 8, block, file_tag="wstaged", io_threads=2) as arena:
        if not arena.o_direct:
            pytest.skip("needs O_DIRECT: with buffered I/O every source is zero-copy")
        blocks = [page_aligned(block) for _ in range(8)]
        blocks[2] = unaligned(block)
        for b in blocks:
            b[:] = rng.integers(0, 256, block, dtype=np.uint8)
        calls = _count_pwritev(monkeypatch)
        slots = [3, 1, 0, 2, 5, 4, 6, 7]
        assert arena.write_blocks([(s, H(s + 1), blocks[s]) for s in slots]) == [True] * 8
        # run 0-3 holds slot 2's staged row: 0, 1 and 3 alone (two iovecs), 2 staged (one, the
        # whole slot); run 4-7 in one call
        assert sorted(n for n, _ in calls) == [1, 2, 2, 2, 8]
        monkeypatch.undo()
        _all_read_back(arena, blocks, slots)


@pytest.mark.parametrize("bad_slot", [None, 6])
def test_failed_run_write_is_retried_block_by_block(tmp_path, monkeypatch, caplog, bad_slot):
    """A run write that fails (EIO) is written again one block at a time: the blocks that then
    write are stored, and a block that fails again costs only itself (False in the caller's
    order, counted, logged once)."""
    rng = np.random.default_rng(24)
    block = 8192
    with DiskArena(str(tmp_path), 16, block, file_tag="weio", io_threads=2) as arena:
        size = arena.slot_size
        blocks = [page_aligned(block) for _ in range(16)]
        for b in blocks:
            b[:] = rng.integers(0, 256, block, dtype=np.uint8)

        def fail(buffers, offset):
            if len(buffers) > 2 or offset == (bad_slot or -1) * size:
                return OSError(errno.EIO, "injected")
            return None

        calls = _count_pwritev(monkeypatch, fail)
        slots = rng.permutation(16).tolist()
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ok = arena.write_blocks([(s, H(s + 1), blocks[s]) for s in slots])
        assert ok == [s != bad_slot for s in slots]
        assert sorted(n for n, _ in calls) == [2] * 16 + [16, 16]  # two runs of 8, then each block
        assert arena.write_failures == (bad_slot is not None) and arena.blocks_written == 16 - arena.write_failures
        assert len([r for r in caplog.records if "write failed" in r.getMessage()]) == (bad_slot is not None)
        monkeypatch.undo()
        good = [s for s in slots if s != bad_slot]
        _all_read_back(arena, blocks, good)
        if bad_slot is not None:
            assert read_back(arena, bad_slot, bad_slot + 1, aligned=True)[0] is False


def test_short_run_write_is_retried_block_by_block(tmp_path, monkeypatch, caplog):
    """A run write that writes less than the whole run (3 of its 8 iovecs) is logged once and
    written again one block at a time."""
    rng = np.random.default_rng(25)
    block = 8192
    with DiskArena(str(tmp_path), 8, block, file_tag="wshort", io_threads=1) as arena:
        blocks = [page_aligned(block) for _ in range(8)]
        for b in blocks:
            b[:] = rng.integers(0, 256, block, dtype=np.uint8)
        calls = _count_pwritev(monkeypatch, lambda buffers, offset: 3 if len(buffers) > 2 else None)
        slots = [7, 6, 5, 4, 0, 1, 2, 3]
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            assert arena.write_blocks([(s, H(s + 1), blocks[s]) for s in slots]) == [True] * 8
        assert sorted(n for n, _ in calls) == [2] * 8 + [16]
        assert arena.write_failures == 0 and arena.blocks_written == 8
        assert len([r for r in caplog.records if "short write" in r.getMessage()]) == 1
        monkeypatch.undo()
        _all_read_back(arena, blocks, slots)


def test_write_run_that_raises_is_reported_not_written(tmp_path, monkeypatch):
    """An I/O thread that raises while writing a run hands its items the exception: the caller
    gets it instead of waiting or seeing the run as written."""
    from kvbm.storage import disk as disk_mod

    def broken(_):
        raise RuntimeError("checksum library gone")

    with DiskArena(str(tmp_path), 8, 8192, file_tag="wraise", io_threads=2) as arena:
        monkeypatch.setattr(disk_mod, "crc32", broken)
        with pytest.raises(RuntimeError, match="library gone"):
            arena.write_blocks([(s, H(s + 1), page_aligned(8192)) for s in range(8)])
        assert arena.blocks_written == 0


def test_accepts_any_contiguous_buffer(tmp_path):
    n = 10_000
    with DiskArena(str(tmp_path), 8, n, file_tag="buf") as arena:
        payload = os.urandom(n)
        sources = [
            payload, bytearray(payload), memoryview(payload),
            np.frombuffer(payload, np.uint8), np.frombuffer(payload, np.uint16).reshape(50, 100),
        ]
        assert arena.write_blocks([(i, H(100 + i), s) for i, s in enumerate(sources)]) == [True] * 5
        dests = [
            bytearray(n), memoryview(bytearray(n)), np.zeros(n, np.uint8), np.zeros((100, 25), np.float32),
        ]
        assert arena.read_blocks([(i, H(100 + i), d) for i, d in enumerate(dests)]) == [True] * 4
        for d in dests:
            assert bytes(memoryview(d).cast("B")) == payload


def test_overwrite_slot_with_new_block(tmp_path):
    rng = np.random.default_rng(1)
    with DiskArena(str(tmp_path), 4, 9000, file_tag="ow") as arena:
        a, b = rand_blocks(rng, 2, 9000)
        arena.write_blocks([(2, H(111), a)])
        arena.write_blocks([(2, H(222), b)])
        assert read_back(arena, 2, 111)[0] is False
        ok, got = read_back(arena, 2, 222)
        assert ok
        np.testing.assert_array_equal(got, b)


def test_caller_bugs_raise(tmp_path):
    with DiskArena(str(tmp_path), 4, 100, file_tag="bugs") as arena:
        with pytest.raises(ValueError, match="expected 100"):
            arena.write_blocks([(0, H(1), bytes(99))])
        with pytest.raises(IndexError, match="out of range"):
            arena.write_blocks([(4, H(1), bytes(100))])
        with pytest.raises(ValueError, match="twice"):
            arena.write_blocks([(1, H(1), bytes(100)), (1, H(2), bytes(100))])
        with pytest.raises(ValueError, match="16 bytes"):
            arena.write_blocks([(1, b"\x01" * 8, bytes(100))])  # a 64-bit hash of format 1
        with pytest.raises(ValueError, match="16 bytes"):
            arena.write_blocks([(1, 7, bytes(100))])
        with pytest.raises(ValueError, match="read-only"):
            arena.read_blocks([(0, H(1), bytes(100))])
        assert arena.write_blocks([]) == [] and arena.read_blocks([]) == []
        # a bad buffer inside a batch: raised, the other items still done and counted
        with pytest.raises(ValueError, match="expected 100"):
            arena.write_blocks([(0, H(1), bytes(100)), (1, H(2), bytes(7)), (2, H(3), bytes(100))])
        assert arena.blocks_written == 2 and arena.write_failures == 0
        with pytest.raises(ValueError, match="read-only"):
            arena.read_blocks([(0, H(1), bytearray(100)), (2, H(3), bytes(100))])
        assert arena.blocks_read == 1 and arena.read_failures == 0
    with pytest.raises(RuntimeError, match="closed"):
        arena.read_blocks([(0, H(1), bytearray(100))])


# ---- permissions and set-up errors --------------------------------------------------
def test_file_and_directory_modes(tmp_path):
    old = os.umask(0)  # a permissive umask must not widen anything
    try:
        d = tmp_path / "a" / "b" / "cache"
        with DiskArena(str(d), 2, 4096, file_tag="modes") as arena:
            assert (os.stat(arena.path).st_mode & 0o777) == 0o600
            assert (os.stat(d).st_mode & 0o777) == 0o700
    finally:
        os.umask(old)
    # an existing file with loose permissions is tightened
    os.chmod(arena.path, 0o644)
    with DiskArena(str(d), 2, 4096, file_tag="modes") as arena:
        assert (os.stat(arena.path).st_mode & 0o777) == 0o600


def test_not_a_directory(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR") as e:
        DiskArena(str(f), 2, 4096, file_tag="x")
    assert str(f) in str(e.value) and "not a directory" in str(e.value)
    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR") as e:
        DiskArena(str(f / "sub"), 2, 4096, file_tag="x")  # a parent is a file
    assert str(f / "sub") in str(e.value)


def test_data_file_symlink_refused(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious")
    (tmp_path / "kvbm-g3-ln.bin").symlink_to(target)
    with pytest.raises(DiskSetupError, match="symbolic link"):
        DiskArena(str(tmp_path), 2, 4096, file_tag="ln")
    assert target.read_bytes() == b"precious"


def test_second_instance_on_same_file_refused(tmp_path):
    with DiskArena(str(tmp_path), 2, 4096, file_tag="r0"):
        with pytest.raises(DiskSetupError, match="in use by another process"):
            DiskArena(str(tmp_path), 2, 4096, file_tag="r0")
        DiskArena(str(tmp_path), 2, 4096, file_tag="r1").close()  # another rank is fine


def test_reopen_keeps_blocks_and_resizes(tmp_path):
    rng = np.random.default_rng(2)
    (a,) = rand_blocks(rng, 1, 20000)
    with DiskArena(str(tmp_path), 8, 20000, file_tag="p") as arena:
        arena.write_blocks([(5, H(55), a)])
        arena.sync()
    with DiskArena(str(tmp_path), 8, 20000, file_tag="p") as arena:  # restart: same layout
        ok, got = read_back(arena, 5, 55)
        assert ok
        np.testing.assert_array_equal(got, a)
    with DiskArena(str(tmp_path), 16, 8000, file_tag="p") as arena:  # another layout
        assert os.path.getsize(arena.path) == 16 * arena.slot_size
        assert not any(read_back(arena, s, 55)[0] for s in range(16))
    with DiskArena(str(tmp_path), 2, 8000, file_tag="p") as arena:  # smaller: shrinks
        assert os.path.getsize(arena.path) == 2 * arena.slot_size


# ---- corruption and failed reads ----------------------------------------------------
@pytest.mark.parametrize("block,aligned", [(12345, False), (16384, True), (16384, False)])
def test_wrong_hash_and_empty_slot_are_misses(tmp_path, block, aligned):
    rng = np.random.default_rng(3)
    with DiskArena(str(tmp_path), 4, block, file_tag="h") as arena:
        (a,) = rand_blocks(rng, 1, block)
        arena.write_blocks([(1, H(42), a)])
        assert not read_back(arena, 1, 43, aligned)[0]
        assert not read_back(arena, 0, 42, aligned)[0]  # never written
        assert read_back(arena, 1, 42, aligned)[0]
        assert arena.mismatches == 2
        assert arena.checksum_failures == 0


@pytest.mark.parametrize("where", ["payload_start", "payload_end", "header_hash", "header_crc"])
@pytest.mark.parametrize("block,aligned", [(12345, False), (16384, True), (16384, False)])
def test_flipped_byte_on_disk_is_a_miss(tmp_path, where, block, aligned):
    rng = np.random.default_rng(4)
    with DiskArena(str(tmp_path), 4, block, file_tag="flip") as arena:
        assert arena.payload_offset == (4096 if block % 4096 == 0 else HEADER_SIZE)
        (a,) = rand_blocks(rng, 1, block)
        arena.write_blocks([(3, H(99), a)])
        arena.sync()
        assert read_back(arena, 3, 99, aligned)[0]
        base = 3 * arena.slot_size
        offset = {
            "payload_start": base + arena.payload_offset,
            "payload_end": base + arena.payload_offset + block - 1,
            "header_hash": base + 24,
            "header_crc": base + 40,
        }[where]
        flip_byte(arena.path, offset)
        assert not read_back(arena, 3, 99, aligned)[0]
        assert arena.checksum_failures == 1


def test_torn_write_is_a_miss(tmp_path):
    """A crash mid-overwrite: new header and half the new payload, old data after."""
    rng = np.random.default_rng(5)
    block = 64 * 1024
    with DiskArena(str(tmp_path), 2, block, file_tag="torn") as arena:
        old, new = rand_blocks(rng, 2, block)
        arena.write_blocks([(0, H(1), old)])
        arena.sync()
        with DiskArena(str(tmp_path / "scratch"), 1, block, file_tag="x") as other:
            other.write_blocks([(0, H(2), new)])  # the header/payload the torn write would carry
            other.sync()
            with open(other.path, "rb") as f:
                image = f.read(other.slot_size)
        fd = os.open(arena.path, os.O_RDWR)
        os.pwrite(fd, image[: arena.payload_offset + block // 2], 0)  # torn at half the payload
        os.fsync(fd)
        os.close(fd)
        for aligned in (False, True):
            assert not read_back(arena, 0, 1, aligned)[0]
            assert not read_back(arena, 0, 2, aligned)[0]


def test_truncated_file_is_a_short_read(tmp_path):
    rng = np.random.default_rng(6)
    with DiskArena(str(tmp_path), 4, 10000, file_tag="trunc") as arena:
        blocks = rand_blocks(rng, 4, 10000)
        arena.write_blocks([(i, H(10 + i), b) for i, b in enumerate(blocks)])
        arena.sync()
        os.truncate(arena.path, 2 * arena.slot_size + 5000)
        ok = arena.read_blocks([(i, H(10 + i), np.zeros(10000, np.uint8)) for i in range(4)])
        assert ok == [True, True, False, False]
        assert arena.read_failures == 2


@pytest.mark.parametrize("native_aio", [True, False], ids=["aio", "threads"])
def test_every_miss_in_one_batch_of_page_aligned_rows(tmp_path, caplog, native_aio):
    """The read path of pool rows (page-aligned, page-multiple blocks: read straight into the
    row, verified by the calling thread as reads land; through native AIO or the I/O threads)
    tells each miss apart within one batch, logs each kind once, and serves only the blocks that
    verify."""
    rng = np.random.default_rng(11)
    block = 16384
    with DiskArena(str(tmp_path), 8, block, file_tag="batch", io_threads=3, native_aio=native_aio) as arena:
        if native_aio and not arena.native_aio:
            pytest.skip("no native AIO with O_DIRECT on this filesystem")
        blocks = rand_blocks(rng, 8, block)
        slots = [0, 1, 2, 3, 4, 5, 7]  # slot 6 is never written
        assert all(arena.write_blocks([(i, H(100 + i), blocks[i]) for i in slots]))
        arena.sync()
        base = arena.payload_offset
        flip_byte(arena.path, 2 * arena.slot_size + base + 5)  # slot 2: payload
        flip_byte(arena.path, 3 * arena.slot_size + 30)  # slot 3: header (the hash)
        os.truncate(arena.path, 7 * arena.slot_size + base + block // 2)  # slot 7: cut short
        rows = [page_aligned(block) for _ in range(8)]
        want = [True, True, False, False, False, True, False, False]
        hashes = [H(100 + i) for i in range(8)]
        hashes[4] = H(999)  # slot 4 holds another block
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ok = arena.read_blocks([(i, hashes[i], rows[i]) for i in range(8)])
        assert ok == want
        for i in (0, 1, 5):
            np.testing.assert_array_equal(rows[i], blocks[i])
        assert (arena.checksum_failures, arena.mismatches, arena.read_failures) == (2, 2, 1)
        assert arena.blocks_read == 3
        messages = " ".join(r.getMessage() for r in caplog.records)
        assert "checksum mismatch" in messages and "corrupt block header" in messages and "short read" in messages


def _aio_arena(tmp_path, slots: int, block: int, seed: int, **kw) -> tuple[DiskArena, list[np.ndarray]]:
    """An arena whose loads go through native AIO, every slot written (block ``i`` in slot ``i``)."""
    arena = DiskArena(str(tmp_path / "g3"), slots, block, file_tag="aio", **kw)
    if not arena.native_aio:
        arena.close()
        pytest.skip("no native AIO with O_DIRECT on this filesystem")
    blocks = rand_blocks(np.random.default_rng(seed), slots, block)
    assert all(arena.write_blocks([(i, H(i + 1), b) for i, b in enumerate(blocks)]))
    arena.sync()
    return arena, blocks


def test_pool_row_loads_go_through_native_aio(tmp_path, monkeypatch):
    """With O_DIRECT, a load of page-aligned rows is one submission: no ``os.preadv`` and no I/O
    thread, runs of consecutive slots one request each, more requests than a context's depth
    submitted in waves; each block verified on its own and equal to what was stored."""
    import kvbm.storage.disk as disk_mod
    from kvbm.storage.aio import AioContext

    monkeypatch.setattr(disk_mod, "_AIO_DEPTH", 3)  # contexts made from here on hold 3 reads
    arena, blocks = _aio_arena(tmp_path, 64, 8192, seed=5, io_threads=2)
    with arena:
        arena._aio_free.get_nowait()  # drop the first context (depth 128): the next is made at depth 3
        requests: list[int] = []
        real = AioContext.preadv

        def counting(self, fd, offsets, *rest):
            requests.append(len(offsets))
            return real(self, fd, offsets, *rest)

        monkeypatch.setattr(AioContext, "preadv", counting)
        monkeypatch.setattr(os, "preadv", lambda *a: pytest.fail("os.preadv called on the AIO path"))
        _all_read_back(arena, blocks, [40, 7, 12, 13, 14, 11, 60, 3, 61, 25])  # 11-14 and 60-61 are runs
        # runs capped at ceil(10 / io_threads) = 5 slots: 3, 7, 11-14, 25, 40, 60-61
        assert requests == [6] and arena.blocks_read == 10


def test_failed_aio_read_is_retried_block_by_block(tmp_path, monkeypatch):
    """A run whose AIO read fails (or that the kernel refused) is read again one block at a time
    with ``os.preadv``: one bad request costs no block that can still be read."""
    from kvbm.storage.aio import AioContext

    arena, blocks = _aio_arena(tmp_path, 16, 8192, seed=6, io_threads=1)
    with arena:
        real = AioContext.preadv

        def failing_first(self, fd, offsets, iovecs, first, counts, done):
            def report(reqs, res):
                res = res.copy()
                res[reqs == 0] = -errno.EIO  # the run of slots 2-5 (the lowest slots come first)
                done(reqs, res)
            return real(self, fd, offsets, iovecs, first, counts, report)

        monkeypatch.setattr(AioContext, "preadv", failing_first)
        reread: list[int] = []
        real_preadv = os.preadv
        monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: reread.append(off) or real_preadv(fd, bufs, off))
        _all_read_back(arena, blocks, [9, 2, 3, 4, 5])
        assert reread == [s * arena.slot_size for s in (2, 3, 4, 5)]  # the failed run, block by block
        assert arena.read_failures == 0


def test_io_error_on_the_page_aligned_path_is_a_failure(tmp_path):
    """The same as below for pool rows (read straight into the row): an OSError of the read is a
    miss of that block, counted, never an exception."""
    block = 8192
    with DiskArena(str(tmp_path / "g3"), 4, block, file_tag="eio2") as arena:
        assert all(arena.write_blocks([(i, H(i + 1), rand_blocks(np.random.default_rng(i), 1, block)[0])
                                       for i in range(4)]))
        dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
        saved = os.dup(arena._fd)
        os.dup2(dfd, arena._fd)
        os.close(dfd)
        try:
            ok = arena.read_blocks([(i, H(i + 1), page_aligned(block)) for i in range(4)])
        finally:
            os.dup2(saved, arena._fd)
            os.close(saved)
        assert ok == [False] * 4 and arena.read_failures == 4


def test_io_errors_are_failures_not_exceptions(tmp_path, caplog):
    """Reads and writes that the kernel fails (for root too): the arena's fd
    number is made to refer to a directory, so pread/pwrite get EISDIR/EBADF.
    (A true EIO needs device-mapper's error target, unavailable here.)"""
    rng = np.random.default_rng(7)
    with DiskArena(str(tmp_path / "g3"), 4, 10000, file_tag="eio") as arena:
        blocks = rand_blocks(rng, 4, 10000)
        assert all(arena.write_blocks([(i, H(i + 1), b) for i, b in enumerate(blocks)]))
        dfd = os.open(str(tmp_path), os.O_RDONLY | os.O_DIRECTORY)
        saved = os.dup(arena._fd)
        os.dup2(dfd, arena._fd)
        os.close(dfd)
        try:
            with caplog.at_level(logging.WARNING, logger=LOGGER):
                for _ in range(3):
                    ok = arena.read_blocks([(i, H(i + 1), np.zeros(10000, np.uint8)) for i in range(4)])
                    assert ok == [False] * 4
                    assert arena.write_blocks([(0, H(1), blocks[0]), (1, H(2), blocks[1])]) == [False, False]
        finally:
            os.dup2(saved, arena._fd)
            os.close(saved)
        assert arena.read_failures == 12
        assert arena.write_failures == 6
        reads = [r for r in caplog.records if "read failed" in r.getMessage()]
        writes = [r for r in caplog.records if "write failed" in r.getMessage()]
        assert len(reads) == 1 and len(writes) == 1  # logged once per kind
        # the file itself is intact again
        ok, got = read_back(arena, 3, 4)
        assert ok
        np.testing.assert_array_equal(got, blocks[3])


# ---- full disks and fallocate refusals ----------------------------------------------
def test_too_small_filesystem_refused(mount):
    mnt = mount("tmpfs", "size=2M")
    with pytest.raises(DiskSetupError) as e:
        DiskArena(str(mnt / "g3"), 64, 64 * 1024, file_tag="big")
    msg = str(e.value)
    assert "DYN_KVBM_DISK_CACHE_GB" in msg and "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS" in msg
    assert "DYN_KVBM_DISK_CACHE_DIR" in msg and "free" in msg and str(mnt / "g3") in msg
    assert not (mnt / "g3" / "kvbm-g3-big.bin").exists()  # no half-made file left behind


def test_write_on_full_disk_returns_false(mount, caplog):
    mnt = mount("tmpfs", "size=2M")
    rng = np.random.default_rng(8)
    with DiskArena(str(mnt / "g3"), 8, 60000, file_tag="full") as arena:  # a tmpfs root is 1777: not private
        blocks = rand_blocks(rng, 8, 60000)
        # Lose the reserved space (as if the file were truncated) and let
        # something else fill the filesystem: writes now hit ENOSPC.
        os.truncate(arena.path, 0)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            ok = arena.write_blocks([(i, H(i + 1), b) for i, b in enumerate(blocks)])
        assert ok == [False] * 8
        assert arena.write_failures == 8
        assert "ENOSPC" in caplog.text or "No space" in caplog.text
        assert not any(read_back(arena, i, i + 1)[0] for i in range(8))


def test_fallocate_refusal_names_zerofill(tmp_path, monkeypatch, caplog):
    def refuse(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK=true") as e:
        DiskArena(str(tmp_path), 40, 100_000, file_tag="nofa", fallocate=refuse)
    assert str(tmp_path) in str(e.value)
    assert not (tmp_path / "kvbm-g3-nofa.bin").exists()

    monkeypatch.setattr(disk_file_mod, "_ZERO_CHUNK", 1 << 20)
    monkeypatch.setattr(disk_file_mod, "_PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger=FILE_LOGGER):
        arena = DiskArena(
            str(tmp_path), 40, 100_000, file_tag="nofa", fallocate=refuse, zerofill_fallback=True
        )
    with arena:
        st = os.stat(arena.path)
        assert st.st_size == 40 * arena.slot_size
        assert st.st_blocks * 512 >= st.st_size  # really allocated, not sparse
        assert "%" in caplog.text and "GB/s" in caplog.text  # progress was shown
        (a,) = rand_blocks(np.random.default_rng(9), 1, 100_000)
        assert arena.write_blocks([(39, H(7), a)]) == [True]
        ok, got = read_back(arena, 39, 7)
        assert ok
        np.testing.assert_array_equal(got, a)


def test_fallocate_refused_by_real_filesystem(mount, tmp_path):
    """ext2 has no fallocate; glibc's emulation cannot work on an O_DIRECT fd."""
    if shutil.which("mkfs.ext2") is None:
        pytest.skip("mkfs.ext2 not installed")
    image = tmp_path / "ext2.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(["mkfs.ext2", "-q", "-F", str(image)], check=True, capture_output=True)
    mnt = mount("ext2", "loop", source=str(image))
    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_ZEROFILL_FALLBACK"):
        DiskArena(str(mnt), 16, 100_000, file_tag="e2")
    with DiskArena(str(mnt), 16, 100_000, file_tag="e2", zerofill_fallback=True) as arena:
        assert arena.o_direct
        assert os.path.getsize(arena.path) == 16 * arena.slot_size
        (a,) = rand_blocks(np.random.default_rng(10), 1, 100_000)
        assert arena.write_blocks([(15, H(3), a)]) == [True]
        ok, got = read_back(arena, 15, 3)
        assert ok
        np.testing.assert_array_equal(got, a)


def test_unexpected_fallocate_error_is_setup_error(tmp_path):
    def broken(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR"):
        DiskArena(str(tmp_path), 4, 4096, file_tag="eio", fallocate=broken)


def test_fallocate_enospc_via_seam_names_sizes(tmp_path):
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_GB") as e:
        DiskArena(str(tmp_path), 4, 4096, file_tag="nospace", fallocate=full)
    assert "GB requested" in str(e.value) and "free" in str(e.value)


# ---- O_DIRECT fallback -------------------------------------------------------------
def _no_o_direct_dir(mount) -> Path:
    """A directory whose filesystem refuses O_DIRECT: ramfs (or an old-kernel tmpfs)."""
    probe = probe_disk("/dev/shm")
    if probe["o_direct"] is False:
        return Path("/dev/shm")
    return mount("ramfs")  # skips if mounting is not permitted


def test_o_direct_refused_falls_back_with_one_warning(mount, caplog, tmp_path):
    base = _no_o_direct_dir(mount)
    d = base / f"kvbm-test-{os.getpid()}-{tmp_path.name}"
    rng = np.random.default_rng(11)
    try:
        with caplog.at_level(logging.WARNING, logger=FILE_LOGGER):
            arenas = [DiskArena(str(d), 4, 10000, file_tag=f"r{i}") for i in range(3)]
        warnings = [r for r in caplog.records if "O_DIRECT" in r.getMessage()]
        assert len(warnings) == 1
        msg = warnings[0].getMessage()
        assert str(d) in msg and "DYN_KVBM_DISK_DISABLE_O_DIRECT" in msg
        for arena in arenas:
            assert not arena.o_direct
            blocks = rand_blocks(rng, 4, 10000)
            assert all(arena.write_blocks([(i, H(i + 5), b) for i, b in enumerate(blocks)]))
            arena.sync()
            for i, b in enumerate(blocks):
                ok, got = read_back(arena, i, i + 5)
                assert ok
                np.testing.assert_array_equal(got, b)
            arena.close()
        # choosing buffered I/O explicitly does not warn
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger=FILE_LOGGER):
            DiskArena(str(d / "explicit"), 2, 4096, file_tag="x", disable_o_direct=True).close()
        assert not caplog.records
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- probe ----------------------------------------------------------------------
def test_probe(tmp_path):
    report = probe_disk(str(tmp_path))
    assert report["exists"] and report["writable"]
    assert report["fallocate"] is True and report["o_direct"] is True
    assert report["free_bytes"] > 0 and report["filesystem"]
    assert not [p for p in tmp_path.iterdir()]  # leaves nothing behind

    missing = probe_disk(str(tmp_path / "not" / "yet"))
    assert missing["exists"] is False and missing["probed"] == str(tmp_path)

    f = tmp_path / "file"
    f.write_text("x")
    assert "not a directory" in probe_disk(str(f))["error"]


def test_probe_reports_missing_o_direct(mount):
    ramfs = mount("ramfs")
    report = probe_disk(str(ramfs))
    assert report["o_direct"] is False and report["o_direct_error"]
    assert report["filesystem"] == "ramfs"
