"""The transfer executor on CPU: the torch copy engine, a real DiskArena file in a
temporary directory, and a third medium kvbm has never heard of (a dict), no vLLM.

Every job moves real bytes between a CPU KV cache laid out like vLLM's CPU
backend, a host arena, the disk file and the dict; the tests compare the
bytes that land with the bytes that left.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from kvbm.core.hashing import HASH_BYTES
from kvbm.storage.disk import DiskArena
from kvbm.storage.host import HostArena
from kvbm.transfer.executor import Blocks, Done, TransferExecutor
from kvbm.transfer.layout import describe_kv_caches
from kvbm.transfer.media import DiskMedium

NUM_BLOCKS = 32
LAYERS = 2
SHAPE = (NUM_BLOCKS, 2, 4, 16)  # the CPU backend's [blocks, heads, tokens, 2 * head dim]


class DictMedium:
    """A tier medium of the tests' own: blocks in a dict keyed by hash. Proves that a new
    medium plugs into the executor (and the chain) without a change to kvbm."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}
        self.closed = False

    def read(self, slots, hashes, rows) -> list[bool]:
        ok = []
        for block_hash, row in zip(hashes, rows):
            data = self.blocks.get(block_hash)
            if data is not None:
                np.asarray(row)[:] = np.frombuffer(data, dtype=np.uint8)
            ok.append(data is not None)
        return ok

    def write(self, slots, hashes, rows) -> list[bool]:
        for block_hash, row in zip(hashes, rows):
            self.blocks[block_hash] = np.asarray(row).tobytes()
        return [True] * len(rows)

    def errors(self) -> dict[str, int]:
        return {}

    def close(self) -> None:
        self.closed = True


def H(i: int) -> bytes:
    return i.to_bytes(HASH_BYTES, "little")


def make_cache(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"layer.{i}": torch.randint(-1000, 1000, SHAPE, generator=gen).to(torch.bfloat16) for i in range(LAYERS)}


def block(cache: dict[str, torch.Tensor], b: int) -> list[torch.Tensor]:
    return [t[b].clone() for t in cache.values()]


def same(cache, b: int, want: list[torch.Tensor]) -> bool:
    return all(torch.equal(t[b], w) for t, w in zip(cache.values(), want))


def wait(ex: TransferExecutor, n: int = 1) -> list[Done]:
    done: list[Done] = []
    for _ in range(2000):
        done += ex.poll()
        if len(done) >= n:
            return sorted(done, key=lambda d: d.job_id)
        time.sleep(0.005)
    raise AssertionError(f"only {done} of {n} jobs finished")


@pytest.fixture
def cache():
    return make_cache()


def executor(cache, tmp_path, *, host: bool = True, disk: bool = True, extra: dict | None = None) -> TransferExecutor:
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    arena = HostArena(8, layout.block_bytes, pin=False) if host else None
    media = {}
    if disk:
        media["G3"] = DiskMedium(DiskArena(str(tmp_path / "g3"), 16, layout.block_bytes, file_tag="test"),
                                 delete_on_close=True)
    media.update(extra or {})
    return TransferExecutor(layout, views, host=arena, media=media)


def test_g1_g2_round_trip_through_the_copy_engine(cache, tmp_path):
    ex = executor(cache, tmp_path, disk=False)
    want = [block(cache, b) for b in (3, 4)]
    ex.submit(1, Blocks("G1", [3, 4]), Blocks("G2", [5, 0]))
    ex.submit(2, Blocks("G2", [5, 0]), Blocks("G1", [20, 21]))
    d1, d2 = wait(ex, 2)
    assert (d1.job_id, d1.ok, d1.moved, d1.nbytes) == (1, True, 2, 2 * ex.block_bytes)
    assert d1.seconds >= 0 and d2.ok and d2.moved == 2
    assert same(cache, 20, want[0]) and same(cache, 21, want[1])
    ex.close()


