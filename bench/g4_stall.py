"""How long vLLM's scheduler is held by G4 lookups, healthy and with Redis stalled, side by side.

The leader's G4 index asks Redis either on the caller's thread (``wait_s=None``:
the old behaviour) or on its lookup thread, waiting at most ``LOOKUP_WAIT_S``
per step (what the leader does). Against one fresh local redis-server holding
every block, for each mode:

* healthy: ``--requests`` requests of ``--blocks`` blocks each, one new request
  per scheduler step: the time one ask takes, and how many were answered in
  their first step (the rest get "not known yet" and their answer next step);
* stalled (SIGSTOP): the same asks while Redis answers nothing, until every
  answer is known (misses after the remote timeout): the longest step.

Run: ``python bench/g4_stall.py [--requests 200] [--blocks 128] [--timeout 1]``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.redis_procs
from kvbm.storage.remote import RemoteStore  # noqa: E402
from kvbm.storage.remote_index import LOOKUP_WAIT_S, RemoteIndex  # noqa: E402
from tests.redis_procs import RedisServer  # noqa: E402


def prompt_hashes(i: int, blocks: int) -> list[bytes]:
    return [i.to_bytes(8, "little") + b.to_bytes(8, "little") for b in range(blocks)]


def run(index: RemoteIndex, prompts: list[list[bytes]]) -> tuple[list[float], int]:
    """One new request per step until every answer is known: (seconds per step, first-step answers)."""
    steps, first, waiting = [], 0, list(prompts)
    for hs in prompts:
        index.begin_step()
        began = time.perf_counter()
        known = index.match_prefix(hs) is not None
        steps.append(time.perf_counter() - began)
        first += known
        if known:
            waiting.remove(hs)
    while waiting:  # the skipped ones, asked again each step
        index.begin_step()
        began = time.perf_counter()
        waiting = [hs for hs in waiting if index.match_prefix(hs) is None]
        steps.append(time.perf_counter() - began)
        time.sleep(0.001)
    return steps, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--blocks", type=int, default=128, help="blocks per request")
    parser.add_argument("--timeout", type=float, default=1.0, help="the remote timeout (s)")
    args = parser.parse_args()
    server = RedisServer(tempfile.mkdtemp(prefix="kvbm-g4-stall-"), extra=["--maxmemory-policy", "allkeys-lru"])
    try:
        with RemoteStore(server.url, "bench") as writer:
            for i in range(2 * args.requests):
                writer.write_blocks([(h, np.zeros(16, np.uint8)) for h in prompt_hashes(i, args.blocks)])
        print(f"{args.requests} requests of {args.blocks} blocks, remote timeout {args.timeout:g} s, "
              f"LOOKUP_WAIT_S {LOOKUP_WAIT_S * 1e3:g} ms")
        for name, wait in (("caller's thread", None), ("lookup thread", LOOKUP_WAIT_S)):
            for stalled in (False, True):
                store = RemoteStore.open(server.url, "bench", timeout_s=args.timeout)
                index = RemoteIndex(store, wait_s=wait, timeout_s=args.timeout)
                base = args.requests if stalled else 0
                prompts = [prompt_hashes(base + i, args.blocks) for i in range(args.requests)]
                if stalled:
                    server.pause()
                try:
                    steps, first = run(index, prompts)
                finally:
                    server.resume()
                    index.close()
                    store.close()
                print(f"{name:16s} {'stalled' if stalled else 'healthy':8s}: step median "
                      f"{statistics.median(steps) * 1e3:7.2f} ms, longest {max(steps) * 1e3:8.1f} ms, "
                      f"answered in their first step {first}/{args.requests}")
    finally:
        server.resume()
        server.kill()


if __name__ == "__main__":
    main()
