"""Copy engines: batched G1↔G2 copies behind one small interface.

The transfer executor (:mod:`kvbm.transfer.executor`) submits whole batches
(a store batch per step, a load per request) under integer keys and later
polls for completions, so an engine may run copies asynchronously (CUDA
streams) or synchronously (the torch engine below, used on CPU). Each batch is
one gather or scatter per layer over all its blocks, never a copy per block.
Engines time their own copies (a completion carries its seconds), so callers
never need to know which kind they hold.

Layer-wise loads (:meth:`CopyEngine.load_layers`): a step's in-step loads are
issued layer by layer, and each attention layer waits for its own layer only
(:meth:`CopyEngine.wait_layer`) instead of the forward pass waiting for every
block up front (:meth:`CopyEngine.fence_loads`), so layer *i* is copied while
layer *i-1* computes. A CUDA engine copies on its load stream with an event
per layer; the CPU engine below copies layer *i* when it is waited for (CPU
copies are synchronous: nothing overlaps, but the same path runs, so real-vLLM
tests on CPU cover it). ``fence_loads`` ends a step's layer-wise loads: every
layer not waited for lands (CUDA: the compute stream is ordered after it)
before the step's stores read G1 or the next step begins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch

from kvbm.storage.host import HostArena
from kvbm.transfer.layout import KVLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    kind: str  # "store" (G1→G2) or "load" (G2→G1)
    key: int  # the caller's key for the batch
    ok: bool
    #: From submission until the engine saw the copy complete (a synchronous engine: the copy itself).
    seconds: float = field(default=0.0, compare=False)


class CopyEngine(Protocol):
    def store(self, key: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        """Start copying GPU blocks into host slots (G1→G2)."""

    def load(self, key: int, host_slots: list[int], gpu_blocks: list[int]) -> None:
        """Start copying host slots into GPU blocks (G2→G1)."""

    def load_layers(self, loads: Sequence[tuple[int, list[int], list[int]]], order: Sequence[int]) -> None:
        """Start the loads ``(key, host_slots, gpu_blocks)`` layer by layer, layers (indices into
        the layout) in ``order``: the order the forward pass reaches them."""

    def wait_layer(self, layer: int) -> None:
        """Order the compute stream after layer ``layer`` of the layer-wise loads, without
        blocking the CPU (the CPU engine copies that layer now)."""

    def poll(self) -> list[Completion]:
        """Completions since the last poll; never blocks."""

    def drain(self) -> None:
        """Block until every submitted copy has completed."""

    def fence_loads(self) -> None:
        """Order the compute stream after every load submitted so far, layer-wise ones included,
        without blocking the CPU: a synchronous load's blocks are read by the forward pass of
        the same step."""

    def fence_stores(self) -> None:
        """Order the compute stream after every store submitted so far (the next forward pass may
        overwrite blocks they read: a sliding-window group's, which vLLM frees while a request
        runs). Engines whose stores complete before returning need nothing; by default, drain."""
        self.drain()

    def close(self) -> None:
        """Drain and release what the engine holds (streams, registrations)."""


@dataclass
class _LayeredLoad:
    key: int
    runs: list[tuple[int, int, int]]
    ok: bool = True
    seconds: float = 0.0


#: A single-threaded engine copies a batch of more runs than this with one indexed numpy copy
#: per layer instead of one copy per run (per-run Python costs ~µs; a 128 KiB block of 16 layers
#: scattered to random G1 blocks is 16 runs of 8 KiB).
_INDEXED_RUNS = 8


class TorchCopyEngine:
    """Synchronous engine for CPU caches: ``copy_`` over runs of consecutive blocks.

    One ``copy_`` per run of blocks that are consecutive both in the KV cache and in
    the host arena (slots are handed out in runs, so a prefix is often a few runs),
    per layer. Index-based gathers (``index_select`` + ``index_copy_``) go through a
    temporary and move ~1 GB/s here; plain copies of whole rows run at memory speed.
    Layer-wise loads are lazy: layer *i* is copied when it is waited for.

    ``parallel=False``: copies run on the calling thread only (numpy, which releases the GIL)
    instead of torch's intra-op thread pool, and a batch of many runs is one indexed copy per
    layer. The row pool between G1 and the block media uses it: its copies run while the
    medium's I/O threads read and checksum, and torch's OpenMP workers, which spin and must
    all be scheduled for every ``copy_``, then fight those threads for the cores (on 2 busy
    cores a 4 MiB ``copy_`` took 2.6 ms instead of 0.1 ms; ``bench/disk.py --executor``).
    """

    def __init__(self, layout: KVLayout, views: list[torch.Tensor], arena: HostArena, *,
                 parallel: bool = True) -> None:
        self.layout = layout
        self._device_views = views
        self._host_views = [
            arena.segment(layer.offset, layer.outer, layer.inner_bytes) for layer in layout.layers
        ]
        # numpy views of the same bytes (uint8 CPU tensors: no copy) for the single-threaded copies
        self._np_views = None if parallel else [
            (device.numpy(), host.numpy()) for device, host in zip(views, self._host_views)
        ]
        self._done: list[Completion] = []
        self._layered: list[_LayeredLoad] = []  # layer-wise loads not complete yet
        self._layers_left: list[int] = []  # their layers not copied yet, in order

    @staticmethod
    def _runs(blocks: list[int], slots: list[int]) -> list[tuple[int, int, int]]:
        """(first block, first slot, length) runs, consecutive in both."""
        runs: list[tuple[int, int, int]] = []
        for block, slot in sorted(zip(blocks, slots)):
            if runs and runs[-1][0] + runs[-1][2] == block and runs[-1][1] + runs[-1][2] == slot:
                runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
            else:
                runs.append((block, slot, 1))
        return runs

    def _check(self, blocks: list[int], slots: list[int]) -> list[tuple[int, int, int]]:
        """The copy's runs; raises for ids out of range."""
        if len(blocks) != len(slots):
            raise ValueError(f"{len(blocks)} blocks but {len(slots)} slots")
        if blocks and (min(blocks) < 0 or max(blocks) >= self.layout.num_blocks):
            raise IndexError(f"block id out of range [0, {self.layout.num_blocks})")
        num_slots = self._host_views[0].shape[0]
        if slots and (min(slots) < 0 or max(slots) >= num_slots):
            raise IndexError(f"host slot out of range [0, {num_slots})")
        return self._runs(blocks, slots)

    def _copy_layer(self, layer: int, runs: list[tuple[int, int, int]], to_host: bool,
                    index: tuple[np.ndarray, np.ndarray | slice] | None = None) -> None:
        # device [outer, num_blocks, inner]; host [num_slots, outer, inner]
        if self._np_views is not None:
            device_np, host_np = self._np_views[layer]
            if index is not None:  # many runs: one indexed copy (slots as a slice where consecutive)
                blocks, slots = index
                if to_host:
                    host_np[slots] = device_np[:, blocks].swapaxes(0, 1)
                else:
                    device_np[:, blocks] = host_np[slots].swapaxes(0, 1)
                return
            for block, slot, n in runs:
                gpu_np = device_np[:, block : block + n]
                row_np = host_np[slot : slot + n].swapaxes(0, 1)
                np.copyto(row_np if to_host else gpu_np, gpu_np if to_host else row_np)
            return
        device, host = self._device_views[layer], self._host_views[layer]
        for block, slot, n in runs:
            gpu = device[:, block : block + n]
            row = host[slot : slot + n].transpose(0, 1)
            (row if to_host else gpu).copy_(gpu if to_host else row)

    @staticmethod
    def _index(gpu_blocks: list[int], host_slots: list[int]) -> tuple[np.ndarray, np.ndarray | slice]:
        """The batch as numpy indices, its slots a slice when consecutive (pool rows mostly are)."""
        slots = np.asarray(host_slots, dtype=np.int64)
        first = int(slots[0])
        if np.array_equal(slots, np.arange(first, first + len(slots))):
            return np.asarray(gpu_blocks, dtype=np.int64), slice(first, first + len(slots))
        return np.asarray(gpu_blocks, dtype=np.int64), slots

    def store(self, key: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        self._run("store", key, gpu_blocks, host_slots)

    def load(self, key: int, host_slots: list[int], gpu_blocks: list[int]) -> None:
        self._run("load", key, gpu_blocks, host_slots)

    def _run(self, kind: str, key: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        start, ok = time.perf_counter(), True
        try:
            runs = self._check(gpu_blocks, host_slots)
            index = None
            n = len(gpu_blocks)
            if self._np_views is not None and len(runs) > _INDEXED_RUNS and len(set(gpu_blocks)) == n == len(
                    set(host_slots)):  # repeated ids keep the runs' order: last one wins
                index = self._index(gpu_blocks, host_slots)
            for layer in range(len(self._device_views)):
                self._copy_layer(layer, runs, to_host=kind == "store", index=index)
        except Exception:  # a failed copy is a miss (store) or a recompute (load), never a crash
            logger.exception("kvbm: %s %s failed; its blocks are not cached / are recomputed", kind, key)
            ok = False
        self._done.append(Completion(kind, key, ok, time.perf_counter() - start))

    def load_layers(self, loads: Sequence[tuple[int, list[int], list[int]]], order: Sequence[int]) -> None:
        """Lazy: a layer is copied when it is waited for, the rest when the loads are fenced."""
        self.fence_loads()  # earlier layer-wise loads land first, as on a stream
        for key, host_slots, gpu_blocks in loads:
            try:
                self._layered.append(_LayeredLoad(key, self._check(gpu_blocks, host_slots)))
            except Exception:
                logger.exception("kvbm: load %s failed; it will be recomputed", key)
                self._done.append(Completion("load", key, False))
        self._layers_left = list(order) if self._layered else []

    def wait_layer(self, layer: int) -> None:
        if layer not in self._layers_left:
            return  # copied already, or no layer-wise load pending
        self._layers_left.remove(layer)
        for load in self._layered:
            start = time.perf_counter()
            try:
                self._copy_layer(layer, load.runs, to_host=False)
            except Exception:
                logger.exception("kvbm: load %s failed at layer %d; it will be recomputed", load.key, layer)
                load.ok = False
            load.seconds += time.perf_counter() - start

    def poll(self) -> list[Completion]:
        done, self._done = self._done, []
        return done

    def drain(self) -> None:
        self.fence_loads()

    def fence_stores(self) -> None:
        """Nothing to wait for: a store has copied its blocks when store() returns."""

    def fence_loads(self) -> None:
        """Copy the layers of the layer-wise loads not waited for yet; they then complete
        (every other copy is done when store()/load() returns)."""
        for layer in list(self._layers_left):
            self.wait_layer(layer)
        self._done.extend(Completion("load", load.key, load.ok, load.seconds) for load in self._layered)
        self._layered = []

    def close(self) -> None:
        self.fence_loads()
