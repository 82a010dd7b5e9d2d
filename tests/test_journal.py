"""The leader's disk index: round trips, torn tails, identity, compaction, SIGKILL."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import pytest

from kvbm.storage import journal as journal_mod
from kvbm.storage.files import DiskSetupError
from kvbm.storage.journal import DiskJournal

ID = "model=m;dtype=bf16;block=16;tp=1;bytes=65536"
ROOT = Path(__file__).resolve().parent.parent


def H(n: int) -> bytes:
    """A 128-bit block hash from a number (tests name blocks by number)."""
    return n.to_bytes(16, "little")


def hs(entries) -> list[tuple[bytes, int]]:
    return [(H(h), s) for h, s in entries]


def ints(state: dict[bytes, int]) -> dict[int, int]:
    return {int.from_bytes(h, "little"): s for h, s in state.items()}


def reopen(path: Path, identity: str = ID) -> dict[int, int]:
    """What a restart would load from ``path`` now. Loaded from a copy: the journal may still be
    open (and locked) by the test's writer, and loading may rewrite what it reads."""
    with tempfile.TemporaryDirectory() as elsewhere:  # not next to it: the test's disk may be full
        copy = os.path.join(elsewhere, path.name)
        shutil.copyfile(path, copy)
        with DiskJournal(copy, identity=identity) as j:
            return ints(j.load())


def test_round_trip(tmp_path):
    path = tmp_path / "g3.journal"
    j = DiskJournal(str(path), identity=ID)
    assert j.load() == {}
    entries = [(random.getrandbits(64), slot) for slot in range(100)]
    j.record_stored(hs(entries))
    assert j.flush()
    j.close()
    assert reopen(path) == dict(entries)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_evictions_and_slot_reuse(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(11, 1), (22, 2), (33, 3)]))
    j.record_evicted([2])
    j.record_stored(hs([(44, 3)]))  # slot 3 reused: 33 is gone
    j.record_stored(hs([(11, 5)]))  # 11 moved: slot 1 is empty
    j.record_evicted([9])  # an empty slot: no-op
    j.flush()
    assert ints(j.snapshot()) == {44: 3, 11: 5}
    assert reopen(path) == {44: 3, 11: 5}
    # evicting the moved hash's old slot must not drop it
    j.record_evicted([1])
    j.flush()
    assert reopen(path) == {44: 3, 11: 5}


def test_unflushed_records_are_not_reported(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(1, 10)]))
    j.flush()
    j.record_stored(hs([(2, 20)]))
    j.record_evicted([10])
    # "crash": no flush, no close
    assert reopen(path) == {1: 10}


def test_torn_tail_is_cut_and_appends_resume(tmp_path, caplog):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(h, h % 50) for h in range(1000, 1040)]))
    j.flush()
    good = path.stat().st_size
    j.record_stored(hs([(5000, 7), (5001, 8)]))
    j.flush()
    j.close()
    # tear the last record in half: its slot (8) must not be reported
    os.truncate(path, path.stat().st_size - 13)
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        j2 = DiskJournal(str(path), identity=ID)
        state = ints(j2.load())
    expected = {h: h % 50 for h in range(1000, 1040)}
    expected = {h: s for h, s in expected.items() if s != 7}
    expected[5000] = 7
    assert state == expected
    assert 5001 not in state  # the torn record's mapping is not reported...
    assert state[1008] == 8  # ...and slot 8 keeps what durable records say it holds
    assert "ignoring" in caplog.text
    assert path.stat().st_size == good + 40  # torn bytes cut off
    # new records after the cut are visible on the next load
    j2.record_stored(hs([(6000, 8)]))
    j2.flush()
    j2.close()
    del expected[1008]  # slot 8 reused
    assert reopen(path) == {**expected, 6000: 8}


def test_garbage_tail_is_ignored(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(1, 1), (2, 2)]))
    j.flush()
    j.close()
    with open(path, "ab") as f:
        f.write(os.urandom(1000))
    j2 = DiskJournal(str(path), identity=ID)
    assert ints(j2.load()) == {1: 1, 2: 2}
    j2.record_evicted([1])
    j2.flush()
    j2.close()
    assert reopen(path) == {2: 2}


