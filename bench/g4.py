"""G4 store/load throughput against raw pipelined SET/GET, and the cost of a 32K-token lookup.

Side by side in one run, against the same Redis (a fresh local redis-server on
loopback unless ``--url`` is given), with the same batch sizes:

* store: ``RemoteStore.write_blocks`` (header + tag, header and payload sent
  as they are) against raw pipelined ``SET`` of the same payload bytes, without
  a fleet secret (CRC-32) and with one (HMAC-SHA256 over every value);
* load: ``RemoteStore.read_blocks`` (GETRANGE, verify, copy into the
  destination) against raw pipelined ``GET`` of the same keys' bytes (no
  verify, no copy), without and with the secret;
* the MAC alone, one thread, over one block: keyed BLAKE3 (what kvbm signs
  with), HMAC-SHA256 and keyed BLAKE2b (the stdlib's candidates).
* lookup: ``contains_prefix`` of a 32K-token prompt (block size 16: 2048
  blocks, all present: the worst case) against one PING and a raw pipelined
  ``EXISTS`` of the same 2048 keys.

Run: ``python bench/g4.py [--block-kib 512] [--total-mib 128] [--reps 5]``.
Needs redis-server and the redis client. Ratios >= 0.9 are the goal.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3
import numpy as np
import redis

from kvbm.storage.remote import RemoteStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: tests.redis_procs
from tests.redis_procs import RedisServer  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_pipeline(client: redis.Redis, commands: list[tuple], batch_bytes: int, sizes: list[int]) -> list:
    out, pipe, nbytes = [], client.pipeline(transaction=False), 0
    for args, size in zip(commands, sizes):
        if len(pipe) and nbytes + size > batch_bytes:
            out += pipe.execute()
            nbytes = 0
        pipe.execute_command(*args)
        nbytes += size
    return out + pipe.execute()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", help="an existing Redis (default: start one on loopback)")
    parser.add_argument("--block-kib", type=int, default=512, help="bytes per block (KiB)")
    parser.add_argument("--total-mib", type=int, default=128, help="bytes moved per repetition (MiB)")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    server = None
    if args.url is None:
        server = RedisServer(tempfile.mkdtemp(prefix="kvbm-g4-bench-"), extra=["--maxmemory-policy", "allkeys-lru"])
        args.url = server.url
    try:
        run(args)
    finally:
        if server is not None:
            server.kill()


def run(args: argparse.Namespace) -> None:
    size = args.block_kib << 10
    n = max(1, (args.total_mib << 20) // size)
    rng = np.random.default_rng(0)
    hashes = [rng.bytes(16) for _ in range(n)]
    data = [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]
    payloads = [d.tobytes() for d in data]
    dests = [np.empty(size, np.uint8) for _ in range(n)]
    store = RemoteStore.open(args.url, "bench-model", timeout_s=30.0)
    keyed = RemoteStore.open(args.url, "bench-model", timeout_s=30.0, secret=b"bench-secret-0123456789abcdef")
    client = redis.Redis.from_url(str(args.url).split(",")[0], socket_timeout=30.0)
    raw_keys = [b"bench-raw:" + h.hex().encode() for h in hashes]
    batch = store._batch_bytes
    sizes = [size] * n
    gb = n * size / 1e9
    results: dict[str, list[float]] = {k: [] for k in ("raw_set", "g4_store", "mac_store", "raw_get", "g4_load",
                                                        "mac_load")}
    for _ in range(args.reps):  # interleaved, so a busy moment hits every variant alike
        results["raw_set"].append(gb / timed(lambda: raw_pipeline(
            client, [("SET", k, p) for k, p in zip(raw_keys, payloads)], batch, sizes)))
        results["g4_store"].append(gb / timed(lambda: store.write_blocks(list(zip(hashes, data)))))
        results["mac_store"].append(gb / timed(lambda: keyed.write_blocks(list(zip(hashes, data)))))
        results["raw_get"].append(gb / timed(lambda: raw_pipeline(
            client, [("GET", k) for k in raw_keys], batch, sizes)))
        results["g4_load"].append(gb / timed(lambda: _load(store, hashes, dests)))
        results["mac_load"].append(gb / timed(lambda: _load(keyed, hashes, dests)))
    assert all((d == s).all() for d, s in zip(dests, data)), "G4 loaded wrong bytes"
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"redis {client.info('server')['redis_version']}, {n} blocks x {args.block_kib} KiB = {gb:.3f} GB per "
          f"rep, median of {args.reps}, batches of {batch >> 20} MiB, hiredis: {_hiredis()}, {os.cpu_count()} CPUs")
    for op, raw_name, raw_key in (("store", "raw SET", "raw_set"), ("load", "raw GET", "raw_get")):
        print(f"{op + ':':6} G4 {med['g4_' + op]:.2f} GB/s (ratio {med['g4_' + op] / med[raw_key]:.2f}), "
              f"G4 with secret {med['mac_' + op]:.2f} GB/s (ratio {med['mac_' + op] / med[raw_key]:.2f}), "
              f"{raw_name} {med[raw_key]:.2f} GB/s")
    key = os.urandom(32)
    one = data[0]
    mac_rates = {name: size * 20 / timed(lambda fn=fn: [fn() for _ in range(20)]) / 1e9 for name, fn in (
        ("keyed BLAKE3", lambda: blake3.blake3(one, key=key).digest(16)),
        ("HMAC-SHA256", lambda: hmac.new(key, one, "sha256").digest()),
        ("keyed BLAKE2b", lambda: hashlib.blake2b(one, key=key, digest_size=16).digest()))}
    print("MAC alone, one thread, one block: " + ", ".join(f"{k} {v:.2f} GB/s" for k, v in mac_rates.items()))

    # lookup of a 32K-token prompt, block size 16, every block present (the whole list is checked)
    blocks = 32 * 1024 // 16
    tiny = np.zeros(16, np.uint8)
    lookup_hashes = [os.urandom(16) for _ in range(blocks)]
    store.write_blocks([(h, tiny) for h in lookup_hashes])
    keys = [("EXISTS", store.key(h)) for h in lookup_hashes]
    ping, g4, raw = [], [], []
    for _ in range(50):
        ping.append(timed(client.ping))
        g4.append(timed(lambda: store.contains_prefix(lookup_hashes)))
        raw.append(timed(lambda: raw_pipeline(client, keys, 1 << 40, [0] * blocks)))
    assert store.contains_prefix(lookup_hashes) == blocks
    print(f"lookup of a 32K-token prompt ({blocks} blocks, all present): G4 {statistics.median(g4) * 1e3:.2f} ms, "
          f"raw pipelined EXISTS {statistics.median(raw) * 1e3:.2f} ms, one PING {statistics.median(ping) * 1e3:.3f} "
          f"ms (medians of 50); round trips per lookup: {_round_trips(store, lookup_hashes)}")
    client.delete(*raw_keys)
    store.close()
    keyed.close()


def _load(store: RemoteStore, hashes: list[bytes], dests: list[np.ndarray]) -> None:
    ok = store.read_blocks(list(zip(hashes, dests)))
    assert all(ok), f"{ok.count(False)} blocks missing: is Redis's maxmemory too small for the bench?"


def _round_trips(store: RemoteStore, hashes: list[bytes]) -> int:
    before = store.stats()["round_trips"]
    store.contains_prefix(hashes)
    return store.stats()["round_trips"] - before


def _hiredis() -> bool:
    try:
        import hiredis  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    main()
