"""What the leader derives from vLLM's KV cache config: bytes per block and the model identity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvbm.vllm_integration.compat import kv_cache_layout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig


def bytes_per_block_per_rank(kv_cache_config: KVCacheConfig) -> int:
    """Bytes one block takes across this rank's layers (what one G2 slot holds)."""
    total = sum(tensor.size for tensor in kv_cache_config.kv_cache_tensors)
    return max(1, total // max(1, kv_cache_config.num_blocks))


def model_identity(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> str:
    """Everything that makes equal tokens produce different KV bytes."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    par = vllm_config.parallel_config
    return "|".join(
        str(part)
        for part in (
            model.model,
            getattr(model, "revision", None),
            model.dtype,
            cache.cache_dtype,
            cache.block_size,
            par.tensor_parallel_size,
            par.pipeline_parallel_size,
            bytes_per_block_per_rank(kv_cache_config),
            kv_cache_layout(kv_cache_config),
        )
    )
