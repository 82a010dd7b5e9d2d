"""An engine's KV-cache group specs → kvbm's :class:`~kvbm.core.groups.KVGroup`\\ s, without importing the engine.

Specs are told apart by their class name (vLLM's ``FullAttentionSpec``, ``SlidingWindowSpec``,
``MambaSpec``, ...) and read duck-typed, so this runs wherever the specs came from
(:func:`kv_cache_groups` reads them off vLLM's ``KVCacheConfig``, with each group's layer names).
A group type kvbm cannot serve stops startup with its name and what to do about it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvbm.core.groups import SINGLE_FULL, KVGroup

#: Spec classes whose hits need the whole prefix (MLA and attention sinks keep full KV too).
_FULL = ("FullAttentionSpec", "MLAAttentionSpec", "SinkFullAttentionSpec")
#: Spec classes that need only a window of blocks before the hit point.
_WINDOWED = ("SlidingWindowSpec", "SlidingWindowMLASpec", "ChunkedLocalAttentionSpec")


class UnsupportedGroup(ValueError):
    """A KV-cache group of a type kvbm does not offload, and what to do about it."""

    def __init__(self, kind: str, fix: str = "serve this model without kvbm's --kv-transfer-config") -> None:
        super().__init__(kind)
        self.fix = fix


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


def kv_groups(specs: Sequence[Any], layer_names: Sequence[Sequence[str]], block_size: int) -> tuple[KVGroup, ...]:
    """The model's KV-cache groups as the planner needs them (kvbm.core.groups), from each group's
    spec and layer names (for the error message).

    One group: the plain request chain, as before hybrid support (persisted blocks stay
    valid). Several: each gets a tag with its index, type and window, folded into its
    blocks' hashes. A group type kvbm cannot serve stops startup with its name."""
    groups: list[KVGroup] = []
    for i, spec in enumerate(specs):
        layers = list(layer_names[i])
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
        # vLLM copies a Mamba state out of the hit's block before the step's forward (and before
        # an in-step load could land): such a group's loads finish before the request runs.
        groups.append(KVGroup(f"{i}:{type(spec).__name__}:{window}", window,
                              load_before_step=type(spec).__name__ == "MambaSpec"))
    if len(groups) == 1 and groups[0].window_blocks is None:
        return SINGLE_FULL
    return tuple(groups)


def kv_cache_groups(kv_cache_config: Any, block_size: int) -> tuple[KVGroup, ...]:
    """:func:`kv_groups` of an engine's KV cache config (vLLM's ``KVCacheConfig``, read duck-typed)."""
    groups = kv_cache_config.kv_cache_groups
    return kv_groups([group.kv_cache_spec for group in groups],
                     [getattr(group, "layer_names", []) or [] for group in groups], block_size)
