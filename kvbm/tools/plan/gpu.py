"""vLLM's own GPU prefix cache (G1), modelled after ``vllm/v1/core/block_pool.py``.

kvbm only sees what G1 misses, so a plan must replay G1 first. What is
modelled, as vLLM 0.32 does it for one full-attention KV group:

* ``num_blocks`` blocks, block 0 being vLLM's null block (never used);
* a free queue that doubles as the LRU: allocation takes blocks from its
  front and drops whatever hash the block held; a finished request's blocks
  are freed tail first, hashed ones appended at the back (evicted last, and
  the chain's tail before its head), unhashed ones (a partial last block)
  put at the front (reused first);
* a lookup hits the longest run of cached full blocks within the prompt's
  first ``prompt - 1`` tokens (vLLM always computes the last token); a hit
  block leaves the free queue while requests use it (reference counts);
* full blocks are cached as they are computed, so running requests' blocks
  are hits for later ones too.

* a block computed again while its hash is cached (a request never hits
  its prompt's last block) is cached too: a hash may have several blocks,
  lookups take the oldest still cached.

Not modelled: vLLM queueing a request because the pool is full (the model
then hands out what is free and counts a shortfall), chunked prefill
allocating a long prompt's blocks over several steps, and preemption.
``tests/test_plan_gpu_vllm.py`` drives this model and vLLM's own BlockPool
with the same calls and compares them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class GpuPrefixCache:
    """vLLM's block pool: free queue in eviction order, hash -> block map, reference counts."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 2:
            raise ValueError(f"the GPU pool needs at least 2 blocks (one is vLLM's null block), got {num_blocks}")
        self.num_blocks = num_blocks
        # Block 0 is vLLM's null block: never handed out.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        self._refs = [0] * num_blocks
        self._hash_of: list[int | None] = [None] * num_blocks
        #: hash -> its oldest cached block; later blocks with the same hash in ``_more``.
        self._block_of: dict[int, int] = {}
        self._more: dict[int, list[int]] = {}
        #: Blocks requested while none was free (vLLM would have made the request wait).
        self.shortfall = 0

    def lookup(self, hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks of the longest cached prefix of ``hashes[:max_blocks]``, taken (ref +1)."""
        blocks = []
        block_of = self._block_of
        for i in range(min(max_blocks, len(hashes))):
            block = block_of.get(hashes[i])
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self._refs[block] == 0:
                del self._free[block]
            self._refs[block] += 1
        return blocks

    def allocate(self, n: int) -> list[int]:
        """Up to ``n`` blocks from the front of the free queue, evicting what they cached."""
        blocks = []
        for _ in range(n):
            if not self._free:
                self.shortfall += n - len(blocks)
                break
            block, _ = self._free.popitem(last=False)
            if self._hash_of[block] is not None:
                self._evict(block)
            self._refs[block] = 1
            blocks.append(block)
        return blocks

    def _evict(self, block: int) -> None:
        block_hash = self._hash_of[block]
        self._hash_of[block] = None
        more = self._more.get(block_hash)
        if self._block_of[block_hash] == block:
            if more:
                self._block_of[block_hash] = more.pop(0)
            else:
                del self._block_of[block_hash]
        else:
            more.remove(block)  # type: ignore[union-attr]
        if more is not None and not more:
            del self._more[block_hash]

    def cache(self, block: int, block_hash: int) -> None:
        """The block is full: make it findable by hash."""
        if self._hash_of[block] is not None:
            return
        self._hash_of[block] = block_hash
        if block_hash in self._block_of:
            self._more.setdefault(block_hash, []).append(block)
        else:
            self._block_of[block_hash] = block

    def free(self, blocks: Sequence[int]) -> None:
        """A request finished: release its blocks tail first, as vLLM's ``free_blocks(reversed(...))``."""
        front = []
        for block in reversed(blocks):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if self._hash_of[block] is None:
                    front.append(block)
                else:
                    self._free[block] = None  # evicted last
        for block in reversed(front):  # prepended in order: front[0] ends up first
            self._free[block] = None
            self._free.move_to_end(block, last=False)

    @property
    def num_cached(self) -> int:
        return len(self._block_of)

    def eviction_order(self) -> list[int]:
        """Free blocks, next one handed out first (for tests)."""
        return list(self._free)
