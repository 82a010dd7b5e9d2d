"""Copy engines: batched G1↔G2 copies behind one small interface.

The transfer executor (:mod:`kvbm.transfer.executor`) submits whole batches
(a store batch per step, a load per request) under integer keys and later
polls for completions, so an engine may run copies asynchronously (CUDA
streams) or synchronously (the torch engine below, used on CPU). Each batch is
one gather or scatter per layer over all its blocks, never a copy per block.
Engines time their own copies (a completion carries its seconds), so callers
never need to know which kind they hold.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Protocol

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

    def poll(self) -> list[Completion]:
        """Completions since the last poll; never blocks."""

    def drain(self) -> None:
        """Block until every submitted copy has completed."""

    def fence_loads(self) -> None:
        """Order the compute stream after every load submitted so far, without blocking the
        CPU: a synchronous load's blocks are read by the forward pass of the same step."""

    def close(self) -> None:
        """Drain and release what the engine holds (streams, registrations)."""


class TorchCopyEngine:
    """Synchronous engine for CPU caches: ``copy_`` over runs of consecutive blocks.

    One ``copy_`` per run of blocks that are consecutive both in the KV cache and in
    the host arena (slots are handed out in runs, so a prefix is often a few runs),
    per layer. Index-based gathers (``index_select`` + ``index_copy_``) go through a
    temporary and move ~1 GB/s here; plain copies of whole rows run at memory speed.
    """

    def __init__(self, layout: KVLayout, views: list[torch.Tensor], arena: HostArena) -> None:
        self.layout = layout
        self._device_views = views
        self._host_views = [
            arena.segment(layer.offset, layer.outer, layer.inner_bytes) for layer in layout.layers
        ]
        self._done: list[Completion] = []

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

    def _copy(self, blocks: list[int], slots: list[int], to_host: bool) -> None:
        if len(blocks) != len(slots):
            raise ValueError(f"{len(blocks)} blocks but {len(slots)} slots")
        if blocks and (min(blocks) < 0 or max(blocks) >= self.layout.num_blocks):
            raise IndexError(f"block id out of range [0, {self.layout.num_blocks})")
        num_slots = self._host_views[0].shape[0]
        if slots and (min(slots) < 0 or max(slots) >= num_slots):
            raise IndexError(f"host slot out of range [0, {num_slots})")
        runs = self._runs(blocks, slots)
        for device, host in zip(self._device_views, self._host_views):
            # device [outer, num_blocks, inner]; host [num_slots, outer, inner]
            for block, slot, n in runs:
                gpu = device[:, block : block + n]
                row = host[slot : slot + n].transpose(0, 1)
                (row if to_host else gpu).copy_(gpu if to_host else row)

    def store(self, key: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        self._run("store", key, gpu_blocks, host_slots)

    def load(self, key: int, host_slots: list[int], gpu_blocks: list[int]) -> None:
        self._run("load", key, gpu_blocks, host_slots)

    def _run(self, kind: str, key: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        start, ok = time.perf_counter(), True
        try:
            self._copy(gpu_blocks, host_slots, to_host=kind == "store")
        except Exception:  # a failed copy is a miss (store) or a recompute (load), never a crash
            logger.exception("kvbm: %s %s failed; its blocks are not cached / are recomputed", kind, key)
            ok = False
        self._done.append(Completion(kind, key, ok, time.perf_counter() - start))

    def poll(self) -> list[Completion]:
        done, self._done = self._done, []
        return done

    def drain(self) -> None:
        return None

    def fence_loads(self) -> None:
        return None  # copies are done when load() returns

    def close(self) -> None:
        return None
