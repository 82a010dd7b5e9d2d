"""What the leader derives from vLLM's config: bytes per block, where G3 lives, and the model identity."""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import TYPE_CHECKING, Any

from kvbm.core.groups import SINGLE_FULL, KVGroup
from kvbm.runtime.fingerprint import canonical, fingerprint
from kvbm.vllm_integration.compat import features, kv_cache_layout

if TYPE_CHECKING:
    from vllm.config import ModelConfig, VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger(__name__)

#: Bump when the identity's recipe changes, so old persisted blocks stop matching.
IDENTITY_VERSION = 2


#: vLLM's null block: the id its block pool hands out for positions a group keeps no KV for
#: (before a sliding window). Block 0 of the pool, never given to a request as a real block.
NULL_BLOCK = 0

#: Spec classes whose hits need the whole prefix (MLA and attention sinks keep full KV too).
_FULL = ("FullAttentionSpec", "MLAAttentionSpec", "SinkFullAttentionSpec")
#: Spec classes that need only a window of blocks before the hit point.
_WINDOWED = ("SlidingWindowSpec", "SlidingWindowMLASpec", "ChunkedLocalAttentionSpec")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _group_window(spec: Any, block_size: int) -> int | None:
    """None for full attention; else the blocks before a hit point that the group reads."""
    kind = type(spec).__name__
    if kind == "UniformTypeKVCacheSpecs":  # layers of one type with different head shapes
        windows = {_group_window(inner, block_size) for inner in spec.kv_cache_specs.values()}
        if len(windows) == 1:
            return windows.pop()
        raise UnsupportedGroup(kind)
    if kind in _FULL:
        return None
    if kind in ("SlidingWindowSpec", "SlidingWindowMLASpec"):
        # vLLM keeps the blocks holding the last window - 1 (+ extra retained) tokens; its own
        # offloading asks for max(window, window - 1 + extra) tokens' worth, and so do we.
        extra = int(getattr(spec, "extra_retained_tokens", 0) or 0)
        return max(_cdiv(spec.sliding_window, block_size), _cdiv(spec.sliding_window - 1 + extra, block_size))
    if kind == "ChunkedLocalAttentionSpec":
        return _cdiv(spec.attention_chunk_size, block_size)
    if kind == "MambaSpec" and getattr(spec, "mamba_cache_mode", "none") == "align":
        # The state after block L-1 is all a hit at block L needs (vLLM's "align" mode keeps it
        # in the group's block L-1, as its own prefix cache does).
        return 1
    if kind == "MambaSpec" and getattr(spec, "mamba_cache_mode", "none") == "all":
        raise UnsupportedGroup(
            "MambaSpec in mamba_cache_mode='all'",
            "start vLLM with --mamba-cache-mode align (on a GPU vLLM picks 'all' for models with Mamba prefix "
            "caching; kvbm stores the one state per block that 'align' keeps)")
    if kind == "MambaSpec":
        raise UnsupportedGroup(
            f"MambaSpec in mamba_cache_mode={getattr(spec, 'mamba_cache_mode', None)!r}",
            "turn vLLM's prefix caching on (--enable-prefix-caching): vLLM then keeps the Mamba state of every "
            "block ('align' mode), which is what kvbm stores; or serve this model without kvbm's "
            "--kv-transfer-config")
    raise UnsupportedGroup(kind)


class UnsupportedGroup(ValueError):
    """A KV-cache group of a type kvbm does not offload, and what to do about it."""

    def __init__(self, kind: str, fix: str = "serve this model without kvbm's --kv-transfer-config") -> None:
        super().__init__(kind)
        self.fix = fix


