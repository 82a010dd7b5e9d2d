"""G1<->G2 transfer bandwidth on one GPU, against plain pinned DMA.

One run prints:

1. baseline: one large pinned ``cudaMemcpyAsync`` (torch ``copy_``) of the same
   number of bytes as a batch, D2H, H2D, and both at once on two streams;
2. kvbm: ``CudaCopyEngine.store`` (offload, D2H) and ``load`` (onboard, H2D)
   of ``--batch`` random blocks into random host slots, Llama-3.1-8B-shaped
   cache (32 layers, 8 KV heads, head size 128, 16-token blocks, bf16,
   FlashAttention layout ``[2, num_blocks, 16, 8, 128]`` per layer), each alone
   and both at once (store submitted first, and load first), for the staged
   DMA mode (staging size, ``cuMemcpyBatchAsync`` or ``cuMemcpyAsync``) and the
   zero-copy kernel mode (grid size), Triton and CuPy kernels, with the ratio
   to the baseline; plus ``cuMemcpyBatchAsync`` straight from the KV cache (one
   entry per block and K/V plane, no kernel) as another alternative; every
   variant is checked against the device bytes first;
3. the copy's effect on a concurrent bf16 GEMM loop (SM contention), and the
   copy's rate while the GEMMs run;
4. pinned allocation of ``--alloc-gib`` GiB: ``allocate_pinned`` against
   ``torch.empty(..., pin_memory=True)``.

Timing: CUDA events around the enqueued work, a GPU sleep in front so that the
CPU's enqueueing is not on the clock, warm-up runs, median of ``--reps``.
GB/s are 1e9 bytes per second.

Run: ``python3 bench/transfer.py [--quick] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvbm.storage.host import HostArena  # noqa: E402
from kvbm.storage.pinned import AllocStats, allocate_host, allocate_pinned  # noqa: E402
from kvbm.transfer.cuda import CudaCopyEngine  # noqa: E402
from kvbm.transfer.layout import describe_kv_caches  # noqa: E402

SLEEP_CYCLES = 20_000_000  # ~10 ms of GPU time in front of every timed region
RESULTS: dict = {}


def gbps(nbytes: int, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def measure(enqueue, warmup: int, reps: int) -> float:
    """Median ms of ``enqueue()`` (which returns the streams it used), on the GPU's clock."""
    cur = torch.cuda.current_stream()
    times = []
    for rep in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record(cur)
        for s in enqueue():
            cur.wait_stream(s)
        end.record(cur)
        end.synchronize()
        if rep >= warmup:
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def arena_of(buffer: torch.Tensor) -> HostArena:
    arena = HostArena.__new__(HostArena)
    arena.num_slots, arena.block_bytes = buffer.shape
    arena.pinned = True
    arena.buffer = buffer
    return arena


# ---------------------------------------------------------------- baseline


def baseline(nbytes: int, warmup: int, reps: int, host_alloc: str) -> dict:
    dev = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2)]
    if host_alloc == "torch":
        host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    else:
        host = [allocate_pinned(nbytes) for _ in range(2)]
    for t in dev:
        t.random_(0, 256)
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()
    cur = torch.cuda.current_stream()

    def d2h():
        s1.wait_stream(cur)
        with torch.cuda.stream(s1):
            host[0].copy_(dev[0], non_blocking=True)
        return [s1]

    def h2d():
        s2.wait_stream(cur)
        with torch.cuda.stream(s2):
            dev[1].copy_(host[1], non_blocking=True)
        return [s2]

    out = {
        "d2h": gbps(nbytes, measure(d2h, warmup, reps)),
        "h2d": gbps(nbytes, measure(h2d, warmup, reps)),
    }
    ms = measure(lambda: d2h() + h2d(), warmup, reps)
    out["both"] = gbps(2 * nbytes, ms)
    out["both_each"] = gbps(nbytes, ms)
    return out


# ---------------------------------------------------------------- kvbm


