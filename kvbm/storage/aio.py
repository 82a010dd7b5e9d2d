"""Linux native AIO (``io_submit``/``io_getevents``) for batches of O_DIRECT ``preadv`` calls.

Why: a G3 load of random slots is one read per block. Issued from Python threads (one
``os.preadv`` each), every read costs a GIL round trip on its way out and in; at 128 KiB
blocks those round trips, not the drive, bounded loads at ~0.7 of what the drive reads
(``bench/disk.py --executor``). Native AIO hands a whole batch to the kernel in one call
and collects completions in batches, from the one thread that asked: no I/O threads, no
GIL traffic per block, and as many reads in flight as the batch has (the drive likes a
deep queue). The iocbs and iovecs are numpy arrays filled in vectorised passes.

Only with O_DIRECT: on a buffered file ``io_submit`` reads synchronously, one after the
other, which is slower than the thread pool. Only on little-endian x86-64 and arm64 (the
iocb layout below is theirs). Anything else, or a kernel or sandbox that refuses
``io_setup`` (``aio-max-nr`` exhausted, a seccomp filter), makes :meth:`AioContext.open`
return None and the caller keeps its threads.

The kernel writes into the caller's buffers until each read's completion has been
collected, so :meth:`AioContext.preadv` never returns (not even by an exception) before
every read it submitted has completed.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import platform
import sys
from collections.abc import Callable

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["IOVEC", "AioContext"]

#: (io_setup, io_destroy, io_getevents, io_submit) syscall numbers
_SYSCALLS = {"x86_64": (206, 207, 208, 209), "aarch64": (0, 1, 4, 2)}
_IOCB_CMD_PREADV = 7

#: ``struct iocb`` of linux/aio_abi.h on a little-endian machine (64 bytes)
_IOCB = np.dtype([
    ("data", "<u8"), ("key", "<u4"), ("rw_flags", "<i4"), ("opcode", "<u2"), ("reqprio", "<i2"),
    ("fildes", "<u4"), ("buf", "<u8"), ("nbytes", "<u8"), ("offset", "<i8"), ("reserved2", "<u8"),
    ("flags", "<u4"), ("resfd", "<u4"),
])
#: ``struct io_event`` (32 bytes)
_EVENT = np.dtype([("data", "<u8"), ("obj", "<u8"), ("res", "<i8"), ("res2", "<i8")])
#: ``struct iovec``: (address, length) per row of an ``(n, 2)`` uint64 array
IOVEC = np.dtype("<u8")

_libc: ctypes.CDLL | None = None


def _syscall(number: int, *args: int) -> int:
    """``syscall(2)`` with every argument a C long; -errno on failure. ctypes drops the GIL
    for the call, so a thread waiting in ``io_getevents`` lets the others run."""
    assert _libc is not None
    r = _libc.syscall(ctypes.c_long(number), *(ctypes.c_long(a) for a in args))
    return -ctypes.get_errno() if r < 0 else r


class AioContext:
    """One ``io_setup`` context with room for ``depth`` reads in flight; one thread at a time.

    Use :meth:`open` (None where native AIO is not available) and :meth:`close`."""

    def __init__(self, ctx: int, depth: int, numbers: tuple[int, int, int, int]) -> None:
        self._ctx = ctx
        self.depth = depth
        self._setup, self._destroy, self._getevents, self._submit = numbers
        self._events = np.zeros(depth, dtype=_EVENT)

    @classmethod
    def open(cls, depth: int) -> tuple[AioContext | None, str]:
        """A context, or None and why not (for the caller's log line)."""
        global _libc
        numbers = _SYSCALLS.get(platform.machine())
        if sys.platform != "linux" or numbers is None or sys.byteorder != "little":
            return None, f"not available on {sys.platform}/{platform.machine()}"
        try:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
                _libc.syscall.restype = ctypes.c_long
        except OSError as e:  # pragma: no cover - every Linux libc has syscall()
            return None, f"libc not loadable ({e})"
        ctx = ctypes.c_ulong(0)
        r = _libc.syscall(ctypes.c_long(numbers[0]), ctypes.c_long(depth), ctypes.byref(ctx))
        if r < 0:
            err = ctypes.get_errno()
            return None, f"io_setup failed: {errno.errorcode.get(err, err)} (fs.aio-max-nr exhausted, or a sandbox)"
        return cls(ctx.value, depth, numbers), ""

    def preadv(self, fd: int, offsets: np.ndarray, iovecs: np.ndarray, first_iovec: np.ndarray,
               iovec_counts: np.ndarray, done: Callable[[np.ndarray, np.ndarray], None]) -> None:
        """Read request ``r`` (``iovec_counts[r]`` rows of ``iovecs`` from ``first_iovec[r]``, from
        file offset ``offsets[r]``) for every ``r``, at most :attr:`depth` in flight.

        ``done(requests, results)`` is called, on this thread, with each batch of completions:
        request indices and their results (bytes read, or -errno). Every request is reported
        exactly once: one the kernel refused to take is reported with the refusal's -errno, for
        the caller to read another way. ``iovecs`` and every buffer it points to must stay alive
        and untouched until this returns. If ``done`` raises, the reads already submitted are
        still waited for before the exception leaves."""
        n = len(offsets)
        cbs = np.zeros(n, dtype=_IOCB)
        cbs["data"] = np.arange(n, dtype=np.uint64)
        cbs["opcode"] = _IOCB_CMD_PREADV
        cbs["fildes"] = fd
        cbs["buf"] = iovecs.ctypes.data + first_iovec.astype(np.uint64) * np.uint64(16)
        cbs["nbytes"] = iovec_counts
        cbs["offset"] = offsets
        pointers = np.uint64(cbs.ctypes.data) + np.arange(n, dtype=np.uint64) * np.uint64(_IOCB.itemsize)
        base = pointers.ctypes.data
        events = self._events
        submitted = in_flight = 0
        try:
            while submitted < n or in_flight:
                room = min(self.depth - in_flight, n - submitted)
                if room:
                    got = _syscall(self._submit, self._ctx, room, base + 8 * submitted)
                    if got > 0:
                        submitted += got
                        in_flight += got
                    elif got in (-errno.EAGAIN, -errno.EINTR) and in_flight:
                        pass  # the kernel's queue is full: collect some, then submit again
                    elif got != -errno.EINTR:
                        # refused: the rest go back to the caller as failed, to be read another way
                        rest = np.arange(submitted, n)
                        submitted = n
                        done(rest, np.full(len(rest), got if got < 0 else -errno.EIO, dtype=np.int64))
                if in_flight:
                    k = _syscall(self._getevents, self._ctx, 1, self.depth, events.ctypes.data, 0)
                    if k == -errno.EINTR:
                        continue
                    if k < 0:  # pragma: no cover - only for a bad context or events pointer
                        raise OSError(-k, "io_getevents failed")
                    in_flight -= k
                    done(events["data"][:k].astype(np.int64), events["res"][:k].copy())
        finally:
            self._drain(in_flight)

    def _drain(self, in_flight: int) -> None:
        """Wait for ``in_flight`` submitted reads, results dropped (an exception is leaving)."""
        while in_flight > 0:
            k = _syscall(self._getevents, self._ctx, 1, self.depth, self._events.ctypes.data, 0)
            if k > 0:
                in_flight -= k
            elif k != -errno.EINTR:  # pragma: no cover - io_destroy below waits for them anyway
                logger.error("kvbm: io_getevents failed (%d) with %d reads in flight", -k, in_flight)
                return

    def close(self) -> None:
        """``io_destroy`` (waits for anything still in flight)."""
        if self._ctx:
            _syscall(self._destroy, self._ctx)
            self._ctx = 0
