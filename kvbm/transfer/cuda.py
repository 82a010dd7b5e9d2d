"""CUDA copy engine: batched G1 (GPU KV cache) <-> G2 (pinned host arena) copies.

Every layer is described by :mod:`kvbm.transfer.layout` as bytes
``[outer, num_blocks, inner]``; a host slot holds, for each layer at
``LayerLayout.offset``, ``outer`` runs of ``inner`` bytes. So a batch of ``n``
blocks is ``n x sum(outer)`` contiguous runs ("planes"), ``inner`` bytes each on
both sides, scattered over the GPU but gathered into one row per slot on the
host.

One Triton kernel moves such a batch: a persistent grid of ``ctas`` programs
walks the work items ``(block i, plane s, chunk c)`` and copies ``chunk_bytes``
per item with 16-byte vector accesses, addressing every layer through a small
device table built once (plane base, block stride, offset inside a host row).
All addresses are offsets from one anchor pointer, which is valid because GPU
memory, pinned host memory and registered host memory share one unified
virtual address space. Two ways to use it, per direction:

``mode="dma"`` (default): the kernel gathers (store) or scatters (load) between
    the KV cache and a small device staging buffer laid out exactly like host
    rows, and the copy engines move whole rows with one batched DMA call
    (``cuMemcpyBatchAsync``) per staging buffer; consecutive host slots are
    merged into one DMA. Two staging buffers per direction and two streams per
    direction overlap the kernel of one chunk with the DMA of the next. The
    PCIe traffic is then plain large DMA (0.98 to 0.99 of one big
    ``cudaMemcpy`` one way, 0.95 to 0.975 both ways at once on an H200), and
    the SMs are busy only for the HBM-speed gather/scatter, so a forward pass
    running beside it barely slows (GEMMs 2% slower, against 14 to 34% for the
    zero-copy kernel). A batch that fits in one staging buffer is exactly one
    kernel launch plus one batched DMA call; a larger one is one of each per
    staging buffer-full (the price of bounded staging memory).
``mode="kernel"``: zero-copy. The same kernel reads/writes the pinned arena
    directly over PCIe; exactly one launch per batch, no staging memory, least
    CPU time; 0.95 (store) and 0.925 (load) of DMA speed one way, but
    GPU-initiated PCIe traffic shares the link badly when both directions run
    (0.76 to 0.80 both ways), and the copy holds SMs for its whole duration.

Ordering: ``store``/``load`` record an event on the caller's current (compute)
stream and the copy's first GPU-side step waits on it, so a store sees
everything the forward pass queued before it, and a load never overwrites
blocks that earlier queued work still uses. Completion is an event after the
last step, observed by ``poll`` through ``event.query()``; nothing but
``drain`` synchronizes. Block/slot indices go through preallocated pinned
buffers and one ``non_blocking`` upload per batch.

Layer-wise loads (``load_layers``): per layer, the layer's bytes of every
loaded block (contiguous inside a host row) are gathered by DMA into a load
staging buffer, then scattered into the KV cache by the kernel, as a whole
load is but one layer at a time, each layer followed by an event;
``wait_layer(i)`` makes the compute stream wait for layer *i*'s event only, so
the copy of layer *i* overlaps the compute of the layers before it. Host slots
are sorted first and every run of consecutive slots is one 2-D DMA (pitch: a
host row), so a layer costs a few driver calls, not one per block and plane
(``layer_path="batch"``, the first version: one ``cuMemcpyBatchAsync`` entry
per block and plane straight into the cache, CPU-bound at ~0.6 us an entry).
When the slots are too scattered for runs to pay (``min_mean_run``), the loads
land whole through staging and every layer's event is the whole load's.
``fence_loads`` still orders the compute stream after everything on the load
stream, layer-wise loads included.

This module is the engine: staging buffers, index uploads, the plans (which
bytes go where, pure functions tested on CPU), streams, events, submit and
poll. The kernels' source and compilation live in
:mod:`kvbm.transfer.cuda_kernels`, the ctypes bindings to the driver's batched
and 2-D copies in :mod:`kvbm.transfer.cuda_driver`; neither imports this one.

Nothing heavy is imported at module import: Triton (and CuPy, for the optional
``backend="cupy"``) are imported when an engine is built, and ``libcuda`` is
opened then too, so the module imports on a machine without a GPU.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvbm.transfer.cuda_driver import BatchCopier
from kvbm.transfer.cuda_kernels import CUPY_THREADS, NUM_WARPS, cupy_kernel, triton_kernel
from kvbm.transfer.engine import Completion

if TYPE_CHECKING:
    from kvbm.storage.host import HostArena
    from kvbm.transfer.layout import KVLayout

logger = logging.getLogger(__name__)

__all__ = ["CudaCopyEngine", "StagedChunk", "layer_copies", "stage_copies", "staged_chunks", "view_planes",
           "DEFAULT_CTAS", "DEFAULT_CHUNK_BYTES", "DEFAULT_STAGING_BYTES"]

# Defaults, from bench/transfer.py on an H200 (docs/gpu-data-plane.md).
DEFAULT_CTAS = 132  # zero-copy kernel: programs per launch
DEFAULT_STAGING_CTAS = 264  # gather/scatter into staging (HBM speed)
DEFAULT_CHUNK_BYTES = 16384  # bytes per work item
# Per staging buffer (2 per direction, 64 MiB of GPU memory in all). Smaller
# buffers interleave stores and loads better on the copy engines (both ways at
# once: 16 MiB 0.975 of plain memcpy, 64 MiB 0.886) but cost more submit time
# (about 145 us of CPU per buffer-full with the Triton kernel).
DEFAULT_STAGING_BYTES = 16 << 20
_IDX_POOL = 16  # preallocated small index buffers (plus two for the largest batch)
_IDX_SMALL = 2048  # values (int64) per small index buffer

# --------------------------------------------------------------------------
# Plans: which bytes go where (pure address arithmetic, tested on CPU).


def layer_copies(planes: list[tuple[int, int, int, int]], arena_ptr: int, row_bytes: int, slots: list[int],
                 blocks: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The copies of one layer-wise load step for one layer: (destinations, sources, sizes), one
    per block and plane, host slot ``slots[i]`` into GPU block ``blocks[i]``. ``planes``: the
    layer's ``(address of block 0, block stride, offset in a host row, bytes)``, as in
    ``CudaCopyEngine._planes``. Pure address arithmetic (tested on CPU with real pointers)."""
    block = np.asarray(blocks, dtype=np.uint64)
    row = np.uint64(arena_ptr) + np.asarray(slots, dtype=np.uint64) * np.uint64(row_bytes)
    dsts = np.concatenate([np.uint64(base) + block * np.uint64(stride) for base, stride, _, _ in planes])
    srcs = np.concatenate([row + np.uint64(offset) for _, _, offset, _ in planes])
    sizes = np.concatenate([np.full(len(block), size, dtype=np.uint64) for *_, size in planes])
    return dsts, srcs, sizes