def flip(path: Path, offset: int, mask: int = 0x01) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def test_corrupt_record_costs_only_itself(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(1, 1)]))
    j.flush()
    offset = path.stat().st_size
    j.record_stored(hs([(2, 2), (3, 3)]))
    j.flush()
    j.close()
    flip(path, offset + 16)  # one bit of the hash of (2, 2)
    assert reopen(path) == {1: 1, 3: 3}  # never a wrong hash; the records after it survive


@pytest.mark.parametrize("where", ["marker", "kind", "slot", "hash", "crc", "padding_or_next"])
def test_flipped_byte_in_record_10_of_100_loses_only_record_10(tmp_path, caplog, where):
    """Issue 13 item 7: one flipped byte must not truncate the 90 good records after it."""
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    start = path.stat().st_size
    j.record_stored(hs([(1000 + i, i) for i in range(100)]))
    j.flush()
    j.close()
    rec = start + 9 * 40  # record 10 (1-based)
    flip(path, rec + {"marker": 1, "kind": 4, "slot": 9, "hash": 20, "crc": 33, "padding_or_next": 38}[where], 0xFF)
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        j2 = DiskJournal(str(path), identity=ID)
        state = ints(j2.load())
    expected = {1000 + i: i for i in range(100)}
    if where != "padding_or_next":  # the 4 zero bytes after the crc are not covered: harmless
        del expected[1009]
        assert j2.damaged_records == 1
        assert "skipped 1 damaged record" in caplog.text
    assert state == expected
    # The damage is rewritten away: the next load is clean and appends work.
    j2.record_stored(hs([(5000, 200)]))
    j2.flush()
    j2.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        assert reopen(path) == {**expected, 5000: 200}
    assert "damaged" not in caplog.text


def test_damage_in_several_places_and_a_torn_tail(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    start = path.stat().st_size
    j.record_stored(hs([(i, i) for i in range(50)]))
    j.flush()
    j.close()
    for k in (0, 7, 8, 30):  # the first record, two neighbours, one more
        flip(path, start + k * 40 + 20)
    with open(path, "ab") as f:
        f.write(b"KVJR" + os.urandom(17))  # a torn record at the end, starting with a marker
    state = reopen(path)
    assert state == {i: i for i in range(50) if i not in (0, 7, 8, 30)}


def test_pending_records_are_bounded_while_flushes_fail(tmp_path, caplog):
    """Issue 13 item 8: with the file unwritable, pending records stop growing;
    the oldest are dropped (counted, logged once), and once writes work again
    the kept ones are written; the state in memory stays exact."""
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID, max_pending=100, auto_compact=False)
    j.load()
    j.record_stored(hs([(1, 1)]))
    assert j.flush()
    real_fd = j._fd
    j._fd = os.open(path, os.O_RDONLY)  # writes now fail with EBADF, like a dead disk would
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        for batch in range(20):
            j.record_stored(hs([(1000 + batch * 50 + i, 2 + (batch * 50 + i) % 500) for i in range(50)]))
            assert not j.flush()
            assert j.num_pending <= 100
    assert j.dropped_records == 20 * 50 - 100
    assert sum("dropping the oldest" in r.getMessage() for r in caplog.records) == 1
    assert sum("cannot write disk index" in r.getMessage() for r in caplog.records) == 1  # not one per step
    os.close(j._fd)
    j._fd = real_fd
    assert j.flush()
    assert j.num_pending == 0
    j.close()
    durable = reopen(path)
    # Only the newest 100 reached the file; every entry it has is true.
    newest = {1000 + k: 2 + k % 500 for k in range(900, 1000)}
    assert durable == {1: 1, **newest}
    assert set(durable.items()) <= set(ints(j.snapshot()).items())


def test_identity_mismatch_loads_empty(tmp_path, caplog):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(1, 1)]))
    j.flush()
    j.close()
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        other = DiskJournal(str(path), identity=ID.replace("bf16", "fp16"))
        assert other.load() == {}
    assert "another model/layout" in caplog.text
    other.record_stored(hs([(9, 9)]))
    other.flush()
    other.close()
    # the file now belongs to the new identity; the old one finds nothing usable
    assert reopen(path, ID.replace("bf16", "fp16")) == {9: 9}
    assert reopen(path, ID) == {}


