"""What a periodic decay of the disk offload filter costs the scheduler's step.

The filter (``kvbm/core/filter.py``) decays every ``decay_period_s``; the first decay after a busy
period reaches every entry first seen in it. This fills a table of ``--entries`` 16-byte block
hashes (batches of 256, as a step stores them), sees a fraction of them again, lets one decay
period pass, then times ``frequencies()`` of 64 other blocks once per "step" (a spill decision,
what the planner calls each step) for ``--steps`` steps: the worst call is what one step pays.

Run: ``PYTHONPATH=$PWD python bench/filter_decay.py [--entries 1000000] [--steps 2000]
[--module PATH]`` (``--module``: another ``filter.py``, e.g. an older commit's, to compare).
Prints a table; asserts nothing about timings.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time


class _Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def _load(path: str | None):
    if path is None:
        import kvbm.core.filter as module

        return module
    spec = importlib.util.spec_from_file_location("kvbm_filter_under_test", path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[spec.name] = module  # type: ignore[union-attr]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", type=int, default=1_000_000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--module", default=None, help="path of a filter.py to measure instead of kvbm's")
    args = p.parse_args()
    module = _load(args.module)
    keys = [i.to_bytes(16, "little") for i in range(args.entries)]
    probe = [(args.entries + i).to_bytes(16, "little") for i in range(64)]
    print(f"filter {module.__file__}; {args.entries:,} entries; {args.steps} steps after the decay")
    print(f"{'seen again':>10s} {'worst call ms':>14s} {'all calls ms':>13s} {'entries after':>14s}")
    for again in (0.9, 0.1):
        clock = _Clock()
        f = module.FrequencyFilter(clock=clock, decay_period_s=600, max_entries=args.entries + args.entries // 10)
        for lo in range(0, len(keys), 256):
            f.observe_distinct(keys[lo : lo + 256])
        seen = keys[: int(len(keys) * again)]
        for lo in range(0, len(seen), 256):
            f.observe_distinct(seen[lo : lo + 256])
        clock.now = 601.0
        worst = total = 0.0
        for _ in range(args.steps):
            t = time.perf_counter()
            f.frequencies(probe)
            d = time.perf_counter() - t
            worst, total = max(worst, d), total + d
        print(f"{again:>10.0%} {worst * 1e3:>14.1f} {total * 1e3:>13.0f} {len(f):>14,}")


if __name__ == "__main__":
    main()