def view_planes(layout: KVLayout, views: list[torch.Tensor]) -> list[tuple[int, int, int, int]]:
    """Every layer's planes, in layout order: ``(address of block 0, block stride, offset in a
    host row, bytes)`` (a block of a layer is ``outer`` such runs)."""
    planes = []
    for layer, view in zip(layout.layers, views, strict=True):
        outer, nb, inner = view.shape
        if (outer, inner) != (layer.outer, layer.inner_bytes) or nb != layout.num_blocks:
            raise ValueError(f"layer {layer.name}: view {tuple(view.shape)} disagrees with the layout")
        if view.stride(2) != 1:
            raise ValueError(f"layer {layer.name}: runs must be contiguous")
        for o in range(outer):
            planes.append((view.data_ptr() + o * view.stride(0), view.stride(1), layer.offset + o * inner, inner))
    return planes


@dataclass(frozen=True)
class StagedChunk:
    """One staging buffer-full of a layer-wise load: staging row ``j`` lands in GPU block
    ``blocks[j]``; ``runs`` are ``(first staging row, first host slot, rows)`` over consecutive
    host slots (one 2-D DMA each, whatever the layer)."""

    blocks: list[int]
    runs: list[tuple[int, int, int]]


def staged_chunks(slots: list[int], blocks: list[int], rows_per_chunk: int) -> list[StagedChunk]:
    """Split a layer-wise load into staging buffer-fulls, host slots sorted so that consecutive
    slots (what kvbm's pool hands out to one request's blocks) become one run. The same chunks
    serve every layer: computed once per step, not per layer."""
    if rows_per_chunk < 1:
        raise ValueError("a staging buffer must hold at least one row")
    pairs = sorted(zip(slots, blocks, strict=True))
    chunks = []
    for c in range(0, len(pairs), rows_per_chunk):
        part = pairs[c : c + rows_per_chunk]
        runs: list[tuple[int, int, int]] = []
        for j, (slot, _) in enumerate(part):
            if runs and runs[-1][1] + runs[-1][2] == slot:
                row, first, count = runs[-1]
                runs[-1] = (row, first, count + 1)
            else:
                runs.append((j, slot, 1))
        chunks.append(StagedChunk([b for _, b in part], runs))
    return chunks


