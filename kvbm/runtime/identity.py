"""What an engine's config says about its blocks: bytes per block, where G3 lives, and the model identity.

vLLM's config objects (``VllmConfig``, ``KVCacheConfig``) are read duck-typed, without importing
vLLM, as :mod:`kvbm.runtime.groups` reads its group specs. The two facts that depend on the vLLM
release (the KV cache layout it resolved, its version) are found by the adapter
(:mod:`kvbm.vllm_integration.compat`) and passed in. The weights are fingerprinted by
:mod:`kvbm.runtime.fingerprint`.
"""

from __future__ import annotations

import json
from typing import Any

from kvbm.runtime.fingerprint import canonical, model_weights_fingerprint

__all__ = ["IDENTITY_VERSION", "bytes_per_block_per_rank", "model_identity", "storage_key", "weights_fingerprint"]

#: Bump when the identity's recipe changes, so old persisted blocks stop matching.
IDENTITY_VERSION = 2


def bytes_per_block_per_rank(kv_cache_config: Any) -> int:
    """Bytes one block takes across this rank's layers (what one G2 slot holds)."""
    total = sum(tensor.size for tensor in kv_cache_config.kv_cache_tensors)
    return max(1, total // max(1, kv_cache_config.num_blocks))


def storage_key(vllm_config: Any, kv_cache_config: Any, kv_cache_layout: str | None) -> str:
    """The model and the shape of a slot: what names the persistent G3 files and journal.

    Two servers whose keys differ never open the same files. Everything else
    that changes KV without changing the slot shape (weights, quantization,
    overrides) is in :func:`model_identity`, which the journal checks: a
    change there restarts the same files empty instead of leaving a new
    full-size file behind at every change. ``kv_cache_layout``: the layout vLLM
    resolved (:func:`kvbm.vllm_integration.compat.kv_cache_layout`).
    """
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    par = vllm_config.parallel_config
    return "|".join(
        str(part)
        for part in (
            model.model,
            model.dtype,
            cache.cache_dtype,
            cache.block_size,
            par.tensor_parallel_size,
            par.pipeline_parallel_size,
            bytes_per_block_per_rank(kv_cache_config),
            kv_cache_layout,
        )
    )


def model_identity(vllm_config: Any, storage: str, *, vllm_version: str, fingerprint_weights: bool,
                   kv_layout: str = "", weights: str | None = None) -> str:
    """Everything that makes equal token ids produce different KV bytes.

    Besides the slot shape (``storage``, the :func:`storage_key`): the weights' source and
    revision, quantization, config overrides, the model implementation,
    sliding-window and KV-scale settings, decode context parallelism. Not
    the tokenizer: blocks are keyed by token ids, and the tokenizer only maps
    text to ids, so two tokenizers yield different ids, never different KV for
    the same ids.

    ``kv_layout`` is the workers' slot signature (:meth:`KVLayout.signature`): the same
    model in another vLLM may store a block's bytes in another order (vLLM 0.26's GPU
    model runner permutes them). ``vllm_version`` is in too: another release may
    compute the same KV with other kernels, hence other bytes.

    ``fingerprint_weights`` (set when G3 persists across restarts) adds a
    fingerprint of the weight files (:mod:`kvbm.runtime.fingerprint`): the
    same path may hold other weights after a restart. Within one process
    vLLM's weights do not change under kvbm, so without persistence the
    files are not read. Weights that cannot be fingerprinted (streamed from
    object storage, a hub name not in the local cache) get an identity of
    their own per process: nothing persisted is reused, with a warning.
    ``weights``: that fingerprint, computed beforehand (:func:`weights_fingerprint`;
    the leader does so before its handshake, whose thread must not stall on
    hashing a large checkpoint).
    """
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    load = getattr(vllm_config, "load_config", None)
    load_format = str(getattr(load, "load_format", "auto"))
    parts: dict[str, Any] = {
        "version": IDENTITY_VERSION,
        "storage": storage,
        "revision": model.revision,
        "code_revision": getattr(model, "code_revision", None),
        "hf_config_path": getattr(model, "hf_config_path", None),
        "model_weights": getattr(model, "model_weights", ""),
        "quantization": model.quantization,
        "quantization_config": canonical(getattr(model, "quantization_config", None)),
        "hf_overrides": canonical(getattr(model, "hf_overrides", None)),
        "model_impl": canonical(getattr(model, "model_impl", None)),
        "disable_sliding_window": getattr(model, "disable_sliding_window", False),
        "kv_cache_dtype_skip_layers": canonical(getattr(cache, "kv_cache_dtype_skip_layers", None)),
        "calculate_kv_scales": getattr(cache, "calculate_kv_scales", None),
        "decode_context_parallel_size": getattr(vllm_config.parallel_config, "decode_context_parallel_size", 1),
        "load_format": load_format,
        "kv_layout": kv_layout,
        "vllm": vllm_version,
        # Random ("dummy") weights are a function of the seed.
        "seed": model.seed if load_format == "dummy" else None,
    }
    if fingerprint_weights and load_format != "dummy":
        parts["weights"] = weights if weights is not None else weights_fingerprint(vllm_config)
    return json.dumps(parts, sort_keys=True)


def weights_fingerprint(vllm_config: Any, cache_dir: str | None = None) -> str | None:
    """The fingerprint of every byte of the model's weight files (:mod:`kvbm.runtime.fingerprint`),
    digests cached in ``cache_dir``; unreadable weights get one unique to this call. None for
    random ("dummy") weights, which the identity covers by their seed."""
    if str(getattr(getattr(vllm_config, "load_config", None), "load_format", "auto")) == "dummy":
        return None
    model = vllm_config.model_config
    return model_weights_fingerprint((getattr(model, "model_weights", ""), model.model), model.model, model.revision,
                                     getattr(getattr(vllm_config, "load_config", None), "download_dir", None),
                                     cache_dir)