def kv_groups(kv_cache_config: KVCacheConfig, block_size: int) -> tuple[KVGroup, ...]:
    """The model's KV-cache groups as the planner needs them (kvbm.core.groups).

    One group: the plain request chain, as before hybrid support (persisted blocks stay
    valid). Several: each gets a tag with its index, type and window, folded into its
    blocks' hashes. A group type kvbm cannot serve stops startup with its name."""
    specs = [group.kv_cache_spec for group in kv_cache_config.kv_cache_groups]
    groups: list[KVGroup] = []
    for i, spec in enumerate(specs):
        layers = list(getattr(kv_cache_config.kv_cache_groups[i], "layer_names", []) or [])
        try:
            window = _group_window(spec, block_size)
            spec_block = getattr(spec, "block_size", block_size)
            if spec_block != block_size:
                raise UnsupportedGroup(f"{type(spec).__name__} with {spec_block}-token blocks")
        except UnsupportedGroup as exc:
            shown = ", ".join(layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
            raise ValueError(
                f"kvbm: KV-cache group {i} of this model ({shown or 'no layers'}) is {exc}, which kvbm "
                "does not offload; kvbm serves full attention, MLA, sliding-window, chunked local attention "
                f"and Mamba groups in 'align' mode (docs/models.md). Fix: {exc.fix}."
            ) from None
        groups.append(KVGroup(f"{i}:{type(spec).__name__}:{window}", window))
    if len(groups) == 1 and groups[0].window_blocks is None:
        return SINGLE_FULL
    return tuple(groups)


def bytes_per_block_per_rank(kv_cache_config: KVCacheConfig) -> int:
    """Bytes one block takes across this rank's layers (what one G2 slot holds)."""
    total = sum(tensor.size for tensor in kv_cache_config.kv_cache_tensors)
    return max(1, total // max(1, kv_cache_config.num_blocks))


def storage_key(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> str:
    """The model and the shape of a slot: what names the persistent G3 files and journal.

    Two servers whose keys differ never open the same files. Everything else
    that changes KV without changing the slot shape (weights, quantization,
    overrides) is in :func:`model_identity`, which the journal checks: a
    change there restarts the same files empty instead of leaving a new
    full-size file behind at every change.
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
            kv_cache_layout(kv_cache_config, vllm_config),
        )
    )


def model_identity(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig, *, fingerprint_weights: bool,
                   kv_layout: str = "", weights: str | None = None) -> str:
    """Everything that makes equal token ids produce different KV bytes.

    Besides the slot shape (:func:`storage_key`): the weights' source and
    revision, quantization, config overrides, the model implementation,
    sliding-window and KV-scale settings, decode context parallelism. Not
    the tokenizer: blocks are keyed by token ids, and the tokenizer only maps
    text to ids, so two tokenizers yield different ids, never different KV for
    the same ids.

    ``kv_layout`` is the workers' slot signature (:meth:`KVLayout.signature`): the same
    model in another vLLM may store a block's bytes in another order (vLLM 0.26's GPU
    model runner permutes them). The vLLM version is in too: another release may
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
        "storage": storage_key(vllm_config, kv_cache_config),
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
        "vllm": features().version,
        # Random ("dummy") weights are a function of the seed.
        "seed": model.seed if load_format == "dummy" else None,
    }
    if fingerprint_weights and load_format != "dummy":
        parts["weights"] = weights if weights is not None else weights_fingerprint(vllm_config)
    return json.dumps(parts, sort_keys=True)


def weights_fingerprint(vllm_config: VllmConfig, cache_dir: str | None = None) -> str | None:
    """The fingerprint of every byte of the model's weight files (:mod:`kvbm.runtime.fingerprint`),
    digests cached in ``cache_dir``; unreadable weights get one unique to this call. None for
    random ("dummy") weights, which the identity covers by their seed."""
    if str(getattr(getattr(vllm_config, "load_config", None), "load_format", "auto")) == "dummy":
        return None
    model = vllm_config.model_config
    where = _weights_location(model, getattr(getattr(vllm_config, "load_config", None), "download_dir", None))
    found = fingerprint(where, cache_dir) if where else None
    if found is None:
        logger.warning(
            "kvbm: cannot read the weights of %s to fingerprint them; persisted disk blocks (G3) will not be "
            "reused across restarts of this server. Serve the model from a local directory to reuse them.",
            model.model,
        )
        return f"unknown-{uuid.uuid4().hex}"
    return found


def _weights_location(model: ModelConfig, download_dir: str | None) -> str | None:
    """A local directory or file holding the weights: the model path itself, or
    the hub snapshot vLLM downloaded (its directory is named by commit)."""
    for candidate in (getattr(model, "model_weights", ""), model.model):
        if candidate and os.path.exists(candidate):
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model.model, revision=model.revision, cache_dir=download_dir, local_files_only=True)
    except Exception:  # not a hub name, not cached, no huggingface_hub: cannot tell
        return None
