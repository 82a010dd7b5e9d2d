"""vLLM's KV-cache group specs → kvbm's groups (kvbm.runtime.groups.kv_cache_groups), on vLLM's own classes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("vllm")
from vllm.v1.kv_cache_interface import FullAttentionSpec, MambaSpec, SlidingWindowSpec  # noqa: E402

from kvbm.core.groups import SINGLE_FULL  # noqa: E402
from kvbm.runtime.groups import kv_cache_groups  # noqa: E402

ATTN = {"num_kv_heads": 2, "head_size": 64, "dtype": torch.float32}


def config(*specs) -> SimpleNamespace:
    groups = [SimpleNamespace(kv_cache_spec=s, layer_names=[f"model.layers.{i}.attn"]) for i, s in enumerate(specs)]
    return SimpleNamespace(kv_cache_groups=groups)


def test_one_full_attention_group_keeps_the_plain_chain():
    assert kv_cache_groups(config(FullAttentionSpec(128, **ATTN)), 128) == SINGLE_FULL


def test_sliding_window_groups_get_their_window_in_blocks_and_distinct_tags():
    groups = kv_cache_groups(config(SlidingWindowSpec(128, sliding_window=256, **ATTN),
                              SlidingWindowSpec(128, sliding_window=256, **ATTN),
                              FullAttentionSpec(128, **ATTN)), 128)
    assert [g.window_blocks for g in groups] == [2, 2, None]
    assert len({g.tag for g in groups}) == 3
    # a window of 257 tokens reaches into a third block; extra retained tokens widen it
    assert kv_cache_groups(config(SlidingWindowSpec(128, sliding_window=257, **ATTN)), 128)[0].window_blocks == 3
    wide = SlidingWindowSpec(128, sliding_window=256, extra_retained_tokens=64, **ATTN)
    assert kv_cache_groups(config(wide), 128)[0].window_blocks == 3


def test_a_mamba_group_in_align_mode_needs_one_state_block():
    mamba = MambaSpec(128, shapes=((4, 8),), dtypes=(torch.float32,), mamba_cache_mode="align")
    groups = kv_cache_groups(config(FullAttentionSpec(128, **ATTN), mamba), 128)
    assert [g.window_blocks for g in groups] == [None, 1]


def test_an_unknown_group_type_stops_startup_naming_it():
    class CrossLayerSpec:  # a spec type kvbm has never seen
        block_size = 128

    with pytest.raises(ValueError) as err:
        kv_cache_groups(config(FullAttentionSpec(128, **ATTN), CrossLayerSpec()), 128)
    assert "CrossLayerSpec" in str(err.value) and "without kvbm" in str(err.value)


def test_a_mamba_group_without_align_mode_stops_startup_naming_the_group_and_the_fix():
    mamba = MambaSpec(128, shapes=((4, 8),), dtypes=(torch.float32,), mamba_cache_mode="none")
    with pytest.raises(ValueError) as err:
        kv_cache_groups(config(FullAttentionSpec(128, **ATTN), mamba), 128)
    message = str(err.value)
    assert "group 1" in message and "MambaSpec" in message and "model.layers.1.attn" in message
    assert "--enable-prefix-caching" in message and "docs/models.md" in message


def test_a_mamba_group_in_all_mode_names_the_align_flag():
    """vLLM's GPU default for models with Mamba prefix caching is 'all'; the fix is one flag."""
    mamba = MambaSpec(128, shapes=((4, 8),), dtypes=(torch.float32,), mamba_cache_mode="all")
    with pytest.raises(ValueError) as err:
        kv_cache_groups(config(FullAttentionSpec(128, **ATTN), mamba), 128)
    assert "mamba_cache_mode='all'" in str(err.value) and "--mamba-cache-mode align" in str(err.value)


def test_a_mamba_layer_registered_as_a_list_of_state_views_is_stored_as_whole_pages():
    """vLLM on GPUs registers a Mamba layer as [conv state, SSM state], views over one page per
    block; sharing its buffer with an attention layer, it is stored once through the attention
    layer's dense view, and alone through its whole pages."""
    from kvbm.transfer.layout import describe_kv_caches

    blocks, page = 6, 4096  # bytes per page: the states, then padding
    buffer = torch.randint(0, 256, (blocks * page,), dtype=torch.uint8)
    attention = buffer.view(torch.float16).view(blocks, 2, 16, 8, 8)  # 4096 B: one page per block
    words = buffer.view(torch.float32).view(blocks, page // 4)
    conv, ssm = words[:, :96].view(blocks, 3, 32), words[:, 96:352].view(blocks, 4, 64)
    layout, views = describe_kv_caches({"model.layers.0.mixer": [conv, ssm], "model.layers.1.attn": attention},
                                       blocks)
    assert [layer.name for layer in layout.layers] == ["model.layers.1.attn"] and layout.block_bytes == page

    layout, views = describe_kv_caches({"model.layers.0.mixer": [conv, ssm]}, blocks)
    assert layout.block_bytes == page and views[0].data_ptr() == buffer.data_ptr()
    assert torch.equal(views[0].reshape(blocks, page), buffer.view(blocks, page))
