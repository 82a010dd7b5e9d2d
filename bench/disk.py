"""Disk tier (G3) throughput: DiskArena against the raw device, on one directory.

(a) baseline: plain sequential O_DIRECT write then read of a SIZE file with
    large aligned buffers (one thread, CHUNK bytes per call): what a simple
    reader/writer gets from this filesystem;
(b) DiskArena.write_blocks / read_blocks of the same amount of data, in
    batches of BATCH blocks, slots in random order, for each block size
    (default 2 MiB = one 16-token block of Llama-3.1-8B in bf16, all 32
    layers, K and V; and 128 KiB, a small model's block), from page-aligned
    host memory (as pinned G2 rows are: zero-copy) and from memory that is
    not page-aligned (staged through an aligned buffer);
(c) for reference, raw random-slot O_DIRECT pwrite/preadv of the same slots
    with the same number of threads and no checksum or copy: the device's own
    limit for that access pattern. It separates "the drive is slower at random
    blocks of this size" from "DiskArena costs".

Variants run interleaved, REPEAT rounds, and the median is reported (virtual
disks drift a lot). Writes include the final fdatasync. Ratios are to the
sequential baseline (goal >= 0.9). The single-core cost of the per-block CPU
work (CRC-32, memcpy) is printed to tell a CPU limit from a device limit.
Without O_DIRECT the run says so (the page cache is then dropped with
posix_fadvise before reads, which is best effort).

(d) ``--executor``: G3 loads end to end through kvbm's transfer executor on CPU
    (``TransferExecutor`` with a ``DiskMedium`` over a ``DiskArena``): every
    block is stored into G3 from a CPU "G1" KV cache laid out as vLLM's CPU
    backend lays it out (``[blocks, heads, 16 tokens, 2*head dim]`` bf16 per
    layer; untimed, verified), then loaded back in jobs of ``--load-batches``
    blocks (what vLLM asks for per request), random slot order, through the row
    pool (read by the arena's I/O threads, verified on the medium's threads, which
    run two jobs at once; scattered into G1 by the pool's copy engine, chunk by
    chunk), as many jobs in flight as the pool holds (the window this benchmark
    always used: the executor itself would queue more). Destination G1 blocks
    are either consecutive per job (a fresh allocation) or random (a fragmented
    free list). Each round zeroes G1 first and checks every loaded block's CRC
    against the stored bytes. The ratio is to (c)'s random-slot reads of the
    same block size, here reading the executor's own G3 file (the same bytes, written
    as long before; goal >= 0.9). This mode runs only (c) and (d). CPU s/GiB is the
    process CPU time of the reads (all threads): on busy cores it tells a CPU limit
    (checksums, copies, per-block Python) from a device one. ``--slots allocator``
    instead stores the blocks in consecutive slots, as the pool's free list hands
    them to a stored batch, and loads prefixes of consecutive blocks (random
    offsets and order): what DiskArena reads as runs, one preadv per run of
    slots. It adds a row of raw per-block reads in that same slot order.
    ``--stores`` adds G3 stores through the executor (G1 -> pool rows -> one
    ``write_blocks`` call per job, then fdatasync), jobs of ``--load-batches``
    blocks in the loads' order (with ``--slots allocator`` consecutive slots:
    what DiskArena writes as runs, one pwritev per run), against raw per-block
    whole-slot pwrite of the same file (+fdatasync) in random slot order (and,
    with ``--slots allocator``, in the stores' slot order). The raw writes
    clobber the file; each round's stores then write every block again before
    any read.

Run: ``python bench/disk.py [--dir DIR] [--size-gib 1] [--block-sizes 2MiB,128KiB]
[--batch 64] [--threads 4] [--repeat 5] [--executor [--load-batches 64,256]
[--slots random|allocator] [--stores]]``.
No GPU; torch only for ``--executor``.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvbm.storage.checksum import crc32
from kvbm.storage.disk import DiskArena
from kvbm.tools.disk_probe import probe_disk

_O_DIRECT = getattr(os, "O_DIRECT", 0)
Result = tuple[float, float]  # write GB/s, read GB/s


def parse_size(text: str) -> int:
    text = text.strip().lower()
    for suffix, mult in (("kib", 1 << 10), ("mib", 1 << 20), ("gib", 1 << 30),
                         ("k", 1 << 10), ("m", 1 << 20), ("g", 1 << 30)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * mult)
    return int(text)


def fmt_size(n: int) -> str:
    for unit, mult in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= mult and n % mult == 0:
            return f"{n // mult} {unit}"
    return f"{n} B"


def drop_cache(fd: int) -> None:
    os.fdatasync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def open_file(path: str, size: int, direct: bool) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | (_O_DIRECT if direct else 0), 0o600)
    if os.fstat(fd).st_size < size:
        os.posix_fallocate(fd, 0, size)
    return fd


def baseline(path: str, size: int, chunk: int, direct: bool) -> Result:
    """Sequential write (+fdatasync) and read of ``size`` bytes, one thread."""
    fd = open_file(path, size, direct)
    buf = mmap.mmap(-1, chunk)
    buf.write(np.random.default_rng(0).integers(0, 256, chunk, dtype=np.uint8).tobytes())
    try:
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            os.pwrite(fd, buf, off)
        os.fdatasync(fd)
        write = size / (time.perf_counter() - t0) / 1e9
        if not direct:
            drop_cache(fd)
        t0 = time.perf_counter()
        for off in range(0, size, chunk):
            os.preadv(fd, [buf], off)
        read = size / (time.perf_counter() - t0) / 1e9
    finally:
        buf.close()
        os.close(fd)
    return write, read


def raw_random(path: str, slots: int, slot_size: int, bb: int, threads: int, direct: bool,
               rng: np.random.Generator) -> Result:
    """Whole-slot pwrite/preadv in random slot order, ``threads`` at once, no checksum or copy."""
    fd = open_file(path, slots * slot_size, direct)
    bufs = [mmap.mmap(-1, slot_size) for _ in range(threads)]

    def timed(op: Callable[[mmap.mmap, int], object], sync: bool) -> float:
        order = iter(rng.permutation(slots).tolist())  # shared: threads pull the next slot

        def worker(buf: mmap.mmap) -> None:
            for s in order:
                op(buf, s * slot_size)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(worker, b) for b in bufs]:
                f.result()
        if sync:
            os.fdatasync(fd)
        return slots * bb / (time.perf_counter() - t0) / 1e9

    try:
        write = timed(lambda b, off: os.pwrite(fd, b, off), sync=True)
        if not direct:
            drop_cache(fd)
        read = timed(lambda b, off: os.preadv(fd, [b], off), sync=False)
    finally:
        for b in bufs:
            b.close()
        os.close(fd)
    return write, read


def raw_read_file(path: str, slots: int, slot_size: int, bb: int, threads: int, direct: bool,
                  rng: np.random.Generator, read_cpu: list[float], in_order: Callable[[], list[int]] | None = None
                  ) -> float:
    """(c)'s reads, of an existing file (the executor's own G3 file: the same bytes, as long
    since written): whole-slot preadv in random slot order (or ``in_order()``'s: the slots of
    prefix loads), ``threads`` at once, one block per call, no checksum or copy, into rows of
    the memory the executor's row pool reads into (huge pages where the kernel gives them:
    fewer, larger device requests than 4 KiB pages).
    Appends the reads' process CPU seconds to ``read_cpu``; returns GB/s."""
    return _raw_slots(path, False, slots, slot_size, bb, threads, direct, rng, read_cpu, in_order)