def test_spill_to_disk_then_load_into_other_blocks(cache, tmp_path):
    ex = executor(cache, tmp_path)
    want = [block(cache, b) for b in (1, 2, 3)]
    ex.submit(1, Blocks("G1", [1, 2, 3]), Blocks("G2", [0, 1, 2]))
    ex.submit(2, Blocks("G2", [0, 1, 2]), Blocks("G3", [7, 8, 9], [H(1), H(2), H(3)]))
    assert [d.ok for d in wait(ex, 2)] == [True, True]
    ex.host.buffer.zero_()  # only the file holds them now
    ex.submit(3, Blocks("G3", [7, 8, 9], [H(1), H(2), H(3)]), Blocks("G1", [10, 11, 12]))
    (done,) = wait(ex)
    assert (done.ok, done.moved, done.bad, done.nbytes) == (True, 3, (), 3 * ex.block_bytes)
    assert all(same(cache, 10 + i, want[i]) for i in range(3))
    ex.close()


def test_disk_only_store_and_in_step_load(cache, tmp_path):
    ex = executor(cache, tmp_path, host=False)
    assert ex.tiers == ["G3"]
    want = block(cache, 5)
    ex.submit(1, Blocks("G1", [5]), Blocks("G3", [0], [H(5)]))
    assert wait(ex)[0].ok
    ex.submit(2, Blocks("G3", [0], [H(5)]), Blocks("G1", [30]), now=True)
    (done,) = ex.poll()  # read on the caller's thread: done at the next poll, no waiting
    assert done.ok and same(cache, 30, want)
    ex.close()


def test_medium_jobs_go_through_the_row_pool_and_give_its_rows_back(cache, tmp_path):
    """G1 <-> a medium moves through pinned pool rows (gather, then write; read, then scatter),
    and every row is free again once the jobs are done."""
    ex = executor(cache, tmp_path, host=False)
    free = len(ex._pool._free)
    want = [block(cache, b) for b in (1, 2, 3)]
    ex.submit(1, Blocks("G1", [1, 2, 3]), Blocks("G3", [0, 1, 2], [H(1), H(2), H(3)]))
    assert 1 in ex._pooled  # not the staging path
    assert wait(ex)[0].ok
    ex.submit(2, Blocks("G3", [0, 1, 2], [H(1), H(2), H(3)]), Blocks("G1", [20, 21, 22]))
    assert wait(ex)[0].moved == 3
    assert all(same(cache, 20 + i, want[i]) for i in range(3))
    assert len(ex._pool._free) == free and not ex._pooled
    ex.close()


def test_a_store_larger_than_the_free_pool_takes_the_staging_path(cache, tmp_path, monkeypatch):
    monkeypatch.setattr("kvbm.transfer.executor.POOL_ROWS", 2)
    ex = executor(cache, tmp_path, host=False)
    want = [block(cache, b) for b in (4, 5, 6)]
    ex.submit(1, Blocks("G1", [4, 5]), Blocks("G3", [0, 1], [H(4), H(5)]))  # takes both pool rows
    ex.submit(2, Blocks("G1", [6]), Blocks("G3", [2], [H(6)]))  # none left: staged, as before the pool
    assert 2 not in ex._pooled
    assert [d.ok for d in wait(ex, 2)] == [True, True]
    ex.submit(3, Blocks("G3", [0, 1, 2], [H(4), H(5), H(6)]), Blocks("G1", [24, 25, 26]))  # 3 > 2 rows: chunks
    assert 3 in ex._loads and not ex._io
    assert wait(ex)[0].moved == 3 and all(same(cache, 24 + i, want[i]) for i in range(3))
    assert len(ex._pool._free) == 2 and not ex._loads
    ex.close()


