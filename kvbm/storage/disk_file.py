"""Setting up a G3 data file: open and lock it, choose O_DIRECT, reserve its space.

Kept apart from :mod:`kvbm.storage.disk` (which does the block I/O) because
this is where the host's filesystem shows through: O_DIRECT refused at open
or only at the first I/O (then buffered I/O, with one warning per directory),
``fallocate`` refused (then zeros written, if ``disk_zerofill_fallback`` is
set) or out of room. Every failure raises :class:`DiskSetupError` with a
message naming the setting or path to change, and leaves no half-made file
behind. Runs under the directory lock, which also reclaims files left by
crashed servers (see :mod:`kvbm.storage.files`).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import mmap
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from kvbm.config import env_var
from kvbm.storage.files import (
    CACHE_DIR_VAR,
    DirectoryLock,
    DiskSetupError,
    open_private_file,
    reclaim_leftovers,
)

logger = logging.getLogger(__name__)

__all__ = ["ALIGN", "O_DIRECT", "gb", "open_data_file", "round_up"]

#: Slots, I/O sizes and buffers are aligned to this (O_DIRECT needs the
#: device's logical block size; 4096 covers 512e and 4Kn drives).
ALIGN = 4096
#: ``os.O_DIRECT``, or 0 where the platform has none.
O_DIRECT = getattr(os, "O_DIRECT", 0)

_ZERO_CHUNK = 64 << 20  # zero-fill fallback: bytes per write
_PROGRESS_EVERY_S = 5.0

# errnos meaning "this filesystem cannot preallocate" (as opposed to "no room").
_FALLOCATE_REFUSED = {
    errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY,
}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

# Directories we already warned about (O_DIRECT refused): one warning per
# directory per process, however many ranks or arenas live there.
_warned_o_direct: set[str] = set()
_warned_lock = threading.Lock()


def round_up(n: int, align: int = ALIGN) -> int:
    return (n + align - 1) // align * align


def gb(n: float) -> str:
    """Bytes as GB for log lines and messages."""
    return f"{n / 1e9:.3f} GB"


def open_data_file(
    directory: str,
    path: str,
    total: int,
    *,
    disable_o_direct: bool,
    fallocate: Callable[[int, int, int], Any],
    zerofill_fallback: bool,
) -> tuple[int, bool]:
    """Open (or create) the data file ``path`` in the private ``directory``, lock it and
    reserve ``total`` bytes; returns ``(fd, o_direct)``.

    Under the directory lock: no other server is between creating its file and
    locking it, so every unlocked per-process file is a leftover. On failure
    the fd is closed and a file this call created is removed again.
    """
    data = _DataFile(directory, path)
    with DirectoryLock(directory):
        reclaim_leftovers(directory, keep=path)
        created = data.open(disable_o_direct)
    try:
        data.reserve(total, fallocate, zerofill_fallback)
        if data.o_direct:
            data.check_o_direct_io()
    except BaseException:
        if data.fd >= 0:
            os.close(data.fd)
            data.fd = -1
        if created:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    return data.fd, data.o_direct


class _DataFile:
    """The file being set up: its fd and I/O mode change as the filesystem answers."""

    def __init__(self, directory: str, path: str) -> None:
        self.directory = directory
        self.path = path
        self.fd = -1
        self.o_direct = False

    def _open_fd(self, direct: bool) -> int:
        flags = os.O_RDWR | os.O_CREAT | (O_DIRECT if direct else 0)
        return open_private_file(self.path, flags, "disk cache file")

    def open(self, disable_o_direct: bool) -> bool:
        """Open (or create) the data file, lock it, and choose O_DIRECT or buffered I/O.

        Returns True if the file was created by this call (so a failed set-up
        can remove it again).
        """
        existed = os.path.lexists(self.path)
        want_direct = bool(O_DIRECT) and not disable_o_direct
        try:
            try:
                fd = self._open_fd(want_direct)
            except OSError as e:
                if not (want_direct and e.errno == errno.EINVAL):
                    raise
                self._warn_o_direct(f"open with O_DIRECT failed: {e.strerror}")
                want_direct = False
                fd = self._open_fd(False)
        except OSError as e:
            raise DiskSetupError(
                f"cannot open disk cache file {self.path}: {e.strerror} (errno {e.errno}); "
                f"remove it or set {CACHE_DIR_VAR} to another directory"
            ) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise DiskSetupError(
                    f"disk cache file {self.path} is in use by another process (another kvbm "
                    f"instance with the same directory and rank?); give each instance its own "
                    f"{CACHE_DIR_VAR}"
                ) from None
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.o_direct = want_direct
        return not existed

    def _warn_o_direct(self, why: str) -> None:
        with _warned_lock:
            first = self.directory not in _warned_o_direct
            _warned_o_direct.add(self.directory)
        if first:
            logger.warning(
                "kvbm: the filesystem of %s does not support O_DIRECT (%s); using buffered I/O "
                "(the page cache will also hold disk-tier data). Put %s on a filesystem that "
                "supports O_DIRECT (ext4, xfs on a local SSD), or set "
                "%s=true to choose buffered I/O and silence this warning.",
                self.directory, why, CACHE_DIR_VAR, env_var("disk_disable_o_direct"),
            )

    def reserve(self, total: int, fallocate: Callable[[int, int, int], Any], zerofill: bool) -> None:
        size = os.fstat(self.fd).st_size
        if size > total:
            os.ftruncate(self.fd, total)  # a previous run had a bigger cache; slots beyond are gone
        try:
            fallocate(self.fd, 0, total)
            return
        except OSError as e:
            if e.errno in _NO_SPACE:
                raise DiskSetupError(self._no_space_message(total, e)) from e
            if e.errno not in _FALLOCATE_REFUSED:
                raise DiskSetupError(
                    f"cannot reserve {gb(total)} for disk cache file {self.path}: {e.strerror} "
                    f"(errno {e.errno}); set {CACHE_DIR_VAR} to a directory on a local SSD"
                ) from e
            if not zerofill:
                raise DiskSetupError(
                    f"the filesystem of {self.directory} refused fallocate for {self.path} "
                    f"({e.strerror}, errno {e.errno}). Set {env_var('disk_zerofill_fallback')}=true to "
                    f"reserve the {gb(total)} by writing zeros instead (slower start-up), or set "
                    f"{CACHE_DIR_VAR} to a filesystem that supports fallocate (ext4, xfs)."
                ) from e
            logger.warning(
                "kvbm: fallocate refused on %s (%s); %s is set, writing %s of zeros instead",
                self.directory, e.strerror, env_var("disk_zerofill_fallback"), gb(total),
            )
        self._zero_fill(min(size, total) // ALIGN * ALIGN, total)

    def _zero_fill(self, start: int, total: int) -> None:
        """Write zeros over ``[start, total)`` in large aligned chunks, logging progress.

        Starting at the current file size makes an interrupted fill resume
        where it stopped on the next start.
        """
        if start >= total:
            return
        mm = mmap.mmap(-1, min(_ZERO_CHUNK, round_up(total - start)))  # page-aligned, zeros
        try:
            t0 = last = time.monotonic()
            offset = start
            while offset < total:
                n = min(len(mm), total - offset)
                view = memoryview(mm)[:n]
                try:
                    written = os.pwrite(self.fd, view, offset)
                except OSError as e:
                    if e.errno in _NO_SPACE:
                        raise DiskSetupError(self._no_space_message(total, e)) from e
                    raise DiskSetupError(
                        f"writing zeros to disk cache file {self.path} failed at {gb(offset)}: "
                        f"{e.strerror} (errno {e.errno}); set {CACHE_DIR_VAR} to another directory"
                    ) from e
                finally:
                    view.release()
                if written <= 0:
                    raise DiskSetupError(f"writing zeros to {self.path} made no progress at {gb(offset)}")
                offset += written
                now = time.monotonic()
                if now - last >= _PROGRESS_EVERY_S:
                    last = now
                    logger.info(
                        "kvbm: zero-filling disk cache %s: %.0f%% (%s of %s, %.2f GB/s)",
                        self.path, 100.0 * offset / total, gb(offset), gb(total),
                        (offset - start) / 1e9 / (now - t0),
                    )
            os.fdatasync(self.fd)
            elapsed = time.monotonic() - t0
            logger.info(
                "kvbm: zero-filled %s of disk cache in %.1f s (%.2f GB/s)",
                gb(total - start), elapsed, (total - start) / 1e9 / max(elapsed, 1e-9),
            )
        finally:
            mm.close()

    def _no_space_message(self, total: int, e: OSError) -> str:
        try:
            st = os.statvfs(self.directory)
            free = f"{gb(st.f_bavail * st.f_frsize)} free"
        except OSError:
            free = "free space unknown"
        return (
            f"not enough space for the disk cache in {self.directory}: {gb(total)} requested for "
            f"{self.path}, {free} ({e.strerror}). Lower {env_var('disk_cache_gb')} or "
            f"{env_var('disk_cache_override_num_blocks')}, free space, or set {CACHE_DIR_VAR} to a "
            f"larger filesystem."
        )

    def check_o_direct_io(self) -> None:
        """Some filesystems accept O_DIRECT at open and refuse it on I/O: find out now."""
        mm = mmap.mmap(-1, ALIGN)
        try:
            os.preadv(self.fd, [mm], 0)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise DiskSetupError(
                    f"cannot read disk cache file {self.path}: {e.strerror} (errno {e.errno}); "
                    f"set {CACHE_DIR_VAR} to another directory"
                ) from e
            self._warn_o_direct(f"O_DIRECT read failed: {e.strerror}")
            with DirectoryLock(self.directory):  # never unlocked where a reclaim could see it
                os.close(self.fd)
                self.fd = -1
                self.open(disable_o_direct=True)
        finally:
            mm.close()
