"""Pick the copy engine and host buffer for where vLLM put the KV cache.

Import-light on purpose: nothing here imports Triton or CuPy, and the engines
are imported inside :func:`make_copy_engine`, so ``kvbm.storage.host`` may
import :func:`make_host_arena_buffer` at module level without a cycle.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvbm.storage.pinned import allocate_host

if TYPE_CHECKING:
    from kvbm.storage.host import HostArena
    from kvbm.transfer.engine import CopyEngine
    from kvbm.transfer.layout import KVLayout

logger = logging.getLogger(__name__)

__all__ = ["make_copy_engine", "make_host_arena_buffer"]


def make_copy_engine(
    layout: KVLayout, views: list[torch.Tensor], arena: HostArena, **cuda_options
) -> CopyEngine:
    """CudaCopyEngine when the KV cache views are CUDA tensors, else TorchCopyEngine.

    ``cuda_options`` (backend, ctas, chunk_bytes, load_priority, warmup) go to
    :class:`kvbm.transfer.cuda.CudaCopyEngine` and are ignored on CPU.
    """
    if views and all(v.is_cuda for v in views):
        from kvbm.transfer.cuda import CudaCopyEngine

        return CudaCopyEngine(layout, views, arena, **cuda_options)
    from kvbm.transfer.engine import TorchCopyEngine

    return TorchCopyEngine(layout, views, arena)


def make_host_arena_buffer(
    num_slots: int,
    block_bytes: int,
    want_pinned: bool,
    *,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The G2 arena's ``[num_slots, block_bytes]`` uint8 buffer, already faulted in.

    Pinned through :func:`kvbm.storage.pinned.allocate_pinned` when
    ``want_pinned`` and CUDA is available; otherwise pageable (populated with
    the same parallel page-faulting, so an overcommitted host fails here and not
    in the first engine step). Contents are zero.
    """
    if num_slots <= 0 or block_bytes <= 0:
        raise ValueError(f"bad arena size {num_slots} x {block_bytes}")
    pin = bool(want_pinned) and torch.cuda.is_available()
    if want_pinned and not pin:
        logger.warning("kvbm: pinned host memory requested but CUDA is not available; using pageable memory")
    flat = allocate_host(num_slots * block_bytes, pin=pin, threads=threads, progress=progress)
    return flat.view(num_slots, block_bytes)