def setup_chunks(cache, tmp_path, monkeypatch, rows: int = 4, chunk: int = 2) -> TransferExecutor:
    """A disk-only executor whose pool has ``rows`` rows and loads in chunks of ``chunk``, with
    G1 blocks 0..11 stored in G3 slots 0..11."""
    monkeypatch.setattr("kvbm.transfer.executor.POOL_ROWS", rows)
    monkeypatch.setattr("kvbm.transfer.executor.LOAD_CHUNK_ROWS", chunk)
    ex = executor(cache, tmp_path, host=False)
    for lo in range(0, 12, 2):  # stores of two rows at a time, so that none takes the staging path
        ids = [lo, lo + 1]
        ex.submit(lo + 1, Blocks("G1", ids), Blocks("G3", ids, [H(b) for b in ids]))
        assert wait(ex)[0].ok
    return ex


def test_loads_larger_than_the_pool_stream_through_it_in_chunks(cache, tmp_path, monkeypatch):
    """Two loads of 9 and 3 blocks through a pool of 4 rows, in chunks of 2: every block lands,
    in order, and every row is free again; the medium's reads and bytes are counted once."""
    ex = setup_chunks(cache, tmp_path, monkeypatch)
    want = [block(cache, b) for b in range(12)]
    ex.submit(100, Blocks("G3", list(range(9)), [H(b) for b in range(9)]), Blocks("G1", list(range(14, 23))))
    ex.submit(101, Blocks("G3", [9, 10, 11], [H(9), H(10), H(11)]), Blocks("G1", [23, 24, 25]))
    assert len(ex._loads[100].chunks) == 5
    d1, d2 = wait(ex, 2)
    assert (d1.ok, d1.moved, d1.bad, d1.nbytes) == (True, 9, (), 9 * ex.block_bytes)
    assert (d2.ok, d2.moved, d2.nbytes) == (True, 3, 3 * ex.block_bytes)
    assert all(same(cache, 14 + b, want[b]) for b in range(12))
    assert ex._pool.free == 4 and not ex._loads and not ex._scatters
    ex.close()


def test_a_chunked_load_takes_the_union_of_its_reads_as_seconds():
    """Two chunks read at once count once; a wait for rows between reads is not the medium's time."""
    from kvbm.transfer.executor import _PoolLoad

    load = _PoolLoad(1, Blocks("G3", []), Blocks("G1", []), [])
    load.reads = [(10.0, 12.0), (11.0, 13.0), (20.0, 21.5), (20.5, 21.0)]
    assert load.seconds() == 4.5


def test_a_bad_block_in_a_later_chunk_ends_the_prefix_there(cache, tmp_path, monkeypatch):
    """Block 5 of a 9-block load (chunk 3 of 5) does not verify: blocks 0..4 land, nothing from
    block 5 on is scattered, no chunk after it starts, and the pool's rows all come back."""
    ex = setup_chunks(cache, tmp_path, monkeypatch)
    want = [block(cache, b) for b in range(5)]
    untouched = [block(cache, b) for b in range(19, 23)]
    hashes = [H(b) for b in range(9)]
    hashes[5] = H(99)  # slot 5 asked for under another hash: a mismatch
    ex.submit(7, Blocks("G3", list(range(9)), hashes), Blocks("G1", list(range(14, 23))))
    (done,) = wait(ex)
    assert (done.ok, done.moved, done.bad) == (False, 5, (5,))
    assert all(same(cache, 14 + b, want[b]) for b in range(5))
    assert all(same(cache, 19 + i, untouched[i]) for i in range(4))  # nothing scattered from block 5 on
    assert ex._loads == {} and ex._pool.free == 4 and not ex._waiting["G3"]
    assert ex.take_errors() == {"G3": {"mismatch": 1}}
    ex.close()


