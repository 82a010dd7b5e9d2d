"""What one ``Planner.match`` (the core of ``get_num_new_matched_tokens``) costs.

A 32K-token prompt (block size 16: 2048 blocks) is looked up in a G2 pool that
holds 100K committed blocks, the prompt's own chain among them (a full hit),
and the same in a pool of 1K blocks... except that a 2048-block prompt cannot
be a full hit in a 1K pool, so the small pool holds the prompt's first 1K
blocks only and the large pool is measured both ways: a full hit (2047
blocks, the last one is always left to compute) and a 1K-block hit, so that
each size comparison holds the matched length fixed.

Two cases per pool:

* fresh:    a new request: ``add_request`` + ``match`` (hashes all 2047 blocks).
* repeated: ``match`` again on the same request (hashes already cached).

Run: ``python bench/match_cost.py [--reps 50]``. Pure Python; no torch, no GPU.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from kvbm.core.hashing import engine_root, extend_hashes
from kvbm.core.planner import Planner
from kvbm.core.pool import BlockPool
from kvbm.core.tiers import standard_chain

BLOCK_SIZE = 16
PROMPT_TOKENS = 32 * 1024
CHAIN_BLOCKS = 2048  # filler chains as long as the prompt


def populate(pool: BlockPool, root: int, prompt: list[int], prompt_blocks: int, total: int, rng) -> None:
    """Commit ``prompt_blocks`` blocks of the prompt's chain plus filler chains up to ``total``."""

    def put(hashes: list[int]) -> None:
        for h in hashes:
            slot = pool.reserve(h)
            assert slot is not None
            pool.commit(slot)

    put(extend_hashes([], prompt, BLOCK_SIZE, root)[:prompt_blocks])
    left = total - prompt_blocks
    while left > 0:
        n = min(CHAIN_BLOCKS, left)
        tokens = [rng.randrange(32000) for _ in range(n * BLOCK_SIZE)]
        put(extend_hashes([], tokens, BLOCK_SIZE, root))
        left -= n
    assert pool.num_used == total, (pool.num_used, total)
    assert pool.stats.evicted == 0


def measure(planner: Planner, root: int, prompt: list[int], reps: int, expect: int) -> tuple[list, list]:
    fresh, repeated = [], []
    clock = time.perf_counter
    # Warm-up.
    planner.add_request("warm", root)
    planner.match("warm", prompt, 0)
    planner.on_finished("warm")
    for i in range(reps):
        rid = f"r{i}"
        t0 = clock()
        planner.add_request(rid, root)
        n = planner.match(rid, prompt, 0)
        t1 = clock()
        n2 = planner.match(rid, prompt, 0)
        t2 = clock()
        planner.on_finished(rid)
        assert n == n2 == expect, (n, n2, expect)
        fresh.append((t1 - t0) * 1e6)
        repeated.append((t2 - t1) * 1e6)
    return fresh, repeated


def p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10)[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = random.Random(args.seed)
    root = engine_root("bench-model|bs=16")
    prompt = [rng.randrange(32000) for _ in range(PROMPT_TOKENS)]
    full_hit = (PROMPT_TOKENS - 1) // BLOCK_SIZE  # 2047: the last block is always computed

    # (pool blocks, prompt blocks in the pool, expected hit blocks)
    setups = [(100_000, CHAIN_BLOCKS, full_hit), (100_000, 1000, 1000), (1_000, 1000, 1000)]
    rows = []
    results = {}
    for total, prompt_blocks, hit in setups:
        pool = BlockPool(total, "g2")
        t0 = time.perf_counter()
        populate(pool, root, prompt, prompt_blocks, total, rng)
        fill_s = time.perf_counter() - t0
        planner = Planner(standard_chain(total, 0), BLOCK_SIZE, indexes={"G2": pool})
        fresh, repeated = measure(planner, root, prompt, args.reps, hit * BLOCK_SIZE)
        results[(total, hit)] = (fresh, repeated)
        for case, xs in (("fresh", fresh), ("repeated", repeated)):
            rows.append((f"{total:,}", f"{hit:,}", case, min(xs), statistics.median(xs), p90(xs)))
        print(f"# populated {total:,} blocks in {fill_s:.2f}s")

    print(f"\nPlanner.match, prompt {PROMPT_TOKENS:,} tokens (block {BLOCK_SIZE}), {args.reps} reps each\n")
    print(f"{'G2 blocks':>10} {'hit blocks':>10} {'case':>9} {'min us':>9} {'median us':>10} {'p90 us':>10}")
    for total, hit, case, lo, med, q90 in rows:
        print(f"{total:>10} {hit:>10} {case:>9} {lo:>9.1f} {med:>10.1f} {q90:>10.1f}")

    print("\nratio 100K/1K pool, same 1,000-block hit (median; min in brackets):")
    for i, case in enumerate(("fresh", "repeated")):
        big = statistics.median(results[(100_000, 1000)][i])
        small = statistics.median(results[(1_000, 1000)][i])
        lo = min(results[(100_000, 1000)][i]) / min(results[(1_000, 1000)][i])
        print(f"  {case:>9}: {big / small:.2f}x  [{lo:.2f}x]")


if __name__ == "__main__":
    main()