def stage_copies(chunk: StagedChunk, arena_ptr: int, row_bytes: int, layer_offset: int, layer_bytes: int,
                 staging_ptr: int, min_run: int = 4
                 ) -> tuple[list[tuple[int, int, int, int, int, int]], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The DMAs that gather one layer of ``chunk`` into staging (row ``j`` at ``j * layer_bytes``):
    runs of at least ``min_run`` slots as 2-D copies ``(dst, dst_pitch, src, src_pitch, width,
    height)``, shorter ones as batch entries ``(dsts, srcs, sizes)`` (a 2-D call costs the driver
    several batch entries). Pure address arithmetic (tested on CPU with real pointers)."""
    two_d = []
    singles: list[tuple[int, int]] = []
    for row, slot, count in chunk.runs:
        src = arena_ptr + slot * row_bytes + layer_offset
        dst = staging_ptr + row * layer_bytes
        if count >= min_run:
            two_d.append((dst, layer_bytes, src, row_bytes, layer_bytes, count))
        else:
            singles += [(dst + k * layer_bytes, src + k * row_bytes) for k in range(count)]
    dsts = np.array([d for d, _ in singles], dtype=np.uint64)
    srcs = np.array([s for _, s in singles], dtype=np.uint64)
    return two_d, (dsts, srcs, np.full(len(singles), layer_bytes, dtype=np.uint64))


@dataclass
class _Inflight:
    event: torch.cuda.Event
    completion: Completion
    idx: _IdxBuf | None
    start: float = 0.0  # perf_counter at submission: the completion's seconds run from here


@dataclass
class _IdxBuf:
    host: torch.Tensor  # pinned int64
    dev: torch.Tensor  # device int64


def _alignment(values: list[int]) -> int:
    align = 16
    while align > 1 and any(v % align for v in values):
        align //= 2
    return align


class CudaCopyEngine:
    """Asynchronous G1↔G2 copies for CUDA KV caches (see the module docstring).

    ``views`` are the per-layer uint8 ``[outer, num_blocks, inner]`` views from
    :func:`kvbm.transfer.layout.describe_kv_caches` (CUDA tensors);
    ``arena.buffer`` is the ``[num_slots, row_bytes >= block_bytes]`` host
    arena, pinned (registered here, with a warning, if it is not).

    Options: ``store_mode`` / ``load_mode``: ``"dma"`` (default) or
    ``"kernel"`` (zero-copy). ``staging_bytes``: size of each of the two
    staging buffers per direction in dma mode (rounded to whole rows, at least
    one). ``backend``: ``"triton"`` or ``"cupy"`` (CUDA C through CuPy; needs
    16-byte alignment). ``ctas``: programs per zero-copy launch (the copy never
    holds more of the GPU than that); ``staging_ctas``: the same for the
    gather/scatter into staging. ``chunk_bytes``: bytes per work item.
    ``dma_api``: ``"batch"`` (one ``cuMemcpyBatchAsync`` per staging buffer) or
    ``"memcpy"`` (one ``cuMemcpyAsync`` per run of consecutive host slots).
    ``layer_path``: how :meth:`load_layers` moves a layer: ``"staged"`` (default: 2-D DMA of
    runs of host slots into the load staging buffers, then the scatter kernel) or ``"batch"``
    (one batched DMA entry per block and plane straight into the cache; also used when loads
    have no staging, ``load_mode="kernel"``).
    """

    def __init__(
        self,
        layout: KVLayout,
        views: list[torch.Tensor],
        arena: HostArena,
        *,
        store_mode: str = "dma",
        load_mode: str = "dma",
        staging_bytes: int | None = None,
        backend: str = "triton",
        ctas: int | None = None,
        staging_ctas: int | None = None,
        chunk_bytes: int | None = None,
        dma_api: str = "batch",
        layer_path: str = "staged",
        load_priority: int = 0,
        warmup: bool = True,
    ) -> None:
        if not views or not all(v.is_cuda for v in views):
            raise ValueError("CudaCopyEngine needs CUDA tensors; use TorchCopyEngine on CPU")
        if len(views) != len(layout.layers):
            raise ValueError(f"{len(views)} views for {len(layout.layers)} layers")
        if backend not in ("triton", "cupy"):
            raise ValueError(f"unknown backend {backend!r}")
        for mode in (store_mode, load_mode):
            if mode not in ("dma", "kernel"):
                raise ValueError(f"unknown mode {mode!r}: 'dma' or 'kernel'")
        if layer_path not in ("staged", "batch"):
            raise ValueError(f"unknown layer_path {layer_path!r}: 'staged' or 'batch'")
        self.layer_path = layer_path if load_mode == "dma" else "batch"
        #: staged layer-wise loads land whole when host slots form runs shorter than this on average
        self.min_mean_run = 8
        self.layout = layout
        self.device = views[0].device
        self._views = views
        self._arena = arena
        buf = arena.buffer
        if buf.dim() != 2 or buf.dtype != torch.uint8 or buf.stride(1) != 1:
            raise ValueError("arena.buffer must be a uint8 [num_slots, row_bytes] tensor with dense rows")
        if buf.shape[1] < layout.block_bytes:
            raise ValueError(f"host slots of {buf.shape[1]} B cannot hold blocks of {layout.block_bytes} B")
        self.num_slots = buf.shape[0]
        self._registered_here = False
        if not buf.is_pinned():
            logger.warning("kvbm: host arena is not pinned; registering it with CUDA (slow for large arenas)")
            self._register(buf)
        self.backend = backend
        self.store_mode, self.load_mode = store_mode, load_mode
        self.ctas = int(ctas or DEFAULT_CTAS)
        self.staging_ctas = int(staging_ctas or DEFAULT_STAGING_CTAS)
        chunk = int(chunk_bytes or DEFAULT_CHUNK_BYTES)
        if chunk & (chunk - 1):
            raise ValueError("chunk_bytes must be a power of two")
        self.chunk_bytes = chunk
        self._row_bytes = buf.stride(0)
        self._arena_ptr = buf.data_ptr()
        self._dev_index = self.device.index if self.device.index is not None else torch.cuda.current_device()

        with torch.cuda.device(self.device):
            self._store_stream = torch.cuda.Stream(self.device)  # kernel side of stores
            self._load_stream = torch.cuda.Stream(self.device, priority=load_priority)  # kernel side of loads
            self._store_dma_stream = torch.cuda.Stream(self.device)
            self._load_dma_stream = torch.cuda.Stream(self.device, priority=load_priority)
            uses_dma = "dma" in (store_mode, load_mode)
            self._rows_per_staging = 0
            self._staging: dict[bool, list[torch.Tensor]] = {}
            if uses_dma:
                want = int(staging_bytes or DEFAULT_STAGING_BYTES)
                self._rows_per_staging = max(1, want // self._row_bytes)
                for to_host, mode in ((True, store_mode), (False, load_mode)):
                    if mode == "dma":
                        self._staging[to_host] = [
                            torch.empty(self._rows_per_staging * self._row_bytes, dtype=torch.uint8,
                                        device=self.device)
                            for _ in range(2)
                        ]
            if dma_api not in ("batch", "memcpy"):
                raise ValueError(f"unknown dma_api {dma_api!r}: 'batch' or 'memcpy'")
            self._copier = BatchCopier(self._dev_index, use_batch=dma_api == "batch")  # also layer-wise loads
            self._build_tables(views, buf)
            big = max(_IDX_SMALL, 2 * layout.num_blocks)
            self._idx_free = [self._new_idx(_IDX_SMALL) for _ in range(_IDX_POOL)]
            self._idx_free += [self._new_idx(big) for _ in range(2)]
        # per direction, per staging buffer: the event after its last consumer
        self._staging_free: dict[bool, list[torch.cuda.Event | None]] = {True: [None, None],
                                                                         False: [None, None]}
        self._staging_next = {True: 0, False: 0}
        self._store_q: deque[_Inflight] = deque()
        self._load_q: deque[_Inflight] = deque()
        self._ready: list[Completion] = []
        self._layer_events: dict[int, torch.cuda.Event] = {}  # the last layer-wise loads: layer -> landed
        logger.info(
            "kvbm: CUDA copy engine (store %s, load %s, %s, %d B vectors, staging %d rows x 2): "
            "%d planes x %d B per block",
            store_mode, load_mode, backend, self.align, self._rows_per_staging, len(self._planes),
            layout.block_bytes,
        )
        if warmup:
            self._warmup()

    # ---- setup ----------------------------------------------------------
    def _register(self, buf: torch.Tensor) -> None:
        base = buf.data_ptr()
        size = buf.shape[0] * buf.stride(0)
        err = torch.cuda.cudart().cudaHostRegister(base, size, 0x1 | 0x2)
        if int(err) != 0:
            raise RuntimeError(f"kvbm: cudaHostRegister of the host arena failed (CUDA error {int(err)})")
        self._registered_here = True
        self._registered_ptr = base

    def _new_idx(self, cap: int) -> _IdxBuf:
        return _IdxBuf(torch.empty(cap, dtype=torch.int64, pin_memory=True),
                       torch.empty(cap, dtype=torch.int64, device=self.device))

    def _build_tables(self, views: list[torch.Tensor], buf: torch.Tensor) -> None:
        anchor = views[0]
        anchor_ptr = anchor.data_ptr()
        if any(view.device != self.device for view in views):
            raise ValueError("all KV cache layers must be on one device")
        planes = view_planes(self.layout, views)
        self._planes = planes
        first = [0]
        for layer in self.layout.layers:
            first.append(first[-1] + layer.outer)
        self._layer_planes = [planes[a:b] for a, b in zip(first, first[1:])]  # a layer's planes
        bases = [self._arena_ptr] + [t.data_ptr() for ts in self._staging.values() for t in ts]
        align = _alignment([anchor_ptr, self._row_bytes, *bases, *(x for p in planes for x in p)])
        if self.backend == "cupy" and align < 16:
            logger.warning("kvbm: layout is only %d-byte aligned; using the triton backend", align)
            self.backend = "triton"
        self.align = align
        esize = 4 if align >= 4 else align  # int32 elements (4 per 16 B vector), else int16/uint8
        self._esize = esize
        self._vec = max(1, align // esize)
        unit = 1 if self.backend == "cupy" else esize  # the cupy kernel works in bytes
        self._unit = unit

        def col(k: int, rel: int = 0) -> torch.Tensor:
            return torch.tensor([(p[k] - rel) // unit for p in planes], dtype=torch.int64, device=self.device)

        self._seg_dev, self._seg_stride = col(0, anchor_ptr), col(1)
        self._seg_host, self._seg_len = col(2), col(3)
        # Per layer, for layer-wise loads through staging: the layer's planes, each at its offset
        # inside the layer's bytes (a staging row holds one layer of one block).
        self._layer_segs = []
        for layer, a, b in zip(self.layout.layers, first[:-1], first[1:], strict=True):
            inside = torch.tensor([(p[2] - layer.offset) // unit for p in planes[a:b]], dtype=torch.int64,
                                  device=self.device)
            # own tensors, not slices: Triton compiles a kernel per pointer alignment
            self._layer_segs.append((self._seg_dev[a:b].clone(), self._seg_stride[a:b].clone(), inside,
                                     self._seg_len[a:b].clone()))
        self._host_row = self._row_bytes // unit
        self._host_base = {"arena": (self._arena_ptr - anchor_ptr) // unit}
        for to_host, ts in self._staging.items():
            for k, t in enumerate(ts):
                self._host_base[(to_host, k)] = (t.data_ptr() - anchor_ptr) // unit
        elem = {4: torch.int32, 2: torch.int16, 1: torch.uint8}[esize]
        self._anchor = anchor.reshape(-1).view(elem)
        self._anchor_ptr = anchor_ptr
        lengths = [p[3] for p in planes]
        self._chunks_per_seg = -(-max(lengths) // self.chunk_bytes)
        self._even = all(x % self.chunk_bytes == 0 for x in lengths)

    def _warmup(self) -> None:
        """Compile every kernel variant now rather than inside the first engine step."""
        with torch.cuda.device(self.device):
            stream = torch.cuda.current_stream(self.device)
            # index slices of a batch split over staging buffers may be only 8-byte aligned
            for empty in (self._idx_free[0].dev[:0], self._idx_free[0].dev[1:1]):
                for to_host, mode in ((True, self.store_mode), (False, self.load_mode)):
                    if mode == "kernel":
                        self._launch(empty, 0, to_host, "arena", self.ctas, stream)
                    else:
                        for k in range(2):
                            self._launch(empty, 0, to_host, (to_host, k), self.staging_ctas, stream)
            stream.synchronize()

    # ---- launching ------------------------------------------------------
    def _launch(self, idx: torch.Tensor, n: int, to_host: bool, target: Any, ctas: int,
                stream: torch.cuda.Stream, layer: int | None = None) -> None:
        """Copy ``n`` blocks between the cache and host rows (arena or a staging buffer); with
        ``layer``, only that layer's planes, between the cache and staging rows of that layer's
        bytes."""
        if layer is None:
            seg_dev, seg_stride, seg_host, seg_len = self._seg_dev, self._seg_stride, self._seg_host, self._seg_len
            host_row = self._host_row
        else:
            seg_dev, seg_stride, seg_host, seg_len = self._layer_segs[layer]
            host_row = self.layout.layers[layer].block_bytes // self._unit
        num_segs = seg_len.numel()
        total = n * num_segs * self._chunks_per_seg
        grid = max(1, min(ctas, total))
        host_base = self._host_base[target]
        if self.backend == "triton":
            kernel = triton_kernel()
            with torch.cuda.stream(stream):
                kernel[(grid,)](
                    self._anchor, seg_dev, seg_stride, seg_host, seg_len,
                    idx, n, host_base, host_row, num_segs, self._chunks_per_seg,
                    TO_HOST=to_host, BLOCK=self.chunk_bytes // self._esize, VEC=self._vec,
                    EVEN=self._even, num_warps=NUM_WARPS,
                )
        else:
            import cupy
            import numpy as np

            kernel = cupy_kernel(self.chunk_bytes)
            with cupy.cuda.Device(self._dev_index), self._cupy_stream(stream):
                kernel(
                    (grid,), (CUPY_THREADS,),
                    (
                        np.uint64(seg_dev.data_ptr()), np.uint64(seg_stride.data_ptr()),
                        np.uint64(seg_host.data_ptr()), np.uint64(seg_len.data_ptr()),
                        np.uint64(idx.data_ptr()), np.int64(n), np.int64(host_base), np.int64(host_row),
                        np.int32(num_segs), np.int32(self._chunks_per_seg), np.int32(1 if to_host else 0),
                        np.uint64(self._anchor_ptr),
                    ),
                )

    def _cupy_stream(self, stream: torch.cuda.Stream) -> Any:
        cache = self.__dict__.setdefault("_cupy_streams", {})
        handle = stream.cuda_stream
        if handle not in cache:
            import warnings

            import cupy

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                cache[handle] = cupy.cuda.ExternalStream(handle, self._dev_index)
        return cache[handle]

    def _upload(self, values: list[int], stream: torch.cuda.Stream) -> _IdxBuf:
        """Indices to the device through a preallocated pinned buffer (no allocation, no sync)."""
        m = len(values)
        fits = [k for k, cand in enumerate(self._idx_free) if cand.host.numel() >= m]
        if fits:  # the smallest that fits
            buf = self._idx_free.pop(min(fits, key=lambda k: self._idx_free[k].host.numel()))
        else:  # rare: more batches in flight than the pool holds
            logger.debug("kvbm: growing the index pool (%d values)", m)
            buf = self._new_idx(max(m, _IDX_SMALL))
        buf.host[:m].copy_(torch.tensor(values, dtype=torch.int64))
        with torch.cuda.stream(stream):
            buf.dev[:m].copy_(buf.host[:m], non_blocking=True)
        return buf

    def _release(self, item: _Inflight) -> _Inflight:
        if item.idx is not None:
            self._idx_free.append(item.idx)
            item.idx = None
        return item

    def _check(self, blocks: list[int], slots: list[int]) -> None:
        n = len(blocks)
        if n != len(slots):
            raise ValueError(f"{n} GPU blocks but {len(slots)} host slots")
        if n and (min(blocks) < 0 or max(blocks) >= self.layout.num_blocks):
            raise IndexError(f"GPU block id out of range [0, {self.layout.num_blocks})")
        if n and (min(slots) < 0 or max(slots) >= self.num_slots):
            raise IndexError(f"host slot out of range [0, {self.num_slots})")

    def _submit(self, kind: str, key: int, blocks: list[int], slots: list[int]) -> None:
        start = time.perf_counter()
        n = len(blocks)
        self._check(blocks, slots)
        to_host = kind == "store"
        queue = self._store_q if to_host else self._load_q
        kstream = self._store_stream if to_host else self._load_stream
        with torch.cuda.device(self.device):
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            kstream.wait_event(ready)
            mode = self.store_mode if to_host else self.load_mode
            if n == 0:
                done, idx = torch.cuda.Event(), None
                done.record(kstream)
            elif mode == "kernel":
                idx = self._upload(list(blocks) + list(slots), kstream)
                self._launch(idx.dev, n, to_host, "arena", self.ctas, kstream)
                done = torch.cuda.Event()
                done.record(kstream)
            else:
                done, idx = self._submit_staged(to_host, blocks, slots, kstream)
        queue.append(_Inflight(done, Completion(kind, key, True), idx, start))

    def _submit_staged(self, to_host: bool, blocks: list[int], slots: list[int],
                       kstream: torch.cuda.Stream) -> tuple[torch.cuda.Event, _IdxBuf]:
        """Chunks of up to one staging buffer: kernel <-> staging on ``kstream``, DMA on the DMA stream."""
        dstream = self._store_dma_stream if to_host else self._load_dma_stream
        rows = self._rows_per_staging
        pairs = sorted(zip(slots, blocks, strict=True))  # consecutive slots -> one DMA
        chunks = [pairs[c : c + rows] for c in range(0, len(pairs), rows)]
        values: list[int] = []
        for chunk in chunks:
            values += [b for _, b in chunk]
            values += range(len(chunk))
        idx = self._upload(values, kstream)
        row, arena = self._row_bytes, self._arena_ptr
        offset = 0
        last = None
        for chunk in chunks:
            m = len(chunk)
            k = self._staging_next[to_host]
            self._staging_next[to_host] = 1 - k
            staging = self._staging[to_host][k]
            free = self._staging_free[to_host][k]
            # DMA runs: consecutive host slots <-> consecutive staging rows
            dsts, srcs, sizes = [], [], []
            j = 0
            while j < m:
                e = j + 1
                while e < m and chunk[e][0] == chunk[e - 1][0] + 1:
                    e += 1
                host_addr, stage_addr = arena + chunk[j][0] * row, staging.data_ptr() + j * row
                dsts.append(host_addr if to_host else stage_addr)
                srcs.append(stage_addr if to_host else host_addr)
                sizes.append((e - j) * row)
                j = e
            sub = idx.dev[offset : offset + 2 * m]
            offset += 2 * m
            if to_host:  # gather (kernel stream) -> DMA (dma stream)
                if free is not None:
                    kstream.wait_event(free)
                self._launch(sub, m, True, (True, k), self.staging_ctas, kstream)
                gathered = torch.cuda.Event()
                gathered.record(kstream)
                dstream.wait_event(gathered)
                self._copier.copy(dsts, srcs, sizes, True, dstream.cuda_stream)
                last = torch.cuda.Event()
                last.record(dstream)
            else:  # DMA (dma stream) -> scatter (kernel stream)
                if free is not None:
                    dstream.wait_event(free)
                self._copier.copy(dsts, srcs, sizes, False, dstream.cuda_stream)
                landed = torch.cuda.Event()
                landed.record(dstream)
                kstream.wait_event(landed)
                self._launch(sub, m, False, (False, k), self.staging_ctas, kstream)
                last = torch.cuda.Event()
                last.record(kstream)
            self._staging_free[to_host][k] = last
        assert last is not None
        return last, idx

    # ---- CopyEngine -----------------------------------------------------
    def store(self, key: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        """Start copying GPU blocks into host slots (G1→G2); returns at once."""
        try:
            self._submit("store", key, gpu_blocks, host_slots)
        except Exception:  # a failed store is a miss later, never a crash now
            logger.exception("kvbm: store %s failed; its blocks will not be cached", key)
            self._ready.append(Completion("store", key, False))

    def load(self, key: int, host_slots: list[int], gpu_blocks: list[int]) -> None:
        """Start copying host slots into GPU blocks (G2→G1); returns at once."""
        try:
            self._submit("load", key, gpu_blocks, host_slots)
        except Exception:
            logger.exception("kvbm: load %s failed; it will be recomputed", key)
            self._ready.append(Completion("load", key, False))

    def load_layers(self, loads: list[tuple[int, list[int], list[int]]], order: list[int]) -> None:
        """Start the loads ``(key, host_slots, gpu_blocks)`` layer by layer (layers in ``order``,
        any missing ones after): per layer, every load's blocks of that layer, then an event (see
        :meth:`wait_layer`). Like :meth:`load`, ordered after the compute stream's earlier work;
        returns at once."""
        start = time.perf_counter()
        self._layer_events = {}
        good = []
        for key, slots, blocks in loads:
            try:
                self._check(blocks, slots)
                good.append((key, slots, blocks))
            except Exception:
                logger.exception("kvbm: load %s failed; it will be recomputed", key)
                self._ready.append(Completion("load", key, False))
        if not good:
            return
        layers = list(dict.fromkeys([*order, *range(len(self._layer_planes))]))
        idx = None
        try:
            with torch.cuda.device(self.device):
                stream = self._load_stream
                ready = torch.cuda.Event()
                ready.record(torch.cuda.current_stream(self.device))
                stream.wait_event(ready)
                slots = [s for _, ss, _ in good for s in ss]
                blocks = [b for _, _, bs in good for b in bs]
                if self.layer_path == "staged":
                    idx = self._layers_staged(slots, blocks, layers)
                else:
                    for layer in layers:
                        copies = layer_copies(self._layer_planes[layer], self._arena_ptr, self._row_bytes, slots,
                                              blocks)
                        self._copier.copy_arrays(*copies, False, stream.cuda_stream)
                        landed = torch.cuda.Event()
                        landed.record(stream)
                        self._layer_events[layer] = landed
        except Exception:  # the loads are recomputed; layers that were issued still order the forward
            logger.exception("kvbm: layer-wise loads %s failed; they will be recomputed", [k for k, _, _ in good])
            self._ready.extend(Completion("load", key, False) for key, _, _ in good)
            return
        last = self._layer_events[layers[-1]]
        for n, (key, _, _) in enumerate(good):  # one stream: they complete with the last layer, in order
            # the index buffer goes back to the pool with the first completion (all share one event)
            self._load_q.append(_Inflight(last, Completion("load", key, True), idx if n == 0 else None, start))

    def _layers_staged(self, slots: list[int], blocks: list[int], layers: list[int]) -> _IdxBuf:
        """Per layer and staging buffer-full: the layer's bytes of runs of consecutive host slots
        by 2-D DMA into staging (DMA stream), then the scatter kernel into the cache (load stream),
        then that layer's event. The two staging buffers alternate as in :meth:`_submit_staged`."""
        kstream, dstream = self._load_stream, self._load_dma_stream
        widest = max(layer.block_bytes for layer in self.layout.layers)
        rows = max(1, self._rows_per_staging * self._row_bytes // widest)
        chunks = staged_chunks(slots, blocks, rows)
        if sum(len(chunk.runs) for chunk in chunks) * self.min_mean_run > len(blocks):
            # Host slots too scattered (a pool churned by evictions): per layer, a DMA entry per
            # block costs more CPU than the copy takes (bench/layerwise.py: 39 ms against 31 for
            # 832 blocks), so the load lands whole and every layer waits for all of it.
            done, idx = self._submit_staged(False, blocks, slots, kstream)
            self._layer_events = dict.fromkeys(layers, done)
            return idx
        values: list[int] = []
        for chunk in chunks:
            values += chunk.blocks
            values += range(len(chunk.blocks))
        idx = self._upload(values, kstream)
        subs, offset = [], 0
        for chunk in chunks:
            m = len(chunk.blocks)
            subs.append(idx.dev[offset : offset + 2 * m])
            offset += 2 * m
        for layer in layers:
            lay = self.layout.layers[layer]
            for chunk, sub in zip(chunks, subs, strict=True):
                k = self._staging_next[False]
                self._staging_next[False] = 1 - k
                staging = self._staging[False][k]
                free = self._staging_free[False][k]
                if free is not None:
                    dstream.wait_event(free)
                two_d, batch = stage_copies(chunk, self._arena_ptr, self._row_bytes, lay.offset, lay.block_bytes,
                                            staging.data_ptr())
                for copy in two_d:
                    self._copier.copy2d(*copy, dstream.cuda_stream)
                if len(batch[0]):
                    self._copier.copy_arrays(*batch, False, dstream.cuda_stream)
                landed = torch.cuda.Event()
                landed.record(dstream)
                kstream.wait_event(landed)
                self._launch(sub, len(chunk.blocks), False, (False, k), self.staging_ctas, kstream, layer=layer)
                scattered = torch.cuda.Event()
                scattered.record(kstream)
                self._staging_free[False][k] = scattered
            self._layer_events[layer] = scattered
        return idx

    def wait_layer(self, layer: int) -> None:
        """The compute (current) stream waits for layer ``layer`` of the last layer-wise loads."""
        event = self._layer_events.get(layer)
        if event is not None:
            with torch.cuda.device(self.device):
                torch.cuda.current_stream(self.device).wait_event(event)

    def poll(self) -> list[Completion]:
        """Completions since the last poll, by event query; never blocks. A completion's
        seconds run from its submission to this poll (what the caller waited)."""
        done, self._ready = self._ready, []
        now = time.perf_counter()
        for queue in (self._store_q, self._load_q):
            while queue and queue[0].event.query():  # one stream per queue: completes in order
                item = self._release(queue.popleft())
                c = item.completion
                done.append(Completion(c.kind, c.key, c.ok, now - item.start))
        return done

    def fence_loads(self) -> None:
        """The compute (current) stream waits for every load submitted so far: the last event of
        a load is recorded on the load kernel stream, after its DMA landed (see _submit)."""
        with torch.cuda.device(self.device):
            torch.cuda.current_stream(self.device).wait_stream(self._load_stream)

    def fence_stores(self) -> None:
        """The compute stream waits for every store submitted so far, without blocking the CPU."""
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self._store_stream)
            current.wait_stream(self._store_dma_stream)

    def drain(self) -> None:
        """Block until every submitted copy has completed (completions still come from poll)."""
        for stream in (self._store_stream, self._store_dma_stream, self._load_stream, self._load_dma_stream):
            stream.synchronize()

    # ---- extras ---------------------------------------------------------
    @property
    def store_stream(self) -> torch.cuda.Stream:
        """The stream on which a store batch's completion event is recorded."""
        return self._store_dma_stream if self.store_mode == "dma" else self._store_stream

    @property
    def load_stream(self) -> torch.cuda.Stream:
        """The stream on which a load's completion event is recorded."""
        return self._load_stream

    @property
    def staging_bytes(self) -> int:
        """GPU memory held for staging (all buffers)."""
        return sum(t.numel() for ts in self._staging.values() for t in ts)

    def close(self) -> None:
        """Drain, and undo a registration this engine made (if any)."""
        self.drain()
        if self._registered_here:
            torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            self._registered_here = False
