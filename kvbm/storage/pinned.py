"""Fast page-locked (pinned) host memory for the G2 arena.

``torch.empty(n, dtype=torch.uint8, pin_memory=True)`` goes through
``cudaHostAlloc``, which faults in, zeroes and pins every page on one thread
(measured elsewhere: about 2.7 s per 8 GiB). For a G2 arena of tens of GB that
is a long pause at engine start. This module instead

1. maps anonymous memory with ``mmap`` (no pages yet) and asks for
   transparent huge pages (``madvise(MADV_HUGEPAGE)``),
2. faults the pages in from several threads at once
   (``madvise(MADV_POPULATE_WRITE)`` per chunk, which the kernel does without
   our writing a byte; on kernels older than 5.14 a strided write per page),
3. registers the whole range with CUDA once (``cudaHostRegister``), which makes
   it pinned, DMA-able and, through unified addressing, directly addressable
   from GPU kernels at the same address,

and wraps the range as a 1-D uint8 tensor. The mapping lives as long as the
tensor (and every view of it); when the last one goes, the range is
unregistered and unmapped.

Without CUDA (or when registration fails) the memory is still returned,
populated but pageable, with a warning.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
import warnings
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field

import torch

logger = logging.getLogger(__name__)

__all__ = ["allocate_pinned", "allocate_host", "AllocStats"]

_PROT_READ_WRITE = 0x1 | 0x2
_MAP_PRIVATE = 0x02
_MAP_ANONYMOUS = 0x20
_MAP_NORESERVE = 0x4000
_MADV_HUGEPAGE = 14
_MADV_POPULATE_WRITE = 23  # Linux >= 5.14
_HUGE = 2 << 20  # x86-64 PMD huge page
_CHUNK = 64 << 20  # populate granularity (one task per chunk)
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CUDA_HOST_REGISTER_PORTABLE = 0x1
_CUDA_HOST_REGISTER_MAPPED = 0x2

_libc: ctypes.CDLL | None = None


def _c() -> ctypes.CDLL:
    """libc through ctypes.CDLL: its calls release the GIL, so threads run in parallel."""
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(None, use_errno=True)
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.restype = ctypes.c_int
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.madvise.restype = ctypes.c_int
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc = lib
    return _libc


@dataclass
class AllocStats:
    """Where the time of one allocation went (seconds); filled by :func:`allocate_host`."""

    num_bytes: int = 0
    map_s: float = 0.0
    populate_s: float = 0.0
    register_s: float = 0.0
    total_s: float = 0.0
    threads: int = 0
    pinned: bool = False
    populate_method: str = ""
    notes: list[str] = field(default_factory=list)


class _Mapping:
    """Owns one anonymous mapping and (optionally) its CUDA registration."""

    def __init__(self, addr: int, size: int) -> None:
        self.addr = addr
        self.size = size
        self.registered = False

    def release(self) -> None:
        if self.registered:
            try:
                err = torch.cuda.cudart().cudaHostUnregister(self.addr)
                if int(err) != 0:
                    logger.warning("kvbm: cudaHostUnregister failed with error %d", int(err))
            except Exception:  # interpreter or CUDA context going away
                logger.debug("kvbm: cudaHostUnregister raised", exc_info=True)
            self.registered = False
        if self.addr:
            _c().munmap(self.addr, self.size)
            self.addr = 0


def _map(size: int) -> int:
    libc = _c()
    addr = libc.mmap(None, size, _PROT_READ_WRITE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
    if addr is None or addr == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise MemoryError(f"kvbm: mmap of {size} bytes failed: {os.strerror(err)}")
    return addr


def _populate_chunk(addr: int, length: int, flat: torch.Tensor | None, offset: int) -> str:
    """Fault in [addr, addr+length). Returns the method used."""
    libc = _c()
    if flat is None:
        if libc.madvise(addr, length, _MADV_POPULATE_WRITE) == 0:
            return "madvise"
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EPERM):
            raise MemoryError(f"kvbm: populating host memory failed: {os.strerror(err)}")
        return "unsupported"
    # Fallback: one write per page. Each call stays under torch's parallel grain
    # size (32768 elements), so it runs on this thread; threads run in parallel
    # because torch releases the GIL inside the op.
    flat[offset : offset + length : _PAGE].fill_(0)
    return "touch"


def _populate(addr: int, size: int, flat: torch.Tensor, threads: int,
              progress: Callable[[int, int], None] | None) -> str:
    chunks = [(off, min(_CHUNK, size - off)) for off in range(0, size, _CHUNK)]
    method = "madvise"
    # Probe once: MADV_POPULATE_WRITE is missing before Linux 5.14.
    first_off, first_len = chunks[0]
    if _populate_chunk(addr + first_off, first_len, None, first_off) == "unsupported":
        method = "touch"
        _populate_chunk(addr + first_off, first_len, flat, first_off)
    done = first_len
    if progress is not None:
        progress(done, size)
    rest = chunks[1:]
    if not rest:
        return method
    use_flat = flat if method == "touch" else None
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvbm-populate") as pool:
        futures = {pool.submit(_populate_chunk, addr + off, ln, use_flat, off): ln for off, ln in rest}
        for fut in as_completed(futures):
            if fut.result() == "unsupported":  # raced with a policy change; touch it instead
                raise MemoryError("kvbm: MADV_POPULATE_WRITE stopped working mid-allocation")
            done += futures[fut]
            if progress is not None:
                progress(done, size)
    return method


def _register(addr: int, size: int) -> None:
    cudart = torch.cuda.cudart()
    err = cudart.cudaHostRegister(addr, size, _CUDA_HOST_REGISTER_PORTABLE | _CUDA_HOST_REGISTER_MAPPED)
    if int(err) != 0:
        raise RuntimeError(f"cudaHostRegister of {size} bytes failed with CUDA error {int(err)}")


def allocate_host(
    num_bytes: int,
    *,
    pin: bool = True,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: AllocStats | None = None,
) -> torch.Tensor:
    """A populated 1-D uint8 host tensor of ``num_bytes``; pinned when ``pin`` and CUDA allow.

    ``threads`` defaults to the CPUs this process may use (at most 32).
    ``progress(done_bytes, total_bytes)`` is called from this thread as chunks
    are faulted in. ``stats`` (optional) receives the time of each phase.
    """
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be positive, got {num_bytes}")
    st = stats if stats is not None else AllocStats()
    st.num_bytes = num_bytes
    if threads is None:
        try:
            threads = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            threads = os.cpu_count() or 1
        threads = max(1, min(32, threads))
    st.threads = threads
    size = -(-num_bytes // _HUGE) * _HUGE  # whole huge pages
    t0 = time.perf_counter()
    addr = _map(size)
    mapping = _Mapping(addr, size)
    try:
        if _c().madvise(addr, size, _MADV_HUGEPAGE) != 0:
            st.notes.append("MADV_HUGEPAGE refused")
        holder = (ctypes.c_uint8 * size).from_address(addr)
        # The tensor keeps ``holder`` alive; when the last view goes, ``holder``
        # is collected and the finalizer unregisters and unmaps the range.
        flat = torch.frombuffer(holder, dtype=torch.uint8)
        fin = weakref.finalize(holder, mapping.release)
        fin.atexit = False  # the process is going away anyway; CUDA may already be torn down
        del holder
        t1 = time.perf_counter()
        st.map_s = t1 - t0
        st.populate_method = _populate(addr, size, flat, threads, progress)
        t2 = time.perf_counter()
        st.populate_s = t2 - t1
        if pin:
            if not torch.cuda.is_available():
                warnings.warn(
                    "kvbm: CUDA is not available; the host arena is pageable memory, not pinned",
                    RuntimeWarning, stacklevel=2,
                )
                st.notes.append("no CUDA: pageable")
            else:
                try:
                    _register(addr, size)
                    mapping.registered = True
                    st.pinned = True
                except Exception as exc:  # e.g. RLIMIT_MEMLOCK; still usable, just slower copies
                    warnings.warn(f"kvbm: {exc}; the host arena is pageable memory, not pinned",
                                  RuntimeWarning, stacklevel=2)
                    st.notes.append(f"register failed: {exc}")
        st.register_s = time.perf_counter() - t2
    except BaseException:
        mapping.release()
        raise
    st.total_s = time.perf_counter() - t0
    logger.info(
        "kvbm: %s host memory %.2f GB in %.2f s "
        "(map %.2f, populate %.2f via %s on %d threads, register %.2f)",
        "pinned" if st.pinned else "pageable", num_bytes / 1e9, st.total_s, st.map_s, st.populate_s,
        st.populate_method, threads, st.register_s,
    )
    return flat[:num_bytes]


def allocate_pinned(
    num_bytes: int,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Pinned (page-locked, GPU-mapped) 1-D uint8 host tensor of ``num_bytes``.

    Much faster than ``torch.empty(..., pin_memory=True)`` for large sizes:
    pages are faulted in from ``threads`` threads and registered with CUDA
    once. Falls back to pageable memory, with a warning, without CUDA. The
    memory's contents are zero.
    """
    return allocate_host(num_bytes, pin=True, threads=threads, progress=progress)