def test_a_chunk_whose_read_raises_fails_from_there(cache, tmp_path, monkeypatch):
    ex = setup_chunks(cache, tmp_path, monkeypatch)
    medium = ex.media["G3"]
    real = medium.read
    calls = []

    def read(slots, hashes, rows):
        calls.append(list(slots))
        if slots[0] == 4:
            raise OSError("gone")
        return real(slots, hashes, rows)

    monkeypatch.setattr(medium, "read", read)
    ex.submit(3, Blocks("G3", list(range(8)), [H(b) for b in range(8)]), Blocks("G1", list(range(14, 22))))
    (done,) = wait(ex)
    assert (done.ok, done.moved, done.bad) == (False, 4, (4, 5))
    assert ex._pool.free == 4 and not ex._loads
    ex.close()


@pytest.mark.parametrize("shape", [SHAPE, (2, NUM_BLOCKS, 4, 16)])  # CPU backend; FlashAttention's K/V planes
def test_the_single_threaded_engine_copies_what_the_torch_engine_copies(shape):
    """The row pool's engine (``parallel=False``: numpy, an indexed copy per layer for many
    runs) lands exactly the bytes of the torch engine, both ways, for scattered blocks,
    consecutive ones, scattered slots and a batch that repeats a block."""
    from kvbm.transfer.engine import TorchCopyEngine

    gen = torch.Generator().manual_seed(3)
    base = {f"layer.{i}": torch.randint(-1000, 1000, shape, generator=gen).to(torch.bfloat16) for i in range(LAYERS)}
    rng = np.random.default_rng(0)
    scattered = rng.permutation(NUM_BLOCKS)[:12].tolist()
    jobs = [  # (G1 blocks, host slots)
        (scattered, list(range(2, 14))),
        (list(range(5, 17)), list(range(0, 12))),
        (scattered, rng.permutation(16)[:12].tolist()),
        ([1, 3, 5, 7, 9, 11, 13, 15, 17, 3], list(range(10))),
    ]
    out = []
    for parallel in (True, False):
        cache = {k: v.clone() for k, v in base.items()}
        layout, views = describe_kv_caches(cache, NUM_BLOCKS)
        arena = HostArena(16, layout.block_bytes, pin=False)
        engine = TorchCopyEngine(layout, views, arena, parallel=parallel)
        for key, (blocks, slots) in enumerate(jobs):
            engine.store(key, blocks, slots)
            engine.load(key, slots, list(reversed(blocks)))
        assert all(c.ok for c in engine.poll())
        out.append((arena.buffer.clone(), [t.clone() for t in cache.values()]))
    assert torch.equal(out[0][0], out[1][0])
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1]))


def test_a_bad_block_ends_the_landed_prefix_and_is_named(cache, tmp_path):
    ex = executor(cache, tmp_path, host=False)
    ex.submit(1, Blocks("G1", [1, 2, 3]), Blocks("G3", [0, 1, 2], [H(1), H(2), H(3)]))
    assert wait(ex)[0].ok
    before = block(cache, 12)
    want = block(cache, 1)
    # Slot 1 is asked for under another hash: it does not verify, so block 2 and after are not used.
    ex.submit(2, Blocks("G3", [0, 1, 2], [H(1), H(99), H(3)]), Blocks("G1", [10, 11, 12]))
    (done,) = wait(ex)
    assert (done.ok, done.moved, done.bad) == (False, 1, (1,))
    assert same(cache, 10, want) and same(cache, 12, before)  # the prefix landed, nothing after it
    assert ex.take_errors() == {"G3": {"mismatch": 1}}
    assert ex.take_errors() == {}
    ex.close()


def test_a_third_medium_needs_no_change(cache, tmp_path):
    """G2 -> G3 -> G9 (a dict) and back from G9 into G1: the executor only learns a name."""
    g9 = DictMedium()
    ex = executor(cache, tmp_path, extra={"G9": g9})
    want = block(cache, 6)
    ex.submit(1, Blocks("G1", [6]), Blocks("G2", [3]))
    ex.submit(2, Blocks("G2", [3]), Blocks("G3", [4], [H(6)]))
    assert [d.ok for d in wait(ex, 2)] == [True, True]
    ex.submit(3, Blocks("G3", [4], [H(6)]), Blocks("G9", [0], [H(6)]))
    assert wait(ex)[0].ok and H(6) in g9.blocks
    ex.submit(4, Blocks("G9", [0], [H(6)]), Blocks("G1", [25]))
    ex.submit(5, Blocks("G9", [0], [H(7)]), Blocks("G1", [26]))  # never stored: a miss
    d4, d5 = wait(ex, 2)
    assert d4.ok and same(cache, 25, want)
    assert (d5.ok, d5.moved, d5.bad) == (False, 0, (0,))
    ex.close()
    assert g9.closed


