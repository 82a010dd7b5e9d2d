"""The disk cache directory and the files kvbm keeps in it, opened safely.

Everything the disk tier writes (G3 data files, the journal, its temp files)
lives in one directory (``disk_cache_dir``, see config). kvbm may run as root and
the directory may sit on a shared machine, so:

* the directory must be ours and private: owned by this user and not
  writable by group or others (created 0700 when missing). Otherwise another
  local user could plant a link named like our journal and make us overwrite
  a file of their choosing, or plant a journal that points us at slots;
* files are opened with ``O_NOFOLLOW`` (a planted link is refused, never
  followed), must be regular files owned by us, and temp files are created
  with ``O_EXCL`` (``mkstemp``) so a name someone else prepared is never reused;
* G3 files of servers that died (``kill -9``, OOM) are reclaimed at start-up.
  Each live server holds an ``flock`` on its data file, so a file whose lock
  can be taken has no owner; a crash loop therefore does not fill the disk.

Errors are :class:`DiskSetupError` with a message naming the setting, never a
raw ``PermissionError``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import re
import stat
import time

from kvbm.config import env_var

logger = logging.getLogger(__name__)

CACHE_DIR_VAR = env_var("disk_cache_dir")
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_DIR_LOCK_TIMEOUT_S = 30.0

# ---- G3 file names: the one place that spells them --------------------------------

#: Every G3 file of kvbm starts so: reused (persistence) or reclaimed (a dead server's),
#: so they count as room when sizing.
G3_FILE_PREFIX = "kvbm-g3-"
#: Files that belong to one server process only (no persistence): reclaimable
#: once their owner is gone. Persistent files (named by model) are kept.
_RECLAIMABLE = re.compile(re.escape(G3_FILE_PREFIX) + r"pid\d+-rank\d+\.bin")


def _storage_name(storage_key: str) -> str:
    return hashlib.blake2b(storage_key.encode(), digest_size=8).hexdigest()


def g3_file_tag(storage_key: str, rank: int, *, persistent: bool) -> str:
    """The tag of a rank's G3 data file. Persistent files are named by the storage key
    (model and slot shape: a restart finds them); others by process, so two servers
    sharing a directory never collide (and a dead server's file can be reclaimed)."""
    if persistent:
        return f"{_storage_name(storage_key)}-rank{rank}"
    return f"pid{os.getpid()}-rank{rank}"


def g3_data_path(directory: str, file_tag: str) -> str:
    return os.path.join(directory, f"{G3_FILE_PREFIX}{file_tag}.bin")


def g3_journal_path(directory: str, storage_key: str, data_parallel_rank: int = 0) -> str:
    """The persistent G3 index of the model and slot shape ``storage_key`` kept by the leader of
    data-parallel engine ``data_parallel_rank``. Each engine has data files of its own (named
    by global rank) and so needs its own index of them; one shared index would be appended by
    every engine, and each one's rewrites would erase the others' entries. Engine 0 keeps the
    name of a single engine's index, so a single engine restores what it persisted before."""
    suffix = f"-dp{data_parallel_rank}" if data_parallel_rank else ""
    return os.path.join(directory, f"{G3_FILE_PREFIX}{_storage_name(storage_key)}{suffix}.journal")


class DiskSetupError(RuntimeError):
    """The disk tier cannot be set up; the message names the setting to fix."""


def _fix(directory: str) -> str:
    return (
        f"set {CACHE_DIR_VAR} to a private directory (owned by uid {os.geteuid()}, mode 0700; "
        f"kvbm creates it if missing), or fix {directory}"
    )


def private_dir_problem(directory: str) -> str | None:
    """Why the existing ``directory`` is not safe for kvbm's files, or None if it is.

    It must be a directory owned by this process's user that neither group nor
    others can write: anyone who can create names in it can plant links and
    files under the names kvbm uses. The name itself may be a symbolic link to
    such a directory only if the link is ours too (checked with ``lstat``): a
    link another user planted where kvbm creates its directory (the fallback
    ``/var/tmp/kvbm-<uid>``) is refused, not followed.
    """
    try:
        link = os.lstat(directory)  # the name itself: a link in a shared directory may be anyone's
        st = os.stat(directory) if stat.S_ISLNK(link.st_mode) else link
    except OSError as e:
        return f"cannot be inspected ({e.strerror})"
    if stat.S_ISLNK(link.st_mode) and link.st_uid != os.geteuid():
        # Someone else's link (e.g. planted in a sticky /var/tmp) would send kvbm's files, as
        # this user (often root), into a directory of their choosing that passes the checks below.
        return (f"is a symbolic link (to {os.path.realpath(directory)}) owned by uid {link.st_uid}, not by this "
                f"process (uid {os.geteuid()}); another user may have planted it")
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    if st.st_uid != os.geteuid():
        return f"belongs to uid {st.st_uid}, not to this process (uid {os.geteuid()})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"is writable by other users (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def ensure_private_dir(directory: str) -> str:
    """Create ``directory`` (mode 0700) if missing, then check it is private; returns its absolute path."""
    directory = os.path.abspath(directory)
    if not os.path.lexists(directory):
        try:
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            os.mkdir(directory, 0o700)
            os.chmod(directory, 0o700)  # mkdir's mode is narrowed by the umask, never widened; be exact
        except FileExistsError:
            pass  # created meanwhile (another rank): checked below like any existing directory
        except OSError as e:
            raise DiskSetupError(
                f"cannot create disk cache directory {directory}: {e.strerror} (errno {e.errno}); "
                f"{_fix(directory)}"
            ) from e
    problem = private_dir_problem(directory)
    if problem is not None:
        raise DiskSetupError(
            f"disk cache directory {directory} {problem}: other local users could plant files or links "
            f"there that kvbm would write through; {_fix(directory)}"
        )
    if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
        raise DiskSetupError(
            f"disk cache directory {directory} is not readable and writable by this process (uid {os.getuid()}); "
            f"{_fix(directory)}"
        )
    return directory


def open_private_file(path: str, flags: int, what: str) -> int:
    """``os.open`` that never follows a link and only accepts our own regular files.

    Refusals raise :class:`DiskSetupError` naming the setting; other errors
    (no such file, no space, ...) are the caller's ``OSError`` to handle.
    """
    try:
        fd = os.open(path, flags | _O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise DiskSetupError(
                f"{what} {path} is a symbolic link; kvbm never follows links in its directory (one may "
                f"have been planted). Remove it, or {_fix(os.path.dirname(path))}"
            ) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DiskSetupError(
                f"{what} {path} exists but is not a regular file; remove it, or {_fix(os.path.dirname(path))}"
            )
        if st.st_uid != os.geteuid():
            raise DiskSetupError(
                f"{what} {path} belongs to uid {st.st_uid}, not to this process (uid {os.geteuid()}); "
                f"kvbm does not use files it did not create. Remove it, or {_fix(os.path.dirname(path))}"
            )
        # O_NONBLOCK only guarded the open against a planted FIFO; regular file I/O ignores it.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class DirectoryLock:
    """Exclusive ``flock`` on the directory itself, held while a server reclaims
    leftovers and creates and locks its own files, so that no scan ever sees a
    live server's file in the instant between its creation and its lock."""

    def __init__(self, directory: str) -> None:
        self._fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        deadline = time.monotonic() + _DIR_LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise DiskSetupError(
                        f"disk cache directory {directory} stayed locked by another kvbm process for "
                        f"{_DIR_LOCK_TIMEOUT_S:.0f} s (a stopped server?); give each server its own "
                        f"{CACHE_DIR_VAR}"
                    ) from None
                time.sleep(0.05)

    def __enter__(self) -> DirectoryLock:
        return self

    def __exit__(self, *exc: object) -> None:
        os.close(self._fd)  # drops the lock


def reclaim_leftovers(directory: str, keep: str) -> tuple[int, int]:
    """Delete the per-process G3 files (no persistence) whose owner is dead.

    Call with the :class:`DirectoryLock` held. A file is reclaimed only if it
    is ours, a regular file, named like a per-process file, not ``keep``, and
    its ``flock`` can be taken (a live server holds it for its lifetime).
    Returns (files, bytes) freed.
    """
    files = freed = 0
    try:
        names = os.listdir(directory)
    except OSError:
        return 0, 0
    for name in names:
        if not _RECLAIMABLE.fullmatch(name) or name == os.path.basename(keep):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            continue  # gone meanwhile, a link, or not ours to read: leave it
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its server is alive
            os.unlink(path)
            files += 1
            freed += st.st_blocks * 512
        except OSError as e:
            logger.debug("kvbm: could not reclaim %s: %s", path, e)
        finally:
            os.close(fd)
    if files:
        logger.warning(
            "kvbm: reclaimed %d disk cache file(s) left in %s by servers that are gone (crashed or "
            "killed): %.3f GB freed", files, directory, freed / 1e9,
        )
    return files, freed