def raw_write_file(path: str, slots: int, slot_size: int, bb: int, threads: int, direct: bool,
                   rng: np.random.Generator, write_cpu: list[float], in_order: Callable[[], list[int]] | None = None
                   ) -> float:
    """(c)'s writes, to an existing file (the executor's own G3 file, clobbered: the stores
    that follow write it again): whole-slot pwrite in random slot order (or ``in_order()``'s),
    ``threads`` at once, one block per call, then fdatasync; no checksum or copy, from rows of
    the memory the executor's row pool writes from. Appends the writes' process CPU seconds to
    ``write_cpu``; returns GB/s."""
    return _raw_slots(path, True, slots, slot_size, bb, threads, direct, rng, write_cpu, in_order)


def _raw_slots(path: str, write: bool, slots: int, slot_size: int, bb: int, threads: int, direct: bool,
               rng: np.random.Generator, cpu: list[float], in_order: Callable[[], list[int]] | None) -> float:
    """:func:`raw_read_file` or :func:`raw_write_file`: one whole-slot ``preadv``/``pwritev`` per
    slot from ``threads`` threads pulling the next slot of one shared order."""
    from kvbm.storage.host import make_host_arena_buffer

    fd = os.open(path, (os.O_WRONLY if write else os.O_RDONLY) | (_O_DIRECT if direct else 0))
    rows = make_host_arena_buffer(threads, slot_size, False).numpy()
    if write:
        rows[:] = rng.integers(0, 256, rows.shape, dtype=np.uint8)
    io = os.pwritev if write else os.preadv
    try:
        if not direct and not write:
            drop_cache(fd)
        order = iter(in_order() if in_order else rng.permutation(slots).tolist())  # shared: threads pull the next

        def worker(buf: np.ndarray) -> None:
            for s in order:
                io(fd, [buf], s * slot_size)

        t0, c0 = time.perf_counter(), time.process_time()
        with ThreadPoolExecutor(threads) as pool:
            for f in [pool.submit(worker, b) for b in list(rows)]:
                f.result()
        if write:
            os.fdatasync(fd)
        cpu.append(time.process_time() - c0)
        return slots * bb / (time.perf_counter() - t0) / 1e9
    finally:
        os.close(fd)


