"""The G2 arena: one host buffer of ``num_slots`` blocks, one row per slot.

A slot holds one block of every layer of this worker, back to back in the
order of :class:`kvbm.transfer.layout.KVLayout`, so a slot is one contiguous
run of bytes (cheap to checksum or write to disk as a unit). Memory is pinned
when CUDA is present, so GPU copies can be DMA'd asynchronously.
"""

from __future__ import annotations

import logging
import time

import torch

logger = logging.getLogger(__name__)

_TOUCH_CHUNK = 1 << 30  # fault pages in 1 GiB steps, logging progress


class HostArena:
    def __init__(self, num_slots: int, block_bytes: int, pin: bool | None = None) -> None:
        if pin is None:
            pin = torch.cuda.is_available()
        total = num_slots * block_bytes
        start = time.monotonic()
        self.num_slots = num_slots
        self.block_bytes = block_bytes
        self.pinned = pin
        self.buffer = torch.empty((num_slots, block_bytes), dtype=torch.uint8, pin_memory=pin)
        if not pin:
            # Fault the pages in now so the first offloads do not pay for it
            # inside the engine step (and an overcommitted host fails here).
            flat = self.buffer.view(-1)
            for offset in range(0, total, _TOUCH_CHUNK):
                flat[offset : offset + _TOUCH_CHUNK].zero_()
                if total > 4 * _TOUCH_CHUNK:
                    logger.info("kvbm: host cache %.1f/%.1f GB", (offset + _TOUCH_CHUNK) / 1e9, total / 1e9)
        logger.info(
            "kvbm: host cache (G2) ready: %d blocks x %d B = %.3f GB, %s, in %.2f s",
            num_slots, block_bytes, total / 1e9, "pinned" if pin else "pageable", time.monotonic() - start,
        )

    @classmethod
    def wrap(cls, buffer: torch.Tensor) -> HostArena:
        """An arena over an existing ``[num_slots, block_bytes]`` uint8 buffer
        (staging rows for disk transfers), so the copy engines can use it."""
        arena = cls.__new__(cls)
        arena.num_slots, arena.block_bytes = buffer.shape
        arena.pinned = buffer.is_pinned()
        arena.buffer = buffer
        return arena

    def segment(self, offset: int, outer: int, inner_bytes: int) -> torch.Tensor:
        """One layer's bytes across all slots: ``[num_slots, outer, inner_bytes]`` (a view)."""
        return self.buffer[:, offset : offset + outer * inner_bytes].view(self.num_slots, outer, inner_bytes)
