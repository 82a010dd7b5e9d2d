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
    """Synchronous engine built on torch indexing: one gather/scatter per layer per batch."""

    def __init__(self, layout: KVLayout, views: list[torch.Tensor], arena: HostArena) -> None:
        self.layout = layout
        self._device_views = views
        self._host_views = [
            arena.segment(layer.offset, layer.outer, layer.inner_bytes) for layer in layout.layers
        ]
        self._done: list[Completion] = []

    def store(self, batch_id: int, gpu_blocks: list[int], host_slots: list[int]) -> None:
        ok = True
        try:
            src = torch.tensor(gpu_blocks, dtype=torch.long)
            dst = torch.tensor(host_slots, dtype=torch.long)
            for device, host in zip(self._device_views, self._host_views):
                # [outer, n, inner] -> [n, outer, inner] rows of the host arena
                host.index_copy_(0, dst, device.index_select(1, src).transpose(0, 1))
        except Exception:  # a failed store is a miss later, never a crash now
            logger.exception("kvbm: store batch %d failed; its blocks will not be cached", batch_id)
            ok = False
        self._done.append(Completion("store", batch_id, ok))

    def load(self, req_id: str, host_slots: list[int], gpu_blocks: list[int]) -> None:
        ok = True
        try:
            src = torch.tensor(host_slots, dtype=torch.long)
            dst = torch.tensor(gpu_blocks, dtype=torch.long)
            for device, host in zip(self._device_views, self._host_views):
                device.index_copy_(1, dst, host.index_select(0, src).transpose(0, 1))
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