def host_rows(rows: int, bb: int, aligned: bool, rng: np.random.Generator) -> np.ndarray:
    """``rows`` blocks of one host buffer: page-aligned rows (like pinned G2
    memory) or shifted by 64 bytes so that no row is page-aligned."""
    shift = 0 if aligned else 64
    mm = mmap.mmap(-1, rows * bb + 4096)
    arr = np.frombuffer(mm, dtype=np.uint8)[shift : shift + rows * bb].reshape(rows, bb)
    arr[:] = rng.integers(0, 256, arr.shape, dtype=np.uint8)
    return arr


def arena_run(arena: DiskArena, batch: int, aligned: bool, rng: np.random.Generator) -> Result:
    """Write every slot once (random order, batches), sync, read them all back."""
    n, bb = arena.num_slots, arena.block_bytes
    src = host_rows(batch, bb, aligned, rng)
    dst = host_rows(batch, bb, aligned, rng)
    hashes = [((s * 0x9E3779B97F4A7C15 + 1) % (1 << 64)).to_bytes(16, "little") for s in range(n)]  # 128-bit
    order = rng.permutation(n).tolist()
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        ok = arena.write_blocks([(s, hashes[s], src[i]) for i, s in enumerate(order[lo : lo + batch])])
        assert all(ok), "write failed"
    arena.sync()
    write = n * bb / (time.perf_counter() - t0) / 1e9
    if not arena.o_direct:
        drop_cache(arena._fd)
    order = rng.permutation(n).tolist()
    t0 = time.perf_counter()
    for lo in range(0, n, batch):
        ok = arena.read_blocks([(s, hashes[s], dst[i]) for i, s in enumerate(order[lo : lo + batch])])
        assert all(ok), "read failed verification"
    read = n * bb / (time.perf_counter() - t0) / 1e9
    return write, read


