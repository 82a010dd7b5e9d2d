"""Pick the copy engine for where vLLM put the KV cache.

Import-light on purpose: nothing here imports Triton or CuPy; the engines are
imported inside :func:`make_copy_engine`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from kvbm.storage.host import HostArena
    from kvbm.transfer.engine import CopyEngine
    from kvbm.transfer.layout import KVLayout

__all__ = ["make_copy_engine"]


def make_copy_engine(
    layout: KVLayout, views: list[torch.Tensor], arena: HostArena, *, cpu_parallel: bool = True, **cuda_options
) -> CopyEngine:
    """CudaCopyEngine when the KV cache views are CUDA tensors, else TorchCopyEngine.

    ``cuda_options`` (backend, ctas, chunk_bytes, load_priority, warmup) go to
    :class:`kvbm.transfer.cuda.CudaCopyEngine` and are ignored on CPU.
    ``cpu_parallel=False``: a CPU engine copies on the calling thread only (see
    :class:`kvbm.transfer.engine.TorchCopyEngine`); ignored on GPUs.
    """
    if views and all(v.is_cuda for v in views):
        from kvbm.transfer.cuda import CudaCopyEngine

        return CudaCopyEngine(layout, views, arena, **cuda_options)
    from kvbm.transfer.engine import TorchCopyEngine

    return TorchCopyEngine(layout, views, arena, parallel=cpu_parallel)
