"""The G2 arena: one host buffer of ``num_slots`` blocks, one row per slot.

A slot holds one block of every layer of this worker, back to back in the
order of :class:`kvbm.transfer.layout.KVLayout`, so a slot is one contiguous
run of bytes (cheap to checksum or write to disk as a unit). Memory is pinned
when CUDA is present, so GPU copies can be DMA'd asynchronously.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from kvbm.storage.pinned import allocate_host

logger = logging.getLogger(__name__)


def make_host_arena_buffer(
    num_slots: int,
    block_bytes: int,
    want_pinned: bool,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """A ``[num_slots, block_bytes]`` uint8 buffer for host rows (the G2 arena, staging rows),
    already faulted in.

    Pinned through :func:`kvbm.storage.pinned.allocate_host` when ``want_pinned``
    and CUDA is available; otherwise pageable (populated with the same parallel
    page-faulting, so an overcommitted host fails here and not in the first
    engine step). Contents are zero.
    """
    if num_slots <= 0 or block_bytes <= 0:
        raise ValueError(f"bad arena size {num_slots} x {block_bytes}")
    pin = bool(want_pinned) and torch.cuda.is_available()
    if want_pinned and not pin:
        logger.warning("kvbm: pinned host memory requested but CUDA is not available; using pageable memory")
    flat = allocate_host(num_slots * block_bytes, pin=pin, threads=threads, progress=progress)
    return flat.view(num_slots, block_bytes)


class HostArena:
    def __init__(
        self, num_slots: int, block_bytes: int, pin: bool | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        """``on_progress(fraction)`` follows the page faulting of tens of GB (the
        handshake forwards it to the leader's log)."""
        if pin is None:
            pin = torch.cuda.is_available()
        total = num_slots * block_bytes
        start = time.monotonic()
        last_log = [start]

        def progress(done: int, whole: int) -> None:
            # Tens of GB take seconds: say how far along we are, every few seconds.
            if on_progress is not None:
                on_progress(done / whole)
            now = time.monotonic()
            if now - last_log[0] >= 5 or done == whole:
                last_log[0] = now
                logger.info("kvbm: host cache %.1f/%.1f GB allocated", done / 1e9, whole / 1e9)

        self.num_slots = num_slots
        self.block_bytes = block_bytes
        # Pages are faulted in (in parallel) now, so an overcommitted host fails
        # at startup and the first stores do not pay for it inside a step.
        self.buffer = make_host_arena_buffer(num_slots, block_bytes, want_pinned=pin, progress=progress)
        self.pinned = bool(pin and torch.cuda.is_available() and self.buffer.is_pinned())
        logger.info(
            "kvbm: host cache (G2) ready: %d blocks x %d B = %.3f GB, %s, in %.2f s",
            num_slots, block_bytes, total / 1e9, "pinned" if self.pinned else "pageable", time.monotonic() - start,
        )

    @classmethod
    def wrap(cls, buffer: torch.Tensor) -> HostArena:
        """An arena over an existing ``[num_slots, block_bytes]`` uint8 buffer
        (staging rows between G1 and a block medium), so the copy engines can use it."""
        arena = cls.__new__(cls)
        arena.num_slots, arena.block_bytes = buffer.shape
        arena.pinned = buffer.is_pinned()
        arena.buffer = buffer
        return arena

    def segment(self, offset: int, outer: int, inner_bytes: int) -> torch.Tensor:
        """One layer's bytes across all slots: ``[num_slots, outer, inner_bytes]`` (a view)."""
        return self.buffer[:, offset : offset + outer * inner_bytes].view(self.num_slots, outer, inner_bytes)