class ExecutorBench:
    """G3 through the real transfer executor on CPU: one DiskArena file holding ``n`` blocks
    stored from a CPU KV cache, loaded back into it in jobs (see (d) in the module doc)."""

    TOKENS = 16

    def __init__(self, workdir: str, size: int, block: int, threads: int, direct: bool, slots: str) -> None:
        import torch

        from kvbm.transfer.executor import POOL_BYTES, POOL_ROWS, Blocks, TransferExecutor
        from kvbm.transfer.layout import describe_kv_caches
        from kvbm.transfer.media import DiskMedium

        self.torch, self.Blocks = torch, Blocks
        self.block, self.direct = block, direct
        self.n = n = size // block
        # vLLM's CPU backend: per layer [num_blocks, kv heads, tokens, 2 * head dim], bf16.
        layers = 32 if block >= (1 << 20) else 16
        per_token_row = block // layers // self.TOKENS // 2  # bf16 elements per (head, token): 2*D*heads
        head2 = 256 if per_token_row % 256 == 0 else per_token_row
        heads = per_token_row // head2
        if layers * heads * self.TOKENS * head2 * 2 != block:
            raise SystemExit(f"--executor: cannot lay out a {block} B block as a CPU KV cache")
        gen = torch.Generator().manual_seed(block)
        self.cache = {f"model.layers.{i}.self_attn": torch.randint(
            -30000, 30000, (n, heads, self.TOKENS, head2), dtype=torch.int16, generator=gen).view(torch.bfloat16)
            for i in range(layers)}
        self.shape = f"{layers} layers x [{n}, {heads}, {self.TOKENS}, {head2}] bf16"
        layout, views = describe_kv_caches(self.cache, n)
        assert layout.block_bytes == block
        self.arena = DiskArena(workdir, n, block, file_tag=f"bench-exec-{block}", io_threads=threads,
                               disable_o_direct=not direct)
        self.ex = TransferExecutor(layout, views, media={"G3": DiskMedium(self.arena, delete_on_close=True)})
        self.pool_rows = max(1, min(POOL_ROWS, POOL_BYTES // block))
        self.hashes = [(b + 1).to_bytes(16, "little") for b in range(n)]
        # random: no two blocks of a load in neighbouring slots (the worst case); allocator: the
        # pool's free list of a fresh file hands each stored batch consecutive slots, so a prefix
        # load reads runs of slots (what DiskArena coalesces into one preadv per run)
        self.prefixes = slots == "allocator"
        self.slot_of = list(range(n)) if self.prefixes else np.random.default_rng(block).permutation(n).tolist()
        self.crcs = [self._crc(b) for b in range(n)]
        self.g1_of = list(range(n))  # the G1 block that holds block b (loads into random G1 blocks move it)
        self.cpu: dict[tuple[int, bool | str | None], list[float]] = {}  # process CPU s per round
        self._job = 0
        # Store every block once (untimed): G1 block b -> G3 slot slot_of[b].
        jobs = [(list(range(lo, min(lo + 64, n))),) for lo in range(0, n, 64)]
        self._run([(self.Blocks("G1", b), self.Blocks("G3", [self.slot_of[i] for i in b],
                                                       [self.hashes[i] for i in b])) for (b,) in jobs], 64)
        self.arena.sync()

    def _crc(self, b: int) -> int:
        crc = 0
        for t in self.cache.values():
            crc = zlib.crc32(t[b].contiguous().view(self.torch.uint8).numpy(), crc)
        return crc

    def _run(self, jobs: list, batch: int) -> None:
        """Submit ``jobs`` keeping as many in flight as the row pool holds; wait for all; raise
        if one did not move every block."""
        window = max(1, self.pool_rows // batch)
        pending: dict[int, int] = {}  # job id -> blocks
        todo = iter(jobs)
        left = len(jobs)
        while left:
            while len(pending) < window:
                job = next(todo, None)
                if job is None:
                    break
                self._job += 1
                pending[self._job] = len(job[0].ids)
                self.ex.submit(self._job, *job)
            done = self.ex.poll()
            for d in done:
                if not d.ok or d.moved != pending.pop(d.job_id):
                    raise SystemExit(f"--executor: job {d.job_id} failed: {d}")
                left -= 1
            if not done:
                time.sleep(0.001)  # vLLM polls once per engine step

    def load(self, batch: int, consecutive: bool, rng: np.random.Generator) -> float:
        """Load every block in random order, ``batch`` per job; returns GB/s (verified after)."""
        for t in self.cache.values():
            t.zero_()
        if not self.direct:
            drop_cache(self.arena._fd)
        order = self.order(batch, rng)
        dst = list(range(self.n)) if consecutive else rng.permutation(self.n).tolist()
        jobs = [(self.Blocks("G3", [self.slot_of[b] for b in order[lo : lo + batch]],
                             [self.hashes[b] for b in order[lo : lo + batch]]),
                 self.Blocks("G1", dst[lo : lo + batch])) for lo in range(0, self.n, batch)]
        t0, c0 = time.perf_counter(), time.process_time()
        self._run(jobs, batch)
        gbs = self.n * self.block / (time.perf_counter() - t0) / 1e9
        self.cpu.setdefault((batch, consecutive), []).append(time.process_time() - c0)
        for b, d in zip(order, dst):
            self.g1_of[b] = d
        bad = sum(self._crc(d) != self.crcs[b] for b, d in zip(order, dst))
        if bad:
            raise SystemExit(f"--executor: {bad} of {self.n} loaded blocks differ from what was stored")
        self.verified += self.n
        return gbs

    def store(self, batch: int, rng: np.random.Generator) -> float:
        """Store every block again (G1 -> G3, the same bytes) in the loads' order, ``batch`` per job,
        then fdatasync; returns GB/s. Process CPU seconds go to ``cpu[(batch, "store")]``."""
        if self.g1_of != list(range(self.n)):  # untimed: block b back in G1 block b (a load may have moved it)
            where = self.torch.tensor(self.g1_of)
            for t in self.cache.values():
                t.copy_(t.index_select(0, where))
            self.g1_of = list(range(self.n))
        order = self.order(batch, rng)
        jobs = [(self.Blocks("G1", order[lo : lo + batch]),
                 self.Blocks("G3", [self.slot_of[b] for b in order[lo : lo + batch]],
                             [self.hashes[b] for b in order[lo : lo + batch]])) for lo in range(0, self.n, batch)]
        t0, c0 = time.perf_counter(), time.process_time()
        self._run(jobs, batch)
        self.arena.sync()
        gbs = self.n * self.block / (time.perf_counter() - t0) / 1e9
        self.cpu.setdefault((batch, "store"), []).append(time.process_time() - c0)
        return gbs

    def order(self, batch: int, rng: np.random.Generator) -> list[int]:
        """The blocks in load order: random, or with ``--slots allocator`` prefixes of ``batch``
        consecutive blocks (from a random offset, so loads straddle the stored batches) in random
        order."""
        if not self.prefixes:
            return rng.permutation(self.n).tolist()
        shift = int(rng.integers(self.n))
        starts = rng.permutation(range(0, self.n, batch)).tolist()
        return [(b + shift) % self.n for lo in starts for b in range(lo, min(lo + batch, self.n))]

    def arena_reads(self, batch: int, rng: np.random.Generator) -> float:
        """Every block through ``DiskArena.read_blocks`` alone (read + verify into pool rows, no
        executor, no scatter), random order, ``batch`` per call: what the CRC costs over raw."""
        rows = self.ex._pool.buffers(range(batch))
        order = self.order(batch, rng)
        t0, c0 = time.perf_counter(), time.process_time()
        for lo in range(0, self.n, batch):
            part = order[lo : lo + batch]
            if not all(self.arena.read_blocks([(self.slot_of[b], self.hashes[b], rows[i])
                                               for i, b in enumerate(part)])):
                raise SystemExit("--executor: a DiskArena read failed verification")
        self.cpu.setdefault((batch, None), []).append(time.process_time() - c0)
        return self.n * self.block / (time.perf_counter() - t0) / 1e9

    verified = 0

    def close(self) -> None:
        self.ex.close()


def cpu_costs(block: int) -> dict[str, float]:
    """Single-thread GB/s of the per-block CPU work (the CRC is the arena's: ISA-L's)."""
    a = np.random.default_rng(1).integers(0, 256, block, dtype=np.uint8)
    b = np.empty_like(a)
    reps = max(1, (256 << 20) // block)
    out = {}
    for name, fn in (("crc32", lambda: crc32(a)), ("memcpy", lambda: np.copyto(b, a))):
        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        out[name] = block * reps / (time.perf_counter() - t0) / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=None, help="parent directory (default $DYN_KVBM_DISK_CACHE_DIR or /tmp)")
    p.add_argument("--size-gib", type=float, default=1.0, help="data per measurement")
    p.add_argument("--block-sizes", default="2MiB,128KiB")
    p.add_argument("--batch", type=int, default=64, help="blocks per write_blocks/read_blocks call")
    p.add_argument("--threads", type=int, default=4, help="DiskArena io_threads")
    p.add_argument("--chunk", default="64MiB", help="baseline buffer size")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--disable-o-direct", action="store_true")
    p.add_argument("--executor", action="store_true",
                   help="G3 loads through the transfer executor against raw random reads, see (d)")
    p.add_argument("--load-batches", default="64,256", help="blocks per load job with --executor")
    p.add_argument("--stores", action="store_true",
                   help="with --executor: also G3 stores through the executor against raw writes of the same file")
    p.add_argument("--slots", choices=("random", "allocator"), default="random",
                   help="with --executor: where blocks live in G3 and what a load asks for: random slots and "
                        "blocks (the worst case), or prefixes in the consecutive slots the pool hands a batch")
    args = p.parse_args()

    parent = args.dir or os.environ.get("DYN_KVBM_DISK_CACHE_DIR") or "/tmp"
    os.makedirs(parent, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="kvbm-bench-disk-", dir=parent)
    size = int(args.size_gib * (1 << 30)) // (1 << 20) * (1 << 20)
    chunk = parse_size(args.chunk)
    blocks = [parse_size(s) for s in args.block_sizes.split(",")]
    probe = probe_disk(workdir)
    direct = bool(probe["o_direct"]) and not args.disable_o_direct
    print(f"directory  {workdir} ({probe['filesystem']}, {probe['free_bytes'] / 1e9:.1f} GB free)")
    print(f"setup      {os.cpu_count()} CPUs; {fmt_size(size)} per measurement; io_threads "
          f"{args.threads}; batch {args.batch}; median of {args.repeat} interleaved rounds")
    if direct:
        print("I/O        O_DIRECT (page cache not involved)")
    else:
        why = "disabled by --disable-o-direct" if args.disable_o_direct else (
            f"unavailable on this filesystem ({probe['o_direct_error']})")
        print(f"I/O        NOTE: O_DIRECT {why}: buffered I/O; the page cache is dropped with "
              f"posix_fadvise before reads (best effort), numbers may include cache effects")
    rng = np.random.default_rng(0)
    if args.executor:
        executor_main(workdir, size, blocks, args, direct, rng)
        return
    variants: dict[str, Callable[[], Result]] = {
        f"baseline sequential {fmt_size(chunk)} I/O": lambda: baseline(
            os.path.join(workdir, "baseline.bin"), size, chunk, direct),
    }
    arenas = []
    try:
        for b in blocks:
            arena = DiskArena(workdir, size // b, b, file_tag=f"bench-{b}", io_threads=args.threads,
                              disable_o_direct=not direct)
            arenas.append(arena)
            variants[f"raw random {fmt_size(b)} x{args.threads} threads"] = (
                lambda a=arena: raw_random(os.path.join(workdir, f"raw-{a.block_bytes}.bin"), a.num_slots,
                                           a.slot_size, a.block_bytes, args.threads, direct, rng))
            variants[f"DiskArena {fmt_size(b)}, aligned host"] = (
                lambda a=arena: arena_run(a, args.batch, True, rng))
            variants[f"DiskArena {fmt_size(b)}, unaligned host"] = (
                lambda a=arena: arena_run(a, args.batch, False, rng))
        results: dict[str, list[Result]] = {k: [] for k in variants}
        for _ in range(args.repeat):  # interleaved: drift hits every variant alike
            for name, fn in variants.items():
                results[name].append(fn())
        med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v))
               for k, v in results.items()}
        bw, br = next(iter(med.values()))
        print(f"\n{'':40s} {'write GB/s':>10s} {'ratio':>6s} {'read GB/s':>10s} {'ratio':>6s}")
        for name, (w, r) in med.items():
            print(f"{name:40s} {w:10.2f} {w / bw:6.2f} {r:10.2f} {r / br:6.2f}")
        print("\nall rounds (write/read GB/s):")
        for name, runs in results.items():
            print(f"  {name:40s} " + " ".join(f"{w:.2f}/{r:.2f}" for w, r in runs))
        print("\nsingle-thread CPU cost per block (GB/s):")
        for b in blocks:
            print(f"  {fmt_size(b)}: " + ", ".join(f"{k} {v:.2f}" for k, v in cpu_costs(b).items()))
    finally:
        for arena in arenas:
            arena.close()
        shutil.rmtree(workdir, ignore_errors=True)


