"""The leader's disk index: round trips, torn tails, identity, compaction, SIGKILL."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvbm.storage import journal as journal_mod
from kvbm.storage.journal import DiskJournal

ID = "model=m;dtype=bf16;block=16;tp=1;bytes=65536"
ROOT = Path(__file__).resolve().parent.parent


def reopen(path: Path, identity: str = ID) -> dict[int, int]:
    return DiskJournal(str(path), identity=identity).load()


def test_round_trip(tmp_path):
    path = tmp_path / "g3.journal"
    j = DiskJournal(str(path), identity=ID)
    assert j.load() == {}
    entries = [(random.getrandbits(64), slot) for slot in range(100)]
    j.record_stored(entries)
    assert j.flush()
    j.close()
    assert reopen(path) == dict(entries)
    assert (path.stat().st_mode & 0o777) == 0o600


def test_evictions_and_slot_reuse(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored([(11, 1), (22, 2), (33, 3)])
    j.record_evicted([2])
    j.record_stored([(44, 3)])  # slot 3 reused: 33 is gone
    j.record_stored([(11, 5)])  # 11 moved: slot 1 is empty
    j.record_evicted([9])  # an empty slot: no-op
    j.flush()
    assert j.snapshot() == {44: 3, 11: 5}
    assert reopen(path) == {44: 3, 11: 5}
    # evicting the moved hash's old slot must not drop it
    j.record_evicted([1])
    j.flush()
    assert reopen(path) == {44: 3, 11: 5}


def test_unflushed_records_are_not_reported(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored([(1, 10)])
    j.flush()
    j.record_stored([(2, 20)])
    j.record_evicted([10])
    # "crash": no flush, no close
    assert reopen(path) == {1: 10}


def test_torn_tail_is_cut_and_appends_resume(tmp_path, caplog):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored([(h, h % 50) for h in range(1000, 1040)])
    j.flush()
    good = path.stat().st_size
    j.record_stored([(5000, 7), (5001, 8)])
    j.flush()
    j.close()
    # tear the last record in half: its slot (8) must not be reported
    os.truncate(path, path.stat().st_size - 13)
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        j2 = DiskJournal(str(path), identity=ID)
        state = j2.load()
    expected = {h: h % 50 for h in range(1000, 1040)}
    expected = {h: s for h, s in expected.items() if s != 7}
    expected[5000] = 7
    assert state == expected
    assert 5001 not in state  # the torn record's mapping is not reported...
    assert state[1008] == 8  # ...and slot 8 keeps what durable records say it holds
    assert "ignoring" in caplog.text
    assert path.stat().st_size == good + 32  # torn bytes cut off
    # new records after the cut are visible on the next load
    j2.record_stored([(6000, 8)])
    j2.flush()
    j2.close()
    del expected[1008]  # slot 8 reused
    assert reopen(path) == {**expected, 6000: 8}


def test_garbage_tail_is_ignored(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored([(1, 1), (2, 2)])
    j.flush()
    j.close()
    with open(path, "ab") as f:
        f.write(os.urandom(1000))
    j2 = DiskJournal(str(path), identity=ID)
    assert j2.load() == {1: 1, 2: 2}
    j2.record_evicted([1])
    j2.flush()
    j2.close()
    assert reopen(path) == {2: 2}


def test_corrupt_record_stops_replay(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored([(1, 1)])
    j.flush()
    offset = path.stat().st_size
    j.record_stored([(2, 2), (3, 3)])
    j.flush()
    j.close()
    with open(path, "r+b") as f:  # flip one bit of the hash of (2, 2)
        f.seek(offset + 8)
        b = f.read(1)
        f.seek(offset + 8)
        f.write(bytes([b[0] ^ 0x01]))
    assert reopen(path) == {1: 1}  # never a wrong hash, and nothing after it


def test_identity_mismatch_loads_empty(tmp_path, caplog):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID)
    j.load()
    j.record_stored([(1, 1)])
    j.flush()
    j.close()
    with caplog.at_level(logging.WARNING, logger="kvbm.storage.journal"):
        other = DiskJournal(str(path), identity=ID.replace("bf16", "fp16"))
        assert other.load() == {}
    assert "another model/layout" in caplog.text
    other.record_stored([(9, 9)])
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
    j.record_stored([(1, 2)])
    j.flush()
    assert reopen(path) == {1: 2}


def test_compact_preserves_state(tmp_path):
    path = tmp_path / "j"
    j = DiskJournal(str(path), identity=ID, auto_compact=False)
    j.load()
    rng = random.Random(0)
    for _ in range(50):
        j.record_stored([(rng.getrandbits(64), rng.randrange(64)) for _ in range(20)])
        j.record_evicted([rng.randrange(64) for _ in range(5)])
        j.flush()
    before = j.snapshot()
    size_before = path.stat().st_size
    j.record_stored([(123, 63)])  # pending records are included
    before[123] = 63
    before = {h: s for h, s in before.items() if s != 63 or h == 123}
    j.compact()
    assert j.snapshot() == before
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
        j.record_stored([(i, i % 4)])
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
        j.record_stored([(1, 1)])
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
        j.record_stored([(h, h % 64) for h in range(100, 400)])  # ~10 KB: cannot fit
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
                j.record_stored([(rng.getrandbits(64), rng.randrange(32))])
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
    state = DiskJournal(str(path), identity="crash-test").load()
    # The child may have flushed more batches after the last ack; allow for many.
    candidates = _model_states(seed, acked + 2000)
    matches = [b for b, s in candidates if s == state]
    assert matches, "recovered state is not any prefix of what was journaled"
    assert max(matches) >= acked, f"lost acknowledged batches: recovered {max(matches)}, acked {acked}"