class Setup:
    def __init__(self, layers: int, num_blocks: int, batch: int, seed: int = 0) -> None:
        torch.manual_seed(seed)
        caches = {}
        for i in range(layers):
            t = torch.empty((2, num_blocks, 16, 8, 128), dtype=torch.bfloat16, device="cuda")
            t.view(torch.int16).random_(-(2**15), 2**15 - 1)
            caches[f"model.layers.{i:02d}.self_attn.attn"] = t
        self.caches = caches
        self.layout, self.views = describe_kv_caches(caches, num_blocks)
        self.num_slots = 2 * batch
        self.buf = allocate_pinned(self.num_slots * self.layout.block_bytes).view(
            self.num_slots, self.layout.block_bytes)
        rng = random.Random(seed)
        blocks = rng.sample(range(num_blocks), 2 * batch)
        slots = list(range(self.num_slots))
        rng.shuffle(slots)
        self.store_blocks, self.store_slots = blocks[:batch], slots[:batch]
        self.load_blocks, self.load_slots = blocks[batch:], slots[batch:]
        self.batch_bytes = batch * self.layout.block_bytes

    def engine(self, **kw) -> CudaCopyEngine:
        return CudaCopyEngine(self.layout, self.views, arena_of(self.buf), **kw)

    def verify(self, engine: CudaCopyEngine) -> bool:
        engine.store(0, self.store_blocks, self.store_slots)
        engine.drain()
        engine.poll()
        ok = True
        for j in (0, len(self.store_blocks) // 2, len(self.store_blocks) - 1):
            b, s = self.store_blocks[j], self.store_slots[j]
            for layer, view in zip(self.layout.layers, self.views, strict=True):
                host = self.buf[s, layer.offset : layer.offset + layer.block_bytes].view(layer.outer, -1)
                ok &= torch.equal(host, view[:, b].cpu())
        k = 4  # and back into other blocks
        engine.load("verify", self.store_slots[:k], self.load_blocks[:k])
        engine.drain()
        engine.poll()
        for view in self.views:
            ok &= torch.equal(view[:, self.load_blocks[:k]], view[:, self.store_blocks[:k]])
        return ok


def engine_rows(setup: Setup, engine: CudaCopyEngine, warmup: int, reps: int) -> dict:
    submit: list[float] = []

    def store():
        t0 = time.perf_counter()
        engine.store(1, setup.store_blocks, setup.store_slots)
        submit.append(time.perf_counter() - t0)
        return [engine.store_stream]

    def load():
        # The engine starts a load's host->staging DMA at once (it touches no GPU
        # block); for timing, hold it behind the start event like everything else.
        engine._load_dma_stream.wait_stream(torch.cuda.current_stream())
        engine.load("r", setup.load_slots, setup.load_blocks)
        return [engine.load_stream]

    out = {
        "d2h": gbps(setup.batch_bytes, measure(store, warmup, reps)),
        "h2d": gbps(setup.batch_bytes, measure(load, warmup, reps)),
    }
    ms = measure(lambda: store() + load(), warmup, reps)
    out["both"] = gbps(2 * setup.batch_bytes, ms)
    out["both_load_first"] = gbps(2 * setup.batch_bytes, measure(lambda: load() + store(), warmup, reps))
    out["store_submit_us"] = statistics.median(submit) * 1e6
    engine.drain()
    engine.poll()
    return out


class BatchDMA:
    """cuMemcpyBatchAsync through ctypes: one driver call per batch, one entry per (block, plane) run."""

    class _Loc(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]

    class _Attr(ctypes.Structure):
        _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocHint", ctypes.c_int * 2),
                    ("dstLocHint", ctypes.c_int * 2), ("flags", ctypes.c_uint)]

    def __init__(self, setup: Setup, flags: int = 0) -> None:
        lib = ctypes.CDLL("libcuda.so.1")
        try:
            self.fn, self.v2 = lib.cuMemcpyBatchAsync_v2, True
        except AttributeError:
            self.fn, self.v2 = lib.cuMemcpyBatchAsync, False
        self.fn.restype = ctypes.c_int
        self.setup = setup
        self.flags = flags
        self.s_store, self.s_load = torch.cuda.Stream(), torch.cuda.Stream()
        dev_base, dev_stride, host_off, length = [], [], [], []
        for layer, view in zip(setup.layout.layers, setup.views, strict=True):
            for o in range(layer.outer):
                dev_base.append(view.data_ptr() + o * view.stride(0))
                dev_stride.append(view.stride(1))
                host_off.append(layer.offset + o * layer.inner_bytes)
                length.append(layer.inner_bytes)
        self.planes = (torch.tensor(dev_base), torch.tensor(dev_stride), torch.tensor(host_off),
                       torch.tensor(length))
        self.host_base, self.row = setup.buf.data_ptr(), setup.buf.stride(0)

    def _arrays(self, blocks, slots):
        base, stride, hoff, length = self.planes
        b = torch.tensor(blocks, dtype=torch.int64)[:, None]
        s = torch.tensor(slots, dtype=torch.int64)[:, None]
        dev = (base[None] + b * stride[None]).reshape(-1).contiguous()
        host = (self.host_base + s * self.row + hoff[None]).reshape(-1).contiguous()
        sizes = length[None].expand(len(blocks), -1).reshape(-1).contiguous()
        return dev, host, sizes

    def submit(self, to_host: bool, blocks, slots, stream) -> None:
        dev, host, sizes = self._arrays(blocks, slots)
        dsts, srcs = (host, dev) if to_host else (dev, host)
        attr = self._Attr()
        attr.srcAccessOrder = 1  # CU_MEMCPY_SRC_ACCESS_ORDER_STREAM
        dev_loc, host_loc = (1, torch.cuda.current_device()), (2, 0)  # DEVICE, HOST
        attr.srcLocHint[:] = dev_loc if to_host else host_loc
        attr.dstLocHint[:] = host_loc if to_host else dev_loc
        attr.flags = self.flags
        idxs = (ctypes.c_size_t * 1)(0)
        args = [ctypes.c_void_p(dsts.data_ptr()), ctypes.c_void_p(srcs.data_ptr()),
                ctypes.c_void_p(sizes.data_ptr()), ctypes.c_size_t(dev.numel()), ctypes.byref(attr),
                idxs, ctypes.c_size_t(1)]
        if not self.v2:
            fail = ctypes.c_size_t(0)
            args.append(ctypes.byref(fail))
        args.append(ctypes.c_void_p(stream.cuda_stream))
        err = self.fn(*args)
        if err != 0:
            raise RuntimeError(f"cuMemcpyBatchAsync failed: CUresult {err}")

    def rows(self, warmup: int, reps: int) -> dict:
        st, cur = self.setup, torch.cuda.current_stream()

        def store():
            self.s_store.wait_stream(cur)
            self.submit(True, st.store_blocks, st.store_slots, self.s_store)
            return [self.s_store]

        def load():
            self.s_load.wait_stream(cur)
            self.submit(False, st.load_blocks, st.load_slots, self.s_load)
            return [self.s_load]

        t0 = time.perf_counter()
        store()
        submit_ms = (time.perf_counter() - t0) * 1e3
        torch.cuda.synchronize()
        out = {
            "d2h": gbps(st.batch_bytes, measure(store, warmup, reps)),
            "h2d": gbps(st.batch_bytes, measure(load, warmup, reps)),
        }
        out["both"] = gbps(2 * st.batch_bytes, measure(lambda: store() + load(), warmup, reps))
        out["submit_ms"] = submit_ms
        return out


