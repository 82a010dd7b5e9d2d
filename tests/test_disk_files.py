"""The disk cache directory and its files against hostile and crashed neighbours (issue 13).

Real directories, real files, real processes (a server killed with SIGKILL
leaves its G3 file behind; a live one holds its lock). Ownership tests chown
to another uid, so they need root (skipped otherwise).
"""

from __future__ import annotations

import logging
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pytest

from kvbm.storage import slot_header
from kvbm.storage.disk import DiskArena, DiskSetupError
from kvbm.storage.disk_faults import FaultInjector
from kvbm.storage.files import ensure_private_dir
from tests.other_user import NOBODY, as_nobody, needs_other_user, shared_dir

ROOT = Path(__file__).resolve().parent.parent
OTHER_UID = 54321
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")


def H(n: int) -> bytes:
    return n.to_bytes(16, "little")


# ---- the directory -------------------------------------------------------------------
@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720])
def test_directory_writable_by_others_is_refused(tmp_path, mode):
    d = tmp_path / "shared"
    d.mkdir()
    d.chmod(mode)
    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR") as e:
        DiskArena(str(d), 2, 4096, file_tag="x")
    assert "writable by other users" in str(e.value) and str(d) in str(e.value)
    assert list(d.iterdir()) == []  # nothing created in it


@needs_root
def test_directory_of_another_user_is_refused(tmp_path):
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, OTHER_UID, OTHER_UID)
    with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR") as e:
        DiskArena(str(d), 2, 4096, file_tag="x")
    assert f"belongs to uid {OTHER_UID}" in str(e.value)


def test_directory_is_created_private(tmp_path):
    old = os.umask(0)
    try:
        d = ensure_private_dir(str(tmp_path / "a" / "kvbm"))
    finally:
        os.umask(old)
    assert (os.stat(d).st_mode & 0o777) == 0o700


def test_symlinked_directory_to_a_private_directory_is_fine(tmp_path):
    real = tmp_path / "nvme"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with DiskArena(str(tmp_path / "link"), 2, 4096, file_tag="x") as arena:
        assert os.path.exists(real / os.path.basename(arena.path))


def test_symlinked_directory_into_a_shared_directory_is_refused(tmp_path):
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    (tmp_path / "link").symlink_to(shared)
    with pytest.raises(DiskSetupError, match="writable by other users"):
        DiskArena(str(tmp_path / "link"), 2, 4096, file_tag="x")


@needs_other_user
def test_a_link_another_user_planted_as_the_cache_directory_is_refused(tmp_path):
    """With HOME=/ (or unset) the default G3 directory is a fixed name in a shared directory
    (/var/tmp/kvbm-<uid>). "nobody" plants that name as a link to a directory of root's that
    passes every check of the target (root's, 0700): before, kvbm followed it and wrote there."""
    with shared_dir() as shared:
        victim = tmp_path / "root-only"
        victim.mkdir(mode=0o700)
        name = shared / f"kvbm-{os.geteuid()}"
        as_nobody("ln", "-s", str(victim), str(name))
        with pytest.raises(DiskSetupError, match="DYN_KVBM_DISK_CACHE_DIR") as e:
            DiskArena(str(name), 2, 4096, file_tag="x")
        assert "symbolic link" in str(e.value) and f"uid {NOBODY}" in str(e.value)
        with pytest.raises(DiskSetupError, match="symbolic link"):
            ensure_private_dir(str(name))
        assert list(victim.iterdir()) == []  # nothing written through the link


# ---- files in it -----------------------------------------------------------------
@needs_root
def test_data_file_of_another_user_is_refused(tmp_path):
    path = tmp_path / "kvbm-g3-x.bin"
    path.write_bytes(b"theirs")
    os.chown(path, OTHER_UID, OTHER_UID)
    with pytest.raises(DiskSetupError, match=f"belongs to uid {OTHER_UID}"):
        DiskArena(str(tmp_path), 2, 4096, file_tag="x")
    assert path.read_bytes() == b"theirs"


def test_planted_fifo_is_refused_without_hanging(tmp_path):
    os.mkfifo(tmp_path / "kvbm-g3-x.bin")
    with pytest.raises(DiskSetupError, match="not a regular file"):
        DiskArena(str(tmp_path), 2, 4096, file_tag="x")


