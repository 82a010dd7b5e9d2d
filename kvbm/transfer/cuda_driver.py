"""Bindings to the CUDA driver (``libcuda``) for the DMA side of :mod:`kvbm.transfer.cuda`.

torch exposes one copy per call (``Tensor.copy_``, ``cudaMemcpyAsync``); the copy engine needs
the driver's batched and strided copies, which torch does not wrap: ``cuMemcpyBatchAsync`` (many
copies in one call, the staged path's one DMA call per staging buffer) and ``cuMemcpy2DAsync``
(a run of consecutive host slots in one call, for layer-wise loads). They are reached through
ctypes, so kvbm needs no cuda-python; the structures below mirror the driver's C headers
(``CUmemcpyAttributes``, ``CUDA_MEMCPY2D``) and are the part to check against a new CUDA release.

Kept apart from the engine so the ABI details (struct layouts, the ``_v2`` entry points and
their differing signatures, the fallback to ``cuMemcpyAsync`` when the batch call is missing or
fails) live in one place, and so the argument marshalling can be tested on CPU by replacing the
driver functions (``tests/test_layerwise.py``). ``libcuda`` is opened when a
:class:`BatchCopier` is built, never at import: this module imports on a machine without a GPU.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["BatchCopier"]


class _MemLoc(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemcpyAttributes(ctypes.Structure):
    _fields_ = [
        ("srcAccessOrder", ctypes.c_int),
        ("srcLocHint", _MemLoc),
        ("dstLocHint", _MemLoc),
        ("flags", ctypes.c_uint),
    ]


_CU_MEMCPY_SRC_ACCESS_ORDER_STREAM = 1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_LOCATION_TYPE_HOST = 2


class _Memcpy2D(ctypes.Structure):
    """``CUDA_MEMCPY2D``: ``Height`` rows of ``WidthInBytes``, each side with its own pitch."""

    _fields_ = [
        ("srcXInBytes", ctypes.c_size_t), ("srcY", ctypes.c_size_t), ("srcMemoryType", ctypes.c_int),
        ("srcHost", ctypes.c_void_p), ("srcDevice", ctypes.c_uint64), ("srcArray", ctypes.c_void_p),
        ("srcPitch", ctypes.c_size_t),
        ("dstXInBytes", ctypes.c_size_t), ("dstY", ctypes.c_size_t), ("dstMemoryType", ctypes.c_int),
        ("dstHost", ctypes.c_void_p), ("dstDevice", ctypes.c_uint64), ("dstArray", ctypes.c_void_p),
        ("dstPitch", ctypes.c_size_t),
        ("WidthInBytes", ctypes.c_size_t), ("Height", ctypes.c_size_t),
    ]


_CU_MEMORYTYPE_UNIFIED = 4  # an address in the one UVA space: host (pinned) or device


class BatchCopier:
    """``cuMemcpyBatchAsync`` (one call for many copies), else one ``cuMemcpyAsync`` per copy."""

    def __init__(self, device_index: int, use_batch: bool = True) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        self._batch = None
        self._failidx = False
        names = (("cuMemcpyBatchAsync_v2", False), ("cuMemcpyBatchAsync", True)) if use_batch else ()
        for name, failidx in names:
            try:
                fn = getattr(lib, name)
            except AttributeError:
                continue
            fn.restype = ctypes.c_int
            self._batch, self._failidx = fn, failidx
            break
        self._single = lib.cuMemcpyAsync
        self._single.restype = ctypes.c_int
        self._single.argtypes = [ctypes.c_uint64, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_void_p]
        self._copy2d_fn = lib.cuMemcpy2DAsync_v2
        self._copy2d_fn.restype = ctypes.c_int
        self._copy2d_fn.argtypes = [ctypes.POINTER(_Memcpy2D), ctypes.c_void_p]
        self._desc2d = _Memcpy2D()
        self._desc2d.srcMemoryType = self._desc2d.dstMemoryType = _CU_MEMORYTYPE_UNIFIED
        self._attrs = {}
        for to_host in (True, False):
            attr = _MemcpyAttributes()
            attr.srcAccessOrder = _CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
            dev = _MemLoc(_CU_MEM_LOCATION_TYPE_DEVICE, device_index)
            host = _MemLoc(_CU_MEM_LOCATION_TYPE_HOST, 0)
            attr.srcLocHint, attr.dstLocHint = (dev, host) if to_host else (host, dev)
            attr.flags = 0
            self._attrs[to_host] = attr
        self._zero = (ctypes.c_size_t * 1)(0)

    @property
    def batched(self) -> bool:
        """Whether copies still go through ``cuMemcpyBatchAsync`` (False once it was missing or failed)."""
        return self._batch is not None

    def copy_arrays(self, dsts: np.ndarray, srcs: np.ndarray, sizes: np.ndarray, to_host: bool,
                    stream: int) -> None:
        """:meth:`copy` from numpy arrays: a layer-wise load passes thousands of copies per layer,
        and building ctypes arrays element by element would cost milliseconds of CPU."""
        count = len(dsts)
        if self._batch is None or count <= 1:
            self.copy(dsts.tolist(), srcs.tolist(), sizes.tolist(), to_host, stream)
            return
        arrays = [np.ascontiguousarray(a, dtype=np.uint64) for a in (dsts, srcs, sizes)]  # alive through the call
        args: list[Any] = [ctypes.c_void_p(a.ctypes.data) for a in arrays]
        args += [ctypes.c_size_t(count), ctypes.byref(self._attrs[to_host]), self._zero, ctypes.c_size_t(1)]
        if self._failidx:
            args.append(ctypes.byref(ctypes.c_size_t(0)))
        args.append(ctypes.c_void_p(stream))
        err = self._batch(*args)
        if err != 0:
            logger.warning("kvbm: cuMemcpyBatchAsync failed (CUresult %d); using cuMemcpyAsync", err)
            self._batch = None
            self.copy(dsts.tolist(), srcs.tolist(), sizes.tolist(), to_host, stream)

    def copy2d(self, dst: int, dst_pitch: int, src: int, src_pitch: int, width: int, height: int,
               stream: int) -> None:
        """One ``cuMemcpy2DAsync``: ``height`` runs of ``width`` bytes, ``src_pitch`` apart in the
        source and ``dst_pitch`` apart in the destination (one driver call for a whole run of
        consecutive host slots, where a batch would take one entry per slot)."""
        d = self._desc2d
        d.srcDevice, d.srcPitch, d.dstDevice, d.dstPitch = src, src_pitch, dst, dst_pitch
        d.WidthInBytes, d.Height = width, height
        err = self._copy2d_fn(ctypes.byref(d), ctypes.c_void_p(stream))
        if err != 0:
            raise RuntimeError(f"cuMemcpy2DAsync failed (CUresult {err})")

    def copy(self, dsts: list[int], srcs: list[int], sizes: list[int], to_host: bool, stream: int) -> None:
        """Queue ``dsts[i] <- srcs[i]`` (``sizes[i]`` bytes each) on ``stream``: one batched call
        where the driver has one (``to_host`` picks the location hints), else one call per copy."""
        count = len(dsts)
        if count == 0:
            return
        if self._batch is not None and count > 1:
            args: list[Any] = [
                (ctypes.c_uint64 * count)(*dsts), (ctypes.c_uint64 * count)(*srcs),
                (ctypes.c_size_t * count)(*sizes), ctypes.c_size_t(count),
                ctypes.byref(self._attrs[to_host]), self._zero, ctypes.c_size_t(1),
            ]
            if self._failidx:
                args.append(ctypes.byref(ctypes.c_size_t(0)))
            args.append(ctypes.c_void_p(stream))
            err = self._batch(*args)
            if err == 0:
                return
            logger.warning("kvbm: cuMemcpyBatchAsync failed (CUresult %d); using cuMemcpyAsync", err)
            self._batch = None
        for d, s, z in zip(dsts, srcs, sizes, strict=True):
            err = self._single(d, s, z, stream)
            if err != 0:
                raise RuntimeError(f"cuMemcpyAsync failed (CUresult {err})")