@pytest.mark.parametrize("content", [b"", b"KVBM", b"not a journal at all" * 10])
def test_foreign_or_empty_file_loads_empty(tmp_path, content):
    path = tmp_path / "j"
    path.write_bytes(content)
    assert reopen(path) == {}
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored(hs([(1, 2)]))
    j.flush()
    assert reopen(path) == {1: 2}


def test_compact_preserves_state(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID, auto_compact=False)
    j.load()
    rng = random.Random(0)
    for _ in range(50):
        j.record_stored(hs([(rng.getrandbits(64), rng.randrange(64)) for _ in range(20)]))
        j.record_evicted([rng.randrange(64) for _ in range(5)])
        j.flush()
    before = ints(j.snapshot())
    size_before = path.stat().st_size
    j.record_stored(hs([(123, 63)]))  # pending records are included
    before[123] = 63
    before = {h: s for h, s in before.items() if s != 63 or h == 123}
    j.compact()
    assert ints(j.snapshot()) == before
    assert path.stat().st_size < size_before
    assert j.num_records == len(before)
    assert reopen(path) == before
    assert not list(tmp_path.glob("*.tmp*"))
    j.record_evicted([63])
    j.flush()
    del before[123]
    assert reopen(path) == before


def test_auto_compaction(tmp_path, monkeypatch):
    monkeypatch.setattr(journal_mod, "_COMPACT_MIN_RECORDS", 64)
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    for i in range(200):
        j.record_stored(hs([(i, i % 4)]))
        j.flush()
    assert j.num_records < 64
    assert path.stat().st_size < 64 * 32 + 200
    assert reopen(path) == {196: 0, 197: 1, 198: 2, 199: 3}


def test_flush_failure_on_full_disk_is_retried(tmp_path):
    """A real ENOSPC (a small tmpfs): flush returns False, nothing partial is left
    behind, and the records go out once there is room again."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here ({r.stderr.strip()}); needs CAP_SYS_ADMIN")
    try:
        path = mnt / "j"
        j = DiskJournal(str(path), identity=ID, auto_compact=False)
        j.load()
        j.record_stored(hs([(1, 1)]))
        assert j.flush()
        durable = path.stat().st_size
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError as e:
            assert e.errno == errno.ENOSPC
        finally:
            os.close(fd)
        j.record_stored(hs([(h, h % 64) for h in range(100, 400)]))  # ~10 KB: cannot fit
        assert not j.flush()
        assert path.stat().st_size == durable  # cut back: no torn record hides later ones
        assert reopen(path) == {1: 1}
        filler.unlink()
        assert j.flush()
        j.close()
        expected = {1: 1}
        for h in range(100, 400):
            expected = {k: v for k, v in expected.items() if v != h % 64}
            expected[h] = h % 64
        assert reopen(path) == expected
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


CHILD = textwrap.dedent(
    """
    import random, sys
    from kvbm.storage import journal as journal_mod
    from kvbm.storage.journal import DiskJournal

    journal_mod._COMPACT_MIN_RECORDS = 200  # compact often: a kill may land inside one
    path, seed = sys.argv[1], int(sys.argv[2])
    j = DiskJournal(path, identity="crash-test")
    assert j.load() == {}
    rng = random.Random(seed)
    batch = 0
    while True:
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.7:
                j.record_stored([(rng.getrandbits(64).to_bytes(16, "little"), rng.randrange(32))])
            else:
                j.record_evicted([rng.randrange(32)])
        j.flush()
        batch += 1
        print(batch, flush=True)
    """
)


def _model_states(seed: int, batches: int) -> list[tuple[int, dict[int, int]]]:
    """(batch index, state) after every op of the child's first ``batches`` batches."""
    rng = random.Random(seed)
    slot_of: dict[int, int] = {}
    hash_of: dict[int, int] = {}
    states = [(0, {})]
    for b in range(1, batches + 1):
        for _ in range(rng.randrange(1, 30)):
            if rng.random() < 0.7:
                h, s = rng.getrandbits(64), rng.randrange(32)
                old = hash_of.pop(s, None)
                if old is not None:
                    slot_of.pop(old, None)
                if h in slot_of:
                    hash_of.pop(slot_of[h], None)
                slot_of[h] = s
                hash_of[s] = h
            else:
                s = rng.randrange(32)
                old = hash_of.pop(s, None)
                if old is not None:
                    slot_of.pop(old, None)
            states.append((b - 1, dict(slot_of)))
        states.append((b, dict(slot_of)))
    return states