# ---- crash leftovers -------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import os, sys, time
    from kvbm.storage.disk import DiskArena
    arena = DiskArena(sys.argv[1], 64, 65536, file_tag=f"pid{os.getpid()}-rank0")
    print(arena.path, flush=True)
    time.sleep(600)
    """
)


def _server(directory: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return proc, line


def test_files_of_killed_servers_are_reclaimed_live_ones_kept(tmp_path, caplog):
    """Issue 13 item 6: without persistence each crash left a preallocated G3 file forever."""
    d = tmp_path / "g3"
    crashed, crashed_path = _server(d)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    assert os.path.exists(crashed_path)
    live, live_path = _server(d)  # its start-up reclaims the crashed server's file
    try:
        assert not os.path.exists(crashed_path)
        again, again_path = _server(d)  # a crash loop: each start cleans up after the last
        again.send_signal(signal.SIGKILL)
        again.wait()
        persistent = d / "kvbm-g3-0123456789abcdef-rank0.bin"  # DYN_KVBM_DISK_PERSIST files are kept
        persistent.write_bytes(b"x" * 4096)
        persistent.chmod(0o600)
        with caplog.at_level(logging.WARNING, logger="kvbm.storage.files"):
            with DiskArena(str(d), 4, 65536, file_tag=f"pid{os.getpid()}-rank0"):
                pass
        assert not os.path.exists(again_path)
        assert os.path.exists(live_path)  # its owner is alive: never deleted
        assert persistent.exists()
        msg = [r.getMessage() for r in caplog.records if "reclaimed" in r.getMessage()]
        assert len(msg) == 1 and "1 disk cache file(s)" in msg[0] and "0.004 GB freed" in msg[0]
        assert live.poll() is None
    finally:
        live.kill()
        live.wait()


# ---- fault injection ---------------------------------------------------------------
def test_fault_hook_is_off_by_default_and_injects_misses(tmp_path):
    rng = np.random.default_rng(0)
    blocks = [rng.integers(0, 256, 10000, dtype=np.uint8) for _ in range(4)]
    with DiskArena(str(tmp_path / "a"), 4, 10000, file_tag="f") as arena:
        assert arena._fault_hook is None
    faults = {("write", 1): "error", ("write", 2): "corrupt", ("read", 3): "corrupt"}
    with DiskArena(str(tmp_path / "b"), 4, 10000, file_tag="f",
                   fault_hook=lambda op, slot: faults.get((op, slot))) as arena:
        assert arena.write_blocks([(i, H(i), b) for i, b in enumerate(blocks)]) == [True, False, True, True]
        dests = [np.zeros(10000, np.uint8) for _ in range(4)]
        assert arena.read_blocks([(i, H(i), d) for i, d in enumerate(dests)]) == [True, False, False, False]
        np.testing.assert_array_equal(dests[0], blocks[0])
        assert arena.write_failures == 1 and arena.checksum_failures == 2 and arena.mismatches == 1
        faults.clear()
        ok = arena.read_blocks([(i, H(i), d) for i, d in enumerate(dests)])
        assert ok == [True, False, False, True]  # slot 3 was fine on disk; slot 2 really rotted
        np.testing.assert_array_equal(dests[3], blocks[3])


def test_fault_injector_rates():
    inj = FaultInjector({"read_error": 0.25, "read_corrupt": 0.25}, seed=1)
    draws = [inj("read", 0) for _ in range(4000)]
    assert 800 < draws.count("error") < 1200 and 800 < draws.count("corrupt") < 1200
    assert all(inj("write", 0) is None for _ in range(100))
    assert inj.injected["read_error"] == draws.count("error")
    with pytest.raises(ValueError, match="unknown"):
        FaultInjector({"bogus": 1.0})


def test_fault_injector_slows_reads_only(monkeypatch):
    """One read sleeps the delay, a write does not: the sleeps themselves, not the wall clock (a busy
    machine stretches any wall-clock bound)."""
    import time

    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    inj = FaultInjector({"read_delay_ms": 20.0})
    assert inj("read", 0) is None and inj("write", 0) is None
    assert slept == [0.02]


# ---- format version ----------------------------------------------------------------
def test_slot_of_format_1_is_a_miss_with_one_log_line(tmp_path, caplog):
    """Issue 13 item 3: a data file written with 64-bit hashes is never misread."""
    with DiskArena(str(tmp_path), 4, 10000, file_tag="v1") as arena:
        path, slot_size = arena.path, arena.slot_size
    payload = bytes(range(256)) * 39 + bytes(16)
    fd = os.open(path, os.O_RDWR)
    for slot in range(4):  # what kvbm format 1 wrote: magic, v1, off, crc, slot, u64 hash, length, crc
        body = struct.pack("<8sHHIQQQ", slot_header.MAGIC, 1, 64, zlib.crc32(payload), slot, 77, len(payload))
        os.pwrite(fd, body + struct.pack("<I", zlib.crc32(body)) + bytes(20) + payload, slot * slot_size)
    os.close(fd)
    with DiskArena(str(tmp_path), 4, 10000, file_tag="v1") as arena:
        with caplog.at_level(logging.WARNING, logger="kvbm.storage.disk"):
            for h in (77, 0):  # the old 64-bit hash, and its 128-bit extension
                assert arena.read_blocks([(s, H(h), np.zeros(10000, np.uint8)) for s in range(4)]) == [False] * 4
        assert arena.mismatches == 8 and arena.checksum_failures == 0
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1 and "format version 1" in lines[0]
