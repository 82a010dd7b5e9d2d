"""Layer-wise against whole in-step loads, on the GPU, without vLLM: what a hit's load costs the forward.

A later turn of the 8B-shaped perf workload loads ~13,000 tokens (832 blocks of 16, 2 MiB each
over 32 layers: 1.7 GB) from pinned host memory (G2) before its forward. Two ways:

* whole:  the copy engine's staged DMA of all layers; the forward waits for all of it;
* layers: layer by layer; layer i's attention waits only for layer i (``wait_layer``), so layer
          i+1's copy overlaps layer i's compute. Two paths: "batch" (one DMA entry per block and
          plane straight into the cache) and "staged" (the default: one 2-D DMA per run of
          consecutive host slots into staging, then the scatter kernel), the latter with the
          host slots shuffled (runs of one) and consecutive (as kvbm's pool hands out a
          request's slots).

For each, the copy alone (GPU time, GB/s, and the CPU time to submit it: the forward cannot be
launched before) and a load followed by a stand-in forward: per layer, GEMMs sized like an 8B
layer's over ``--new-tokens`` tokens. Printed side by side with the forward alone.

Run: ``python bench/layerwise.py [--blocks 832] [--new-tokens 160]`` on a CUDA machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from transfer import Setup, gbps, measure  # noqa: E402  (bench/transfer.py: same cache and arena)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=832, help="blocks loaded (832 x 16 tokens: a 13K-token hit)")
    ap.add_argument("--new-tokens", type=int, default=160, help="tokens the stand-in forward computes")
    ap.add_argument("--staging-mib", type=int, default=0, help="the engine's staging buffers (0: its default)")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    setup = Setup(args.layers, 4096, args.blocks)
    kw = {"staging_bytes": args.staging_mib << 20} if args.staging_mib else {}
    staged = setup.engine(**kw)
    batch = setup.engine(layer_path="batch", **kw)
    setup.buf.view(torch.uint8).random_(0, 256)  # the rows loaded hold noise, not zeros
    blocks = setup.load_blocks
    scattered = setup.load_slots  # a shuffled half of the arena: runs of one slot
    runs = list(range(args.blocks, 2 * args.blocks))  # one request's blocks, as kvbm's pool hands them out
    nbytes = setup.batch_bytes
    hidden = 4096
    x = torch.randn(args.new_tokens, hidden, device="cuda", dtype=torch.bfloat16)
    w_attn = torch.randn(hidden, 3 * hidden, device="cuda", dtype=torch.bfloat16) / 64  # qkv + o, roughly
    w_mlp = torch.randn(hidden, 2 * 14336, device="cuda", dtype=torch.bfloat16) / 64
    w_down = torch.randn(14336, hidden, device="cuda", dtype=torch.bfloat16) / 128

    def layer_compute() -> None:
        (x @ w_attn).sum()
        h = x @ w_mlp
        (h[:, :14336] @ w_down).sum()

    submit: dict[str, list[float]] = {}

    def whole(forward: bool):
        def run():
            staged._load_dma_stream.wait_stream(torch.cuda.current_stream())
            t0 = time.perf_counter()
            staged.load(1, scattered, blocks)
            staged.fence_loads()
            submit.setdefault("whole", []).append(time.perf_counter() - t0)
            if forward:
                for _ in range(args.layers):
                    layer_compute()
            staged.poll()
            return [staged.load_stream]
        return run

    def layers(engine, slots, min_run: int, name: str, forward: bool):
        def run():
            engine.min_mean_run = min_run
            t0 = time.perf_counter()
            engine.load_layers([(2, slots, blocks)], list(range(args.layers)))
            submit.setdefault(name, []).append(time.perf_counter() - t0)
            for i in range(args.layers):
                engine.wait_layer(i)
                if forward:
                    layer_compute()
            engine.poll()
            return [engine.load_stream]
        return run

    def forward_only():
        for _ in range(args.layers):
            layer_compute()
        return []

    ways = {  # name: (engine, host slots, min_mean_run: below it, staged loads land whole)
        "layers batch": (batch, scattered, 1),
        "layers staged, scattered slots": (staged, scattered, 1),
        "layers staged, scattered slots (whole)": (staged, scattered, 8),  # what kvbm does then
        "layers staged, slot runs": (staged, runs, 8),
    }
    rows = {"copy whole": measure(whole(False), args.warmup, args.reps)}
    for name, (engine, slots, min_run) in ways.items():
        rows[f"copy {name}"] = measure(layers(engine, slots, min_run, name, False), args.warmup, args.reps)
    rows["forward alone"] = measure(forward_only, args.warmup, args.reps)
    rows["whole + forward"] = measure(whole(True), args.warmup, args.reps)
    for name, (engine, slots, min_run) in ways.items():
        rows[f"{name} + forward"] = measure(layers(engine, slots, min_run, name, True), args.warmup, args.reps)
    # Every way lands the same bytes: a whole load, then zeroed blocks refilled layer by layer.
    ok = True
    index = torch.tensor(blocks, device="cuda")
    for engine, slots, min_run in ways.values():
        engine.min_mean_run = min_run
        staged.drain()
        staged.poll()
        staged.load("want", slots, blocks)
        staged.drain()
        staged.poll()
        want = [v.index_select(1, index) for v in setup.views]
        for v in setup.views:
            v.index_fill_(1, index, 0)
        engine.load_layers([(3, slots, blocks)], list(range(args.layers)))
        for i in range(args.layers):
            engine.wait_layer(i)
        torch.cuda.synchronize()
        engine.poll()
        ok &= all(torch.equal(v.index_select(1, index), w) for v, w in zip(setup.views, want))
    print(f"{args.blocks} blocks x {setup.layout.block_bytes / 2**20:.1f} MiB = {nbytes / 1e9:.2f} GB, "
          f"{args.layers} layers, stand-in forward over {args.new_tokens} tokens; medians of {args.reps}")
    for name, ms in rows.items():
        extra = f"  {gbps(nbytes, ms):6.1f} GB/s" if name.startswith("copy") else ""
        ratio = f"  ({ms / rows['whole + forward']:.3f} of whole + forward)" if name.endswith("+ forward") else ""
        print(f"  {name:50s} {ms:8.2f} ms{extra}{ratio}")
    for name, times in submit.items():
        print(f"  submit {name:43s} {statistics.median(times) * 1e3:8.2f} ms of CPU before the forward can launch")
    ideal = max(rows["copy whole"], rows["forward alone"]) / (rows["copy whole"] + rows["forward alone"])
    print(f"  ideal layers + forward: max(copy, forward) / (copy + forward) = {ideal:.3f} of whole + forward")
    print("  verified" if ok else "  MISMATCH")


if __name__ == "__main__":
    main()
