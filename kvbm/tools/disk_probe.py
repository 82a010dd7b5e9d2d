"""What a disk cache (G3) in a directory would get, found without creating the real file.

For ``kvbm doctor`` (and bench/disk.py): the filesystem, free space, and
whether ``fallocate`` and O_DIRECT work there, tested on a small temporary
file that is removed again. Apart from :mod:`kvbm.storage.disk` because no
server path needs it: a server just sets its file up (see
:mod:`kvbm.storage.disk_file`) and reports what failed.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Any

from kvbm.storage.disk_file import ALIGN, O_DIRECT
from kvbm.storage.files import CACHE_DIR_VAR, private_dir_problem

__all__ = ["probe_disk"]


def _filesystem_of(path: str) -> str | None:
    """Filesystem type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.readlines()
    except OSError:
        return None
    path = os.path.realpath(path)
    best, best_len = None, -1
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = path == mount_point or path.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= best_len:
            best, best_len = right.split()[0], len(mount_point)
    return best


def probe_disk(directory: str) -> dict[str, Any]:
    """What a disk cache in ``directory`` would get, without creating the real file.

    Tests fallocate and O_DIRECT with a small temporary file (removed
    again) and reports free space. If ``directory`` does not exist yet,
    the nearest existing parent (where it would be created) is probed.
    """
    directory = os.path.abspath(directory)
    report: dict[str, Any] = {
        "directory": directory,
        "exists": os.path.isdir(directory),
        "probed": None,
        "filesystem": None,
        "writable": False,
        "free_bytes": None,
        "total_bytes": None,
        "fallocate": None,
        "fallocate_error": None,
        "o_direct": None,
        "o_direct_error": None,
        "error": None,
    }
    if os.path.lexists(directory) and not os.path.isdir(directory):
        report["error"] = f"{directory} exists but is not a directory; fix {CACHE_DIR_VAR}"
        return report
    problem = private_dir_problem(directory) if report["exists"] else None
    if problem is not None:
        report["error"] = (f"{directory} {problem}; kvbm needs a private directory (yours, mode 0700): "
                           f"fix {CACHE_DIR_VAR}")
        return report
    probed = directory
    while not os.path.isdir(probed):
        probed = os.path.dirname(probed)
    report["probed"] = probed
    report["filesystem"] = _filesystem_of(probed)
    try:
        st = os.statvfs(probed)
        report["free_bytes"] = st.f_bavail * st.f_frsize
        report["total_bytes"] = st.f_blocks * st.f_frsize
    except OSError as e:
        report["error"] = f"statvfs({probed}) failed: {e.strerror}"
    report["writable"] = os.access(probed, os.W_OK | os.X_OK)
    if not report["writable"]:
        report["error"] = f"{probed} is not writable by uid {os.getuid()}; fix {CACHE_DIR_VAR}"
        return report
    try:
        fd, tmp = tempfile.mkstemp(prefix=".kvbm-probe-", dir=probed)
    except OSError as e:
        report["writable"] = False
        report["error"] = f"cannot create a file in {probed}: {e.strerror}"
        return report
    dfd = -1
    mm = mmap.mmap(-1, ALIGN)
    try:
        try:
            dfd = os.open(tmp, os.O_RDWR | O_DIRECT) if O_DIRECT else -1
        except OSError as e:
            report["o_direct"] = False
            report["o_direct_error"] = f"open: {e.strerror} (errno {e.errno})"
        # fallocate on the fd kvbm would use (glibc emulates it on buffered fds).
        try:
            os.posix_fallocate(dfd if dfd >= 0 else fd, 0, 1 << 20)
            report["fallocate"] = True
        except OSError as e:
            report["fallocate"] = False
            report["fallocate_error"] = f"{e.strerror} (errno {e.errno})"
        if dfd >= 0:
            try:
                os.pwrite(dfd, mm, 0)
                os.preadv(dfd, [mm], 0)
                report["o_direct"] = True
            except OSError as e:
                report["o_direct"] = False
                report["o_direct_error"] = f"I/O: {e.strerror} (errno {e.errno})"
        elif not O_DIRECT:
            report["o_direct"] = False
            report["o_direct_error"] = "O_DIRECT is not available on this platform"
    finally:
        mm.close()
        if dfd >= 0:
            os.close(dfd)
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return report