def contention(setup: Setup, engine: CudaCopyEngine | None, dma: BatchDMA | None, iters: int = 40) -> dict:
    """A bf16 GEMM loop on the compute stream, alone and with a store+load batch in flight.

    Reports the GEMM loop's slowdown and the copy's own rate (its start to its
    completion events) while the GEMMs run."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device="cuda")
    cur = torch.cuda.current_stream()

    def run(with_copy: bool) -> tuple[float, float]:
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        e0.record(cur)
        ends = []
        if with_copy:
            if engine is not None:
                if hasattr(engine, "_load_dma_stream"):
                    engine._load_dma_stream.wait_stream(cur)
                engine.store(1, setup.store_blocks, setup.store_slots)
                engine.load("r", setup.load_slots, setup.load_blocks)
                streams = [engine.store_stream, engine.load_stream]
            else:
                dma.s_store.wait_stream(cur)
                dma.s_load.wait_stream(cur)
                dma.submit(True, setup.store_blocks, setup.store_slots, dma.s_store)
                dma.submit(False, setup.load_blocks, setup.load_slots, dma.s_load)
                streams = [dma.s_store, dma.s_load]
            for s in streams:
                ev = torch.cuda.Event(enable_timing=True)
                ev.record(s)
                ends.append(ev)
        for _ in range(iters):
            torch.mm(a, b)
        e1.record(cur)
        torch.cuda.synchronize()
        copy_ms = max((e0.elapsed_time(ev) for ev in ends), default=0.0)
        return e0.elapsed_time(e1), copy_ms

    run(False)
    run(True)
    alone = statistics.median(run(False)[0] for _ in range(3))
    both = [run(True) for _ in range(3)]
    gemm_ms = statistics.median(x[0] for x in both)
    copy_ms = statistics.median(x[1] for x in both)
    if engine is not None:
        engine.drain()
        engine.poll()
    return {"gemm_alone_ms": alone, "gemm_with_copy_ms": gemm_ms, "slowdown": gemm_ms / alone,
            "copy_ms": copy_ms, "copy_gbps_during_gemm": gbps(2 * setup.batch_bytes, copy_ms)}


def contention_memcpy(nbytes: int, iters: int = 40) -> dict:
    """The same GEMM loop beside plain pinned memcpys both ways (copy engines only)."""
    dev = [torch.empty(nbytes, dtype=torch.uint8, device="cuda") for _ in range(2)]
    host = [torch.empty(nbytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    s1, s2 = torch.cuda.Stream(), torch.cuda.Stream()

    class _Eng:
        store_stream, load_stream = s1, s2

        def store(self, *_):
            s1.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s1):
                host[0].copy_(dev[0], non_blocking=True)

        def load(self, *_):
            s2.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s2):
                dev[1].copy_(host[1], non_blocking=True)

        def drain(self):
            torch.cuda.synchronize()

        def poll(self):
            return []

    class _Setup:
        store_blocks = store_slots = load_slots = load_blocks = None
        batch_bytes = nbytes

    return contention(_Setup(), _Eng(), None, iters)  # type: ignore[arg-type]


# ---------------------------------------------------------------- allocation


def allocation(gib: int) -> dict:
    nbytes = gib << 30
    out: dict = {"gib": gib}
    # The VM behind the device grows its RAM on first use (slowly); touch it once
    # so neither allocator below pays for that.
    t0 = time.perf_counter()
    warm = allocate_host(nbytes + (2 << 30), pin=False)
    out["vm_first_touch_s"] = time.perf_counter() - t0
    del warm
    gc.collect()

    t0 = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out["torch_pin_memory_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    del t
    gc.collect()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    out["torch_free_s"] = time.perf_counter() - t0

    for rep in range(2):
        st = AllocStats()
        t0 = time.perf_counter()
        t = allocate_host(nbytes, pin=True, stats=st)
        out[f"kvbm_s_{rep}"] = time.perf_counter() - t0
        out[f"kvbm_stats_{rep}"] = {k: v for k, v in vars(st).items()}
        assert t.is_pinned()
        t0 = time.perf_counter()
        del t
        gc.collect()
        out[f"kvbm_free_s_{rep}"] = time.perf_counter() - t0
    out["speedup"] = out["torch_pin_memory_s"] / min(out["kvbm_s_0"], out["kvbm_s_1"])
    return out


# ---------------------------------------------------------------- main


def machine() -> str:
    try:
        q = "name,driver_version,pcie.link.gen.current,pcie.link.width.current,memory.total"
        smi = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception as exc:  # noqa: BLE001
        smi = f"nvidia-smi failed: {exc}"
    import triton

    return (f"{smi}; torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}, "
            f"{os.cpu_count()} CPUs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--num-blocks", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--alloc-gib", type=int, default=32, help="0 skips the allocation timing")
    ap.add_argument("--quick", action="store_true", help="fewer variants")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "bench.json"))
    args = ap.parse_args()
    W, R = args.warmup, args.reps

    RESULTS["machine"] = machine()
    print("machine:", RESULTS["machine"], flush=True)
    setup = Setup(args.layers, args.num_blocks, args.batch)
    nbytes = setup.batch_bytes
    print(f"batch: {args.batch} blocks x {setup.layout.block_bytes} B = {nbytes / 1e9:.3f} GB per direction; "
          f"{setup.layout.describe()}", flush=True)

    base = baseline(nbytes, W, R, "torch")
    base_reg = baseline(nbytes, W, R, "kvbm")
    RESULTS["baseline"] = {"cudaHostAlloc": base, "allocate_pinned": base_reg}
    print(f"baseline cudaHostAlloc   : D2H {base['d2h']:.2f}  H2D {base['h2d']:.2f}  "
          f"both {base['both']:.2f} GB/s")
    print(f"baseline allocate_pinned : D2H {base_reg['d2h']:.2f}  H2D {base_reg['h2d']:.2f}  "
          f"both {base_reg['both']:.2f} GB/s", flush=True)

    variants: list[tuple[str, dict]] = []
    M = 1 << 20
    for api in ("batch", "memcpy"):
        for staging in (16 * M, 32 * M, 64 * M):
            variants.append((f"dma {api} staging={staging // M}M",
                             {"staging_bytes": staging, "dma_api": api}))
    variants.append(("dma memcpy staging=128M", {"staging_bytes": 128 * M, "dma_api": "memcpy"}))
    for api in ("batch", "memcpy"):
        variants.append((f"cupy dma {api} staging=32M",
                         {"backend": "cupy", "staging_bytes": 32 * M, "dma_api": api}))
    for ctas in ([16, 132, 264] if not args.quick else [132]):
        variants.append((f"kernel ctas={ctas}",
                         {"store_mode": "kernel", "load_mode": "kernel", "ctas": ctas}))
    variants.append(("cupy kernel ctas=264",
                     {"backend": "cupy", "store_mode": "kernel", "load_mode": "kernel", "ctas": 264}))

    rows = []
    engines: dict[str, CudaCopyEngine] = {}
    for name, kw in variants:
        eng = None
        try:
            eng = setup.engine(**kw)
            if not setup.verify(eng):
                raise RuntimeError("verification failed")
            r = engine_rows(setup, eng, W, R)
        except Exception as exc:  # noqa: BLE001
            print(f"  {name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            continue
        if name in ("dma batch staging=32M", "dma memcpy staging=32M", "kernel ctas=16",
                    "kernel ctas=132"):
            engines[name] = eng
        del eng
        rows.append((name, r))
        print(f"  {name:28s} store {r['d2h']:6.2f}  load {r['h2d']:6.2f}  both {r['both']:6.2f} GB/s  "
              f"(load first {r['both_load_first']:.2f}; store submit {r['store_submit_us']:.0f} us; "
              "verified)",
              flush=True)

    dma = None
    try:
        dma = BatchDMA(setup, flags=0)
        r = dma.rows(W, R)
        name = "cuMemcpyBatchAsync per plane"
        rows.append((name, r))
        print(f"  {name:28s} store {r['d2h']:6.2f}  load {r['h2d']:6.2f}  both {r['both']:6.2f} GB/s "
              f"(submit {r['submit_ms']:.1f} ms)", flush=True)
    except Exception as exc:  # noqa: BLE001
        print(f"  cuMemcpyBatchAsync: FAILED {type(exc).__name__}: {exc}", flush=True)
        dma = None
    RESULTS["kvbm"] = dict(rows)

    cont = {}
    for name, eng in engines.items():
        try:
            cont[name] = contention(setup, eng, None)
        except Exception as exc:  # noqa: BLE001
            print(f"  contention {name}: FAILED {exc}", flush=True)
    try:
        cont["baseline memcpy"] = contention_memcpy(nbytes)
    except Exception as exc:  # noqa: BLE001
        print(f"  contention memcpy: FAILED {exc}", flush=True)
    RESULTS["contention"] = cont

    del engines, setup, dma
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    if args.alloc_gib:
        try:
            RESULTS["allocation"] = allocation(args.alloc_gib)
        except Exception as exc:  # noqa: BLE001
            RESULTS["allocation"] = {"error": repr(exc)}

    # ---- summary table (last, so the tail of the output holds it)
    print("\n=== summary (GB/s; ratio = kvbm / baseline cudaHostAlloc pinned memcpy of the same bytes) ===")
    hdr = ("variant", "store", "ratio", "load", "ratio", "both", "ratio")
    print("{:30s} {:>7s} {:>6s} {:>7s} {:>6s} {:>7s} {:>6s}".format(*hdr))
    print(f"{'baseline memcpy':30s} {base['d2h']:7.2f} {1:6.3f} {base['h2d']:7.2f} {1:6.3f} "
          f"{base['both']:7.2f} {1:6.3f}")
    for name, r in rows:
        print(f"{name:30s} {r['d2h']:7.2f} {r['d2h'] / base['d2h']:6.3f} {r['h2d']:7.2f} "
              f"{r['h2d'] / base['h2d']:6.3f} {r['both']:7.2f} {r['both'] / base['both']:6.3f}")
    for name, c in cont.items():
        print(f"contention {name:22s} GEMM x{c['slowdown']:.3f} ({c['gemm_alone_ms']:.1f} -> "
              f"{c['gemm_with_copy_ms']:.1f} ms), copy {c['copy_gbps_during_gemm']:.1f} GB/s both ways "
              f"while GEMMs run")
    al = RESULTS.get("allocation")
    if al and "error" not in al:
        s0 = al["kvbm_stats_0"]
        print(f"alloc {al['gib']} GiB: torch pin_memory {al['torch_pin_memory_s']:.2f} s; allocate_pinned "
              f"{al['kvbm_s_0']:.2f} / {al['kvbm_s_1']:.2f} s (populate {s0['populate_s']:.2f} via "
              f"{s0['populate_method']} x{s0['threads']}, register {s0['register_s']:.2f}); "
              f"speedup x{al['speedup']:.2f}; VM first touch {al['vm_first_touch_s']:.2f} s")
    elif al:
        print("allocation:", al["error"])
    try:
        with open(args.json, "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    except OSError:
        pass


if __name__ == "__main__":
    main()
