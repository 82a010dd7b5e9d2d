"""Start-up cost of the weights fingerprint (every byte hashed, digests cached per file version).

Builds an 8B-sized checkpoint (default 16 GB in 4 safetensors shards of
random bytes, shaped like Llama-3.1-8B's bf16 files: a JSON header naming the
tensors, then their data) in a temporary directory, then times, side by side
in one run:

(a) a cold full hash: the shards written, fdatasync'ed and dropped from the
    page cache (``posix_fadvise(DONTNEED)``, best effort; the run says how
    much stayed resident), then ``fingerprint`` with an empty digest cache:
    what the first start after a download pays when the weights are not in
    memory;
(b) a warm full hash: the same with the files in the page cache (vLLM has
    just read them to load the model, so this is the usual first start);
(c) the cached fingerprint: the digest cache filled by (a)/(b), nothing
    read but ``stat`` (every later start with the same files);
(d) for reference, a plain read of the files (no hashing, 16 MiB reads, a
    thread per file as the fingerprint does), cold and warm: the device's and the page cache's own limit.

Prints seconds and GB/s for each and the ratios hash/read. The first start
with new files pays (a) or (b); later starts pay (c).

Run: ``python bench/weights_fingerprint.py [--dir DIR] [--gb 16] [--shards 4]
[--keep]``. DIR defaults to ``$TMPDIR``; it needs GB of free space.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

import kvbm.runtime.fingerprint as fp

CHUNK = 64 << 20


def write_shard(path: str, nbytes: int, rng: np.random.Generator) -> None:
    """A safetensors-shaped file: an 8-byte header length, a JSON header, tensor bytes."""
    tensor_bytes = 4096 * 14336 * 2  # one MLP projection of an 8B model in bf16 (117 MB)
    count = max(1, nbytes // tensor_bytes)
    header = {f"model.layers.{i}.mlp.weight": {"dtype": "BF16", "shape": [4096, 14336],
                                                "data_offsets": [i * tensor_bytes, (i + 1) * tensor_bytes]}
              for i in range(count)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        left = count * tensor_bytes
        while left:
            n = min(CHUNK, left)
            f.write(rng.bytes(n))
            left -= n
        f.flush()
        os.fdatasync(f.fileno())


def drop_cache(paths: list[str]) -> float:
    """Evict the files from the page cache; returns the fraction still resident (0 = cold)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return resident(paths)


def resident(paths: list[str]) -> float:
    """Fraction of the files' pages in the page cache (mincore through mmap)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    total = present = 0
    for path in paths:
        size = os.path.getsize(path)
        with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
            pages = (size + page - 1) // page
            vec = np.zeros(pages, np.uint8)
            view = np.frombuffer(m, np.uint8)
            ok = libc.mincore(ctypes.c_void_p(view.ctypes.data), ctypes.c_size_t(size),
                              ctypes.c_void_p(vec.ctypes.data)) == 0
            del view
            if ok:
                present += int((vec & 1).sum())
            total += pages
    return present / total if total else 0.0


def plain_read(paths: list[str]) -> float:
    """Read every byte, a thread per file like the fingerprint, without hashing."""
    def read(path: str) -> None:
        buf = bytearray(fp.CHUNK_BYTES)
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(len(paths), 8, os.cpu_count() or 1)) as pool:
        list(pool.map(read, paths))
    return time.perf_counter() - start


def timed_fingerprint(model: str, cache_dir: str) -> tuple[float, str | None]:
    start = time.perf_counter()
    digest = fp.fingerprint(model, cache_dir)
    return time.perf_counter() - start, digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to build the checkpoint")
    parser.add_argument("--gb", type=float, default=16.0, help="checkpoint size in GB")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    root = tempfile.mkdtemp(prefix="kvbm-fingerprint-bench-", dir=args.dir)
    model, cache = os.path.join(root, "model"), os.path.join(root, "cache")
    os.mkdir(model)
    try:
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        paths = []
        for i in range(args.shards):
            path = os.path.join(model, f"model-{i + 1:05d}-of-{args.shards:05d}.safetensors")
            write_shard(path, int(args.gb * 1e9 / args.shards), rng)
            paths.append(path)
        with open(os.path.join(model, "config.json"), "w") as f:
            json.dump({"architectures": ["LlamaForCausalLM"], "hidden_size": 4096}, f)
        size = sum(os.path.getsize(p) for p in paths)
        print(f"checkpoint: {args.shards} shards, {size / 1e9:.2f} GB in {model} (written in "
              f"{time.perf_counter() - start:.0f} s); hash {fp.HASH_NAME}, {os.cpu_count()} CPUs")
        time.sleep(fp.RACY_NS / 1e9 + 0.1)  # older than the racy window: the digests get cached

        rows = []
        left = drop_cache(paths)
        read_cold = plain_read(paths)
        rows.append(("plain read, cold", read_cold, left))
        left = drop_cache(paths)
        hash_cold, digest = timed_fingerprint(model, os.path.join(cache, "a"))
        rows.append(("full hash, cold (first start, weights not in memory)", hash_cold, left))
        left = resident(paths)
        read_warm = plain_read(paths)
        rows.append(("plain read, page cache", read_warm, left))
        left = resident(paths)
        hash_warm, digest_warm = timed_fingerprint(model, os.path.join(cache, "b"))
        rows.append(("full hash, page cache (first start after vLLM read them)", hash_warm, left))
        cached, digest_cached = timed_fingerprint(model, os.path.join(cache, "b"))
        rows.append(("cached (later starts: stat only)", cached, None))
        assert digest == digest_warm == digest_cached is not None
        print(f"{'':60s} {'seconds':>9s} {'GB/s':>7s}  resident before")
        for name, seconds, res in rows:
            rate = f"{size / seconds / 1e9:7.2f}" if "cached" not in name else "      -"
            print(f"{name:60s} {seconds:9.3f} {rate}  {'' if res is None else f'{100 * res:.0f}%'}")
        print(f"ratio full hash / plain read: cold {hash_cold / read_cold:.2f}, "
              f"page cache {hash_warm / read_warm:.2f}; cached / cold full hash: {cached / hash_cold:.5f}")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