def executor_main(workdir: str, size: int, blocks: list[int], args: argparse.Namespace, direct: bool,
                  rng: np.random.Generator) -> None:
    """(c) and (d) only: raw random-slot reads against loads through the transfer executor."""
    batches = [int(b) for b in args.load_batches.split(",")]
    benches: list[ExecutorBench] = []
    variants: dict[str, Callable[[], float]] = {}
    rows: list[tuple[str, str]] = []  # (executor variant, its raw baseline)
    wrows: list[tuple[str, str]] = []  # the same for stores (--stores)
    cpu: dict[str, list[float]] = {}  # process CPU seconds per round
    try:
        for b in blocks:
            t0 = time.perf_counter()
            bench = ExecutorBench(workdir, size, b, args.threads, direct, args.slots)
            benches.append(bench)
            if args.stores:  # first in each round: the raw writes clobber the file, the stores rewrite it
                wraw = f"raw random write {fmt_size(b)} x{args.threads}, same file"
                cpu[wraw] = []
                variants[wraw] = lambda e=bench, c=cpu[wraw]: raw_write_file(
                    e.arena.path, e.n, e.arena.slot_size, e.block, args.threads, direct, rng, c)
                if bench.prefixes:
                    name = f"raw write store order {fmt_size(b)} x{args.threads}"
                    cpu[name] = []
                    variants[name] = lambda e=bench, c=cpu[name]: raw_write_file(
                        e.arena.path, e.n, e.arena.slot_size, e.block, args.threads, direct, rng, c,
                        lambda: [e.slot_of[x] for x in e.order(batches[0], rng)])
                    wrows.append((name, wraw))
                for batch in batches:
                    name = f"executor store {fmt_size(b)}, {batch}/job"
                    variants[name] = lambda e=bench, n=batch: e.store(n, rng)
                    cpu[name] = bench.cpu.setdefault((batch, "store"), [])
                    wrows.append((name, wraw))
            raw = f"raw random {fmt_size(b)} x{args.threads}, same file"
            cpu[raw] = []
            variants[raw] = lambda e=bench, c=cpu[raw]: raw_read_file(
                e.arena.path, e.n, e.arena.slot_size, e.block, args.threads, direct, rng, c)
            if bench.prefixes:  # the same per-block reads in the loads' slot order, for reference
                name = f"raw prefix order {fmt_size(b)} x{args.threads}"
                cpu[name] = []
                variants[name] = lambda e=bench, c=cpu[name]: raw_read_file(
                    e.arena.path, e.n, e.arena.slot_size, e.block, args.threads, direct, rng, c,
                    lambda: [e.slot_of[x] for x in e.order(batches[0], rng)])
                rows.append((name, raw))
            print(f"G1 cache   {fmt_size(b)} blocks: {bench.shape}; G3 stored through the executor in "
                  f"{time.perf_counter() - t0:.1f} s; row pool {bench.pool_rows} rows")
            name = f"DiskArena read+verify {fmt_size(b)}, {batches[0]}/call"
            variants[name] = lambda e=bench, n=batches[0]: e.arena_reads(n, rng)
            cpu[name] = bench.cpu.setdefault((batches[0], None), [])
            rows.append((name, raw))
            for batch in batches:
                for consecutive in (True, False):
                    name = f"executor {fmt_size(b)}, {batch}/job, G1 {'consec' if consecutive else 'random'}"
                    variants[name] = lambda e=bench, n=batch, c=consecutive: e.load(n, c, rng)
                    cpu[name] = bench.cpu.setdefault((batch, consecutive), [])
                    rows.append((name, raw))
        results: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(args.repeat):  # interleaved: drift hits every variant alike
            for name, fn in variants.items():
                results[name].append(fn())
        med = {k: statistics.median(v) for k, v in results.items()}
        cpu_gib = {k: statistics.median(v) / (size / (1 << 30)) for k, v in cpu.items()}
        print(f"\n{'':44s} {'read GB/s':>10s} {'raw GB/s':>9s} {'ratio':>6s} {'CPU s/GiB':>10s} {'raw':>5s}")
        for name, raw in rows:
            print(f"{name:44s} {med[name]:10.2f} {med[raw]:9.2f} {med[name] / med[raw]:6.2f} "
                  f"{cpu_gib[name]:10.2f} {cpu_gib[raw]:5.2f}")
        if wrows:
            print(f"\n{'':44s} {'write GB/s':>10s} {'raw GB/s':>9s} {'ratio':>6s} {'CPU s/GiB':>10s} {'raw':>5s}")
            for name, raw in wrows:
                print(f"{name:44s} {med[name]:10.2f} {med[raw]:9.2f} {med[name] / med[raw]:6.2f} "
                      f"{cpu_gib[name]:10.2f} {cpu_gib[raw]:5.2f}")
        print("\nall rounds (GB/s):")
        for name, runs in results.items():
            print(f"  {name:44s} " + " ".join(f"{r:.2f}" for r in runs))
        print(f"\nverified   {sum(e.verified for e in benches)} loaded blocks, every one CRC-equal to what was "
              f"stored")
    finally:
        for bench in benches:
            bench.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