@pytest.mark.parametrize("seed,kill_after", [(1, 3), (2, 40), (3, 150), (4, 400)])
def test_sigkill_keeps_a_flushed_prefix(tmp_path, seed, kill_after):
    path = tmp_path / "crash.journal"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(path), str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    acked = 0
    try:
        deadline = time.monotonic() + 60
        while acked < kill_after:
            line = proc.stdout.readline()
            assert line, f"child died early: {proc.stderr.read()}"
            acked = int(line)
            assert time.monotonic() < deadline, "child too slow"
        time.sleep(random.Random(seed).random() * 0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    state = ints(DiskJournal(str(path), identity="crash-test").load())
    # The child may have flushed more batches after the last ack; allow for many.
    candidates = _model_states(seed, acked + 2000)
    matches = [b for b, s in candidates if s == state]
    assert matches, "recovered state is not any prefix of what was journaled"
    assert max(matches) >= acked, f"lost acknowledged batches: recovered {max(matches)}, acked {acked}"


# ---- hostile files and start-up errors (issue 13 items 5 and 8) ----------------------
def test_planted_symlink_journal_is_refused_never_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "j"
    path.symlink_to(victim)
    j = DiskJournal(str(path), identity=ID)
    with pytest.raises(DiskSetupError, match="symbolic link") as e:
        j.load()
    assert "DYN_KVBM_DISK_CACHE_DIR" in str(e.value)
    assert victim.read_bytes() == b"precious" and path.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
def test_journal_of_another_user_is_refused(tmp_path):
    j = DiskJournal(str(tmp_path / "j"), identity=ID)
    j.load()
    j.record_stored(hs([(1, 1)]))
    j.close()
    os.chown(tmp_path / "j", 54321, 54321)
    with pytest.raises(DiskSetupError, match="belongs to uid 54321"):
        DiskJournal(str(tmp_path / "j"), identity=ID).load()


def test_temp_file_is_fresh_never_a_planted_name(tmp_path):
    """The rewrite used to open ``<journal>.tmp.<pid>`` with O_TRUNC, following links:
    a planted link there made the server (often root) overwrite any file."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "j"
    (tmp_path / f"j.tmp.{os.getpid()}").symlink_to(victim)
    j = DiskJournal(str(path), identity=ID, auto_compact=False)
    assert j.load() == {}
    j.record_stored(hs([(1, 1)]))
    j.compact()
    j.close()
    assert victim.read_bytes() == b"precious"
    assert reopen(path) == {1: 1}
    assert not list(tmp_path.glob(".j.*.tmp"))  # no temp file left behind


def test_format_1_journal_is_ignored_with_one_line(tmp_path, caplog):
    """A journal of 64-bit hashes (format 1) is never misread: empty, one warning, replaced."""
    path = tmp_path / "j"
    head = journal_mod._HEAD.pack(journal_mod.MAGIC, 1, len(ID)) + ID.encode()
    body = struct.pack("<B7xQQ", 1, 12345, 3)
    rec = body + struct.pack("<I", zlib.crc32(body)) + bytes(4)
    path.write_bytes(head + struct.pack("<I", zlib.crc32(head)) + rec * 10)
    with caplog.at_level(logging.INFO, logger="kvbm.storage.journal"), DiskJournal(str(path), identity=ID) as j:
        assert j.load() == {}
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "format version 1" in warnings[0]
    assert journal_mod._HEAD.unpack_from(path.read_bytes())[1] == journal_mod.FORMAT_VERSION


@pytest.mark.parametrize("how", ["read-only", "full"])
def test_start_up_on_unwritable_or_full_directory_names_the_setting(tmp_path, how):
    """Issue 13 item 8: this was a raw OSError (EROFS / ENOSPC) from the leader's constructor."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    opts = "size=64k,ro" if how == "read-only" else "size=64k"
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here ({r.stderr.strip()}); needs CAP_SYS_ADMIN")
    try:
        if how == "full":
            fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                with pytest.raises(OSError):
                    while True:
                        os.write(fd, b"\0" * 4096)
            finally:
                os.close(fd)
        j = DiskJournal(str(mnt / "j"), identity="x" * 10000)
        with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR") as e:
            j.load()
        assert str(mnt / "j") in str(e.value) and "DYN_KVBM_DISK_PERSIST" in str(e.value)
        # no temp file left behind (the lock file of an index is not one: it stays, empty)
        assert not [p for p in mnt.iterdir() if p.name not in ("filler", "j.lock")]
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_leader_shutdown_closes_the_journal(tmp_path):
    """Issue 13 item 8: shutdown left the journal open and its pending records unwritten."""
    from kvbm.runtime.leader import LeaderRuntime
    from kvbm.storage.journal import JournalWriter

    j = DiskJournal(str(tmp_path / "j"), identity=ID)
    j.load()
    j.record_stored(hs([(7, 3)]))  # pending, not flushed
    leader = LeaderRuntime.__new__(LeaderRuntime)  # close needs only the journal (exporter, trace: None)
    leader.journal = j
    leader.journal_writer = JournalWriter(j)
    leader.close()
    assert j._fd < 0 and leader.journal is None
    assert reopen(tmp_path / "j") == {7: 3}
    leader.close()  # twice is fine


def test_damaged_journal_on_a_full_disk_still_loads(tmp_path, caplog):
    """The clean rewrite after damage needs room; without it the journal is used as it is."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here ({r.stderr.strip()}); needs CAP_SYS_ADMIN")
    try:
        path = mnt / "j"
        j = DiskJournal(str(path), identity=ID)
        j.load()
        start = path.stat().st_size
        j.record_stored(hs([(1000 + i, i) for i in range(100)]))
        j.close()
        flip(path, start + 9 * 40 + 20)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with pytest.raises(OSError):
                while True:
                    os.write(fd, b"\0" * 512)
        finally:
            os.close(fd)
        expected = {1000 + i: i for i in range(100) if i != 9}
        with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"), DiskJournal(str(path), identity=ID) as j:
            assert ints(j.load()) == expected  # no exception, the damage still costs one record
        assert "could not be rewritten" in caplog.text
        (mnt / "filler").unlink()
        j2 = DiskJournal(str(path), identity=ID)
        j2.load()
        j2.record_stored(hs([(7, 500)]))
        j2.close()
        assert reopen(path) == {**expected, 7: 500}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---- data-parallel engines: one index each, locked ---------------------------------------


def dp_leader(directory: Path, dp_rank: int):
    from kvbm.config import KvbmConfig
    from kvbm.runtime.leader import EngineInfo, LeaderRuntime
    from kvbm.runtime.sizing import TierPlan, TierSizes

    cfg = KvbmConfig(disk_persist=True, disk_cache_dir=str(directory))
    engine = EngineInfo(block_size=16, world_size=1, engine_id=None, block_bytes=1024, gpu_blocks=16,
                        storage_key="model-k", max_num_batched_tokens=64, data_parallel_rank=dp_rank,
                        data_parallel_rank_local=dp_rank)
    return LeaderRuntime(cfg, TierPlan.configured(cfg, TierSizes(8, 64, 1024)), engine, identity=ID)


def test_data_parallel_engines_each_persist_their_own_disk_index(tmp_path, caplog):
    """Issue: two DP engines appended to one unlocked index (named by model only); after a
    restart each engine restored the other's entries for its own data file, and its own were lost."""
    cache = tmp_path / "g3"
    engines = [dp_leader(cache, 0), dp_leader(cache, 1)]
    assert engines[0].journal.path != engines[1].journal.path
    for step in range(4):  # interleaved, as two engines serving at once; same slots, other blocks
        for dp, rt in enumerate(engines):
            rt.journal.record_stored(hs([(1000 * (dp + 1) + step, step)]))
            rt.journal.flush()
    for rt in engines:
        rt.close()
    with caplog.at_level(logging.INFO, logger="kvbm.runtime.leader"):
        restarted = [dp_leader(cache, 0), dp_leader(cache, 1)]
    try:
        for dp, rt in enumerate(restarted):
            assert ints(rt.journal.snapshot()) == {1000 * (dp + 1) + step: step for step in range(4)}
        assert caplog.text.count("reusing 4 G3 blocks") == 2
    finally:
        for rt in restarted:
            rt.close()


def test_a_single_engine_keeps_its_index_name_and_restores(tmp_path):
    from kvbm.storage.files import g3_journal_path

    assert g3_journal_path(str(tmp_path), "model-k") == g3_journal_path(str(tmp_path), "model-k", 0)
    rt = dp_leader(tmp_path / "g3", 0)
    rt.journal.record_stored(hs([(7, 3)]))
    rt.close()
    rt = dp_leader(tmp_path / "g3", 0)
    try:
        assert ints(rt.journal.snapshot()) == {7: 3}
    finally:
        rt.close()


def test_a_second_process_on_the_same_index_is_refused(tmp_path):
    """The index is written by one process: a second one (same directory and model and DP rank)
    is refused at start-up, naming the setting, instead of interleaving two histories."""
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    code = textwrap.dedent(f"""
        from kvbm.storage.files import DiskSetupError
        from kvbm.storage.journal import DiskJournal
        try:
            DiskJournal({str(path)!r}, identity={ID!r}).load()
        except DiskSetupError as e:
            print("REFUSED", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "REFUSED" in out.stdout and "in use by another process" in out.stdout, out
    assert "DYN_KVBM_DISK_CACHE_DIR" in out.stdout
    j.close()  # released: the next server may take it
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0 and "REFUSED" not in out.stdout, out


def test_the_step_thread_never_fsyncs_the_journal(tmp_path, monkeypatch):
    """Commits go to the writer thread: fdatasync (and a compaction's fsync) run there, never on
    the thread that submits them (vLLM's scheduler thread)."""
    import threading

    from kvbm.storage import journal as journal_mod
    from kvbm.storage.journal import JournalWriter

    callers: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(journal_mod.os, "fdatasync", lambda fd: (callers.append(threading.current_thread().name),
                                                                 real(fd))[1])
    writer = JournalWriter(DiskJournal(str(tmp_path / "w.journal"), identity=ID))
    writer.journal.load()
    for step in range(50):
        writer.submit([H(step)], [step])
    assert writer.wait_idle(10)
    assert callers and set(callers) == {"kvbm-journal"}
    writer.close()
    with DiskJournal(str(tmp_path / "w.journal"), identity=ID) as again:
        assert ints(again.load()) == {step: step for step in range(50)}


def test_large_batches_pack_byte_for_byte_and_replay(tmp_path):
    """Batches past _VECTOR_MIN are packed by numpy, in chunks: the same bytes as one record at a
    time, so a compaction of a large index and a large flush replay exactly."""
    rng = random.Random(7)
    n = journal_mod._VECTOR_MIN + 2 * journal_mod._VECTOR_CHUNK + 3  # several chunks and a remainder
    hashes = [rng.getrandbits(128).to_bytes(16, "little") for _ in range(n)]
    slots = [rng.getrandbits(64) for _ in range(n)]
    for kind in (journal_mod._STORED, journal_mod._EVICTED):
        one_by_one = b"".join(journal_mod._record(kind, h, s) for h, s in zip(hashes, slots))
        assert journal_mod._records(kind, hashes, slots) == one_by_one
    path = tmp_path / "g3.journal"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    entries = hs([(i * 7919, i) for i in range(n)] + [(5, 3), (1, 10**6)])  # a moved hash, a reused slot
    j.record_stored_columns([h for h, _ in entries], [s for _, s in entries])
    assert j.flush()
    expected = ints(j.snapshot())
    assert reopen(path) == expected
    tuples = DiskJournal(str(tmp_path / "tuples.journal"), identity=ID)
    tuples.load()
    tuples.record_stored(entries)  # the one-tuple-per-entry API: the same file
    assert tuples.flush() and (tmp_path / "tuples.journal").read_bytes() == path.read_bytes()
    tuples.close()
    j.compact()
    assert reopen(path) == expected
    j.close()


def test_a_bad_entry_in_a_large_batch_raises_as_one_by_one(tmp_path):
    j = DiskJournal(str(tmp_path / "g3.journal"), identity=ID)
    j.load()
    entries = hs([(i, i) for i in range(journal_mod._VECTOR_MIN)]) + [(b"short", 1)]
    with pytest.raises(ValueError, match="is not 16 bytes"):
        j.record_stored_columns([h for h, _ in entries], [s for _, s in entries])
    assert len(j) == journal_mod._VECTOR_MIN  # the entries before it were recorded, as one by one does
    j.close()
