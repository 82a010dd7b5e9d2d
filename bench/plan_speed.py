"""How fast does ``kvbm plan`` replay a large trace? Writes a synthetic 100,000-request trace in
kvbm's own format (through the server's TraceWriter), then times reading it and replaying size points.

The traffic: multi-round chat (LMBenchmark's shape) with a few shared system prompts, users joining
and leaving, 16-token blocks (vLLM's GPU default), prompts growing to ~4,000 tokens.

    PYTHONPATH=$PWD .venv/bin/python bench/plan_speed.py [--requests 100000] [--points 3]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvbm.tools.plan.simulate import SizePoint, gpu_pass, replay  # noqa: E402
from kvbm.tools.plan.trace import TraceWriter, read_trace  # noqa: E402


def write_chat_trace(path: Path, requests: int, *, block_size: int = 16, active_users: int = 60, rounds: int = 12,
                     system_prompts: int = 4, system_tokens: int = 1000, history_tokens: int = 1500,
                     question_tokens: int = 60, answer_tokens: int = 150, qps: float = 20.0, seed: int = 0,
                     gpu_blocks: int = 4000, bytes_per_block: int = 131072) -> None:
    """A chat trace with 128-bit-looking random hashes, as a server would log it."""
    rng = random.Random(seed)
    clock = [0.0]
    writer = TraceWriter(str(path), {"block_size": block_size, "gpu_blocks": gpu_blocks,
                                     "bytes_per_block": bytes_per_block}, clock=lambda: clock[0])

    def fresh(n: int) -> list[int]:
        return [rng.getrandbits(128) for _ in range(n)]

    systems = [fresh(system_tokens // block_size) for _ in range(system_prompts)]
    users: dict[int, tuple[list[int], int, int]] = {}  # id -> (chain, tokens, rounds done)
    next_user = 0
    for n in range(requests):
        while len(users) < active_users:
            chain = list(rng.choice(systems)) + fresh(history_tokens // block_size)
            users[next_user] = (chain, len(chain) * block_size, 0)
            next_user += 1
        user = rng.choice(list(users))
        chain, tokens, done = users[user]
        prompt = tokens + question_tokens
        end = prompt + answer_tokens - 1
        chain = chain + fresh(end // block_size - len(chain))
        req = f"r{n}"
        clock[0] = n / qps
        writer.scheduled(req)
        clock[0] += 0.5 + prompt / 20000
        writer.finished(req, prompt, answer_tokens, chain)
        users[user] = (chain, end + 1, done + 1)
        if done + 1 >= rounds:
            del users[user]
    writer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--points", type=int, default=3, help="G2 sizes to time (default: %(default)s)")
    parser.add_argument("--trace", type=Path, default=None, help="keep the trace here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.trace or Path(tmp) / "trace.jsonl"
        path.unlink(missing_ok=True)  # the writer appends, as a server does
        started = time.perf_counter()
        write_chat_trace(path, args.requests)
        print(f"wrote {args.requests:,} requests ({path.stat().st_size / 1e6:.0f} MB) in "
              f"{time.perf_counter() - started:.1f}s")
        started = time.perf_counter()
        trace = read_trace(path, progress=False)
        blocks = sum(len(r.blocks) for r in trace.requests)
        print(f"read: {time.perf_counter() - started:.1f}s ({blocks / len(trace.requests):.0f} blocks per request, "
              f"{trace.num_block_ids:,} distinct)")
        started = time.perf_counter()
        gpu = gpu_pass(trace, trace.gpu_blocks or 4000)
        print(f"GPU pass: {time.perf_counter() - started:.1f}s")
        everything = trace.num_block_ids
        sizes = [everything // 64, everything // 8, everything][: args.points]
        points = [SizePoint(s) for s in sizes] + [SizePoint(sizes[0], sizes[-1], True), SizePoint(sizes[0], sizes[-1],
                                                                                                  False)]
        for point in points:
            result = replay(trace, gpu, point)
            f = result.fractions(trace.block_size)
            flag = "on " if point.disk_filter else "off"
            print(f"G2 {point.host_blocks:>8} G3 {point.disk_blocks:>8} filter {flag}: "
                  f"{result.seconds:5.1f}s ({result.requests / result.seconds:,.0f} requests/s); "
                  f"G1 {100 * f['g1']:.1f}% G2 {100 * f['g2']:.1f}% G3 {100 * f['g3']:.1f}% "
                  f"computed {100 * f['computed']:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