def test_a_spill_whose_source_fails_is_not_written(cache, tmp_path):
    g9 = DictMedium()
    ex = executor(cache, tmp_path, extra={"G9": g9})
    ex.submit(1, Blocks("G3", [2], [H(2)]), Blocks("G9", [0], [H(2)]))  # G3 slot 2 holds nothing
    (done,) = wait(ex)
    assert (done.ok, done.bad) == (False, (2,)) and not g9.blocks
    ex.close()


def test_a_medium_that_raises_fails_its_job_only(cache, tmp_path):
    class Broken(DictMedium):
        def write(self, slots, hashes, rows):
            raise OSError("gone")

    ex = executor(cache, tmp_path, disk=False, extra={"G9": Broken()})
    ex.submit(1, Blocks("G1", [1]), Blocks("G2", [0]))
    ex.submit(2, Blocks("G2", [0]), Blocks("G9", [0], [H(1)]))
    assert [d.ok for d in wait(ex, 2)] == [True, False]
    ex.close()


def test_caller_bugs_raise(cache, tmp_path):
    ex = executor(cache, tmp_path, disk=False)
    with pytest.raises(ValueError, match="no tier 'G3'"):
        ex.submit(1, Blocks("G1", [1]), Blocks("G3", [0]))
    with pytest.raises(ValueError, match="destination"):
        ex.submit(2, Blocks("G1", [1, 2]), Blocks("G2", [0]))
    with pytest.raises(ValueError, match="itself"):
        ex.submit(3, Blocks("G2", [1]), Blocks("G2", [0]))
    ex2 = executor(cache, tmp_path / "2")
    with pytest.raises(ValueError, match="hashes"):
        ex2.submit(1, Blocks("G3", [1]), Blocks("G1", [0]))
    ex2.close()
    ex.submit(4, Blocks("G1", [NUM_BLOCKS]), Blocks("G2", [0]))  # out of range: a failed copy, not a crash
    (done,) = wait(ex)
    assert (done.job_id, done.ok, done.moved, done.nbytes) == (4, False, 0, 0)
    ex.close()


def test_the_shared_tier_through_redis(cache, tmp_path, redis_server):
    """G2 -> G4 (a real redis-server) and back into G1: RemoteMedium keys blocks by hash."""
    from kvbm.storage.remote import RemoteStore
    from kvbm.transfer.media import RemoteMedium

    store = RemoteStore.open(redis_server.url, "executor-test", timeout_s=2.0)
    ex = executor(cache, tmp_path, disk=False, extra={"G4": RemoteMedium(store)})
    want = [block(cache, b) for b in (2, 3)]
    ex.submit(1, Blocks("G1", [2, 3]), Blocks("G2", [0, 1]))
    ex.submit(2, Blocks("G2", [0, 1]), Blocks("G4", [0, 0], [H(2), H(3)]))
    assert [d.ok for d in wait(ex, 2)] == [True, True]
    ex.submit(3, Blocks("G4", [0, 0, 0], [H(2), H(3), H(4)]), Blocks("G1", [20, 21, 22]))
    (done,) = wait(ex)
    assert (done.ok, done.moved, done.bad) == (False, 2, (0,))  # H(4) was never stored: a miss
    assert same(cache, 20, want[0]) and same(cache, 21, want[1])
    assert ex.take_errors() == {}
    ex.close()
