"""The plan's model of vLLM's prefix cache against vLLM's own BlockPool, driven by the same calls.

No engine: vLLM's ``BlockPool`` class is exercised directly the way its
KV cache manager does (longest cached prefix, touch, allocate, cache full
blocks, free in reverse), and :class:`GpuPrefixCache` must find the same hits
and keep the same eviction order.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from kvbm.tools.plan.gpu import GpuPrefixCache

pytestmark = pytest.mark.slow

BLOCKS = 24


def _vllm_request(hashes: list[bytes]) -> SimpleNamespace:
    return SimpleNamespace(block_hashes=hashes, lora_request=None, session_id=None)


def test_same_hits_and_eviction_order_as_vllm():
    from vllm.v1.core.block_pool import BlockPool

    pool = BlockPool(BLOCKS, enable_caching=True, hash_block_size=16)
    model = GpuPrefixCache(BLOCKS)
    rng = random.Random(3)
    prefixes = [[rng.randrange(1 << 30) for _ in range(rng.randrange(1, 6))] for _ in range(5)]
    running: list[tuple[list, list[int], int]] = []
    for step in range(400):
        if running and (len(running) > 3 or rng.random() < 0.4):
            vllm_blocks, model_blocks, _ = running.pop(rng.randrange(len(running)))
            pool.free_blocks(reversed(vllm_blocks))
            model.free(model_blocks)
        else:
            chain = list(rng.choice(prefixes)) + [rng.randrange(1 << 30) for _ in range(rng.randrange(0, 4))]
            partial = rng.random() < 0.5  # a last block that is not full: allocated, never cached
            wanted = len(chain) + partial
            if wanted > pool.get_num_free_blocks():
                continue  # vLLM would make the request wait
            keys = [h.to_bytes(8, "little") for h in chain]
            max_blocks = len(chain) - (0 if partial else 1)  # vLLM never hits the prompt's last token
            hits = []
            for key in keys[:max_blocks]:
                cached = pool.get_cached_block(key, [0])
                if cached is None:
                    break
                hits.append(cached[0])
            pool.touch(hits)
            vllm_blocks = hits + pool.get_new_blocks(wanted - len(hits))
            pool.cache_full_blocks(_vllm_request(keys), vllm_blocks, len(hits), len(chain), 16, 0)
            model_hits = model.lookup(chain, max_blocks)
            assert len(model_hits) == len(hits), f"step {step}"
            model_blocks = model_hits + model.allocate(wanted - len(model_hits))
            for j in range(len(model_hits), len(chain)):
                model.cache(model_blocks[j], chain[j])
            assert [b.block_id for b in vllm_blocks] == model_blocks, f"step {step}"
            running.append((vllm_blocks, model_blocks, step))
        assert [b.block_id for b in pool.free_block_queue.get_all_free_blocks()] == model.eviction_order()
