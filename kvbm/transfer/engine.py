"""Copy engines: batched G1↔G2 copies behind one small interface.

The worker submits whole batches (a store batch per step, a load per
request) and later polls for completions, so an engine may run copies
asynchronously (CUDA streams) or synchronously (the torch engine below, used
on CPU). Each batch is one gather or scatter per layer over all its blocks,
never a copy per block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import torch

from kvbm.storage.host import HostArena
from kvbm.transfer.layout import KVLayout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    kind: str  # "store" or "load"
    key: int | str  # store batch id or request id
    ok: bool


class CopyEngine(Protocol):
    def store(self, batch_id: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        """Start copying GPU blocks into host slots (G1→G2)."""

    def load(self, req_id: str, host_slots: list[int], gpu_blocks: list[int]) -> None:
        """Start copying host slots into GPU blocks (G2→G1)."""

    def poll(self) -> list[Completion]:
        """Completions since the last poll; never blocks."""

    def drain(self) -> None:
        """Block until every submitted copy has completed."""

    def fence_loads(self) -> None:
        """Order the compute stream after every load submitted so far, without blocking the
        CPU: a synchronous load's blocks are read by the forward pass of the same step."""


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

    def store(self, batch_id: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        ok = True
        try:
            self._copy(gpu_blocks, host_slots, to_host=True)
        except Exception:  # a failed store is a miss later, never a crash now
            logger.exception("kvbm: store batch %d failed; its blocks will not be cached", batch_id)
            ok = False
        self._done.append(Completion("store", batch_id, ok))

    def load(self, req_id: str, host_slots: list[int], gpu_blocks: list[int]) -> None:
        ok = True
        try:
            self._copy(gpu_blocks, host_slots, to_host=False)
        except Exception:
            logger.exception("kvbm: load for request %s failed; it will be recomputed", req_id)
            ok = False
        self._done.append(Completion("load", req_id, ok))

    def poll(self) -> list[Completion]:
        done, self._done = self._done, []
        return done

    def drain(self) -> None:
        return None

    def fence_loads(self) -> None:
        return None  # copies are done when load() returns
