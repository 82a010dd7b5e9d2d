"""The transfer executor on a CUDA GPU: the CUDA copy engine between a GPU KV cache and
pinned host rows (G2), staging rows between the GPU and a real disk file (G3), and a
medium of the tests' own (G9), byte for byte. The same jobs as tests/test_executor.py
(which runs them on CPU in CI); here the GPU side is asynchronous, so every job is
collected through ``poll``. Skipped without a GPU.
"""

from __future__ import annotations

import time

import pytest
import torch

from kvbm.storage.disk import DiskArena
from kvbm.storage.host import HostArena
from kvbm.transfer.executor import Blocks, TransferExecutor
from kvbm.transfer.layout import describe_kv_caches
from kvbm.transfer.media import DiskMedium
from tests.test_executor import DictMedium, H, wait

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NUM_BLOCKS = 64
LAYERS = 3
#: FlashAttention's [2, blocks, block size, KV heads, head dim] and the CPU backend's shape.
SHAPES = {"flash": (2, NUM_BLOCKS, 16, 8, 128), "blocks-first": (NUM_BLOCKS, 2, 8, 16, 128)}


def make_cache(shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    return {f"layer.{i}": torch.randn(shape, generator=gen, device="cuda").to(torch.bfloat16) for i in range(LAYERS)}


def blocks_of(cache: dict[str, torch.Tensor], dim: int, ids: list[int]) -> list[torch.Tensor]:
    return [t.index_select(dim, torch.tensor(ids, device="cuda")).cpu() for t in cache.values()]


@pytest.mark.parametrize("kind", list(SHAPES))
def test_every_move_of_the_chain_on_the_gpu(kind: str, tmp_path) -> None:
    shape = SHAPES[kind]
    dim = 1 if kind == "flash" else 0
    cache = make_cache(shape)
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    g9 = DictMedium()
    media = {"G3": DiskMedium(DiskArena(str(tmp_path / "g3"), 16, layout.block_bytes, file_tag="gpu"),
                              delete_on_close=True), "G9": g9}
    ex = TransferExecutor(layout, views, host=HostArena(16, layout.block_bytes, pin=True), media=media)
    try:
        want = blocks_of(cache, dim, [1, 2, 3, 4])
        # G1 -> G2 (CUDA engine), G2 -> G3 (the file), G3 -> G9 (the dict)
        ex.submit(1, Blocks("G1", [1, 2, 3, 4]), Blocks("G2", [0, 1, 2, 3]))
        assert wait(ex)[0].ok
        ex.submit(2, Blocks("G2", [0, 1, 2, 3]), Blocks("G3", [5, 6, 7, 8], [H(i) for i in (1, 2, 3, 4)]))
        assert wait(ex)[0].ok
        ex.submit(3, Blocks("G3", [5, 6, 7, 8], [H(i) for i in (1, 2, 3, 4)]),
                  Blocks("G9", [0] * 4, [H(i) for i in (1, 2, 3, 4)]))
        assert wait(ex)[0].ok and len(g9.blocks) == 4
        # back into other GPU blocks from each tier: G2 (engine), G3 (staged), G9 (staged), G3 in-step
        ex.submit(4, Blocks("G2", [0, 1, 2, 3]), Blocks("G1", [10, 11, 12, 13]))
        ex.submit(5, Blocks("G3", [5, 6, 7, 8], [H(i) for i in (1, 2, 3, 4)]), Blocks("G1", [20, 21, 22, 23]))
        ex.submit(6, Blocks("G9", [0] * 4, [H(i) for i in (1, 2, 3, 4)]), Blocks("G1", [30, 31, 32, 33]))
        ex.submit(7, Blocks("G3", [5, 6, 7, 8], [H(i) for i in (1, 2, 3, 4)]), Blocks("G1", [40, 41, 42, 43]),
                  now=True)
        done = wait(ex, 4)
        assert [(d.ok, d.moved) for d in done] == [(True, 4)] * 4
        torch.cuda.synchronize()
        for first in (10, 20, 30, 40):
            got = blocks_of(cache, dim, list(range(first, first + 4)))
            assert all(torch.equal(g, w) for g, w in zip(got, want)), f"blocks {first}.. differ"
        # a block that fails verification ends the landed prefix; nothing after it is written
        before = blocks_of(cache, dim, [51, 52])
        ex.submit(8, Blocks("G3", [5, 6, 7], [H(1), H(99), H(3)]), Blocks("G1", [50, 51, 52]))
        (bad,) = wait(ex)
        assert (bad.ok, bad.moved, bad.bad) == (False, 1, (6,))
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(blocks_of(cache, dim, [51, 52]), before))
    finally:
        ex.close()


@pytest.mark.parametrize("kind", list(SHAPES))
def test_loads_stream_through_a_small_pool_in_chunks_on_the_gpu(kind: str, tmp_path, monkeypatch) -> None:
    """Loads larger than the row pool (4 rows, chunks of 2): each chunk's scatter is
    asynchronous on the pool's stream and gives its rows back only when its event says so; every
    block lands, a bad block ends the prefix, and every row is free again."""
    monkeypatch.setattr("kvbm.transfer.executor.POOL_ROWS", 4)
    monkeypatch.setattr("kvbm.transfer.executor.LOAD_CHUNK_ROWS", 2)
    dim = 1 if kind == "flash" else 0
    cache = make_cache(SHAPES[kind])
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    g3 = DiskMedium(DiskArena(str(tmp_path / "g3"), 16, layout.block_bytes, file_tag="gpu"), delete_on_close=True)
    ex = TransferExecutor(layout, views, media={"G3": g3})
    try:
        ids = list(range(12))
        for lo in range(0, 12, 2):
            pair = [lo, lo + 1]
            ex.submit(lo + 1, Blocks("G1", pair), Blocks("G3", pair, [H(b) for b in pair]))
            assert wait(ex)[0].ok
        want = blocks_of(cache, dim, ids)
        ex.submit(100, Blocks("G3", ids[:9], [H(b) for b in ids[:9]]), Blocks("G1", list(range(20, 29))))
        ex.submit(101, Blocks("G3", ids[9:], [H(b) for b in ids[9:]]), Blocks("G1", [29, 30, 31]))
        assert [(d.ok, d.moved) for d in wait(ex, 2)] == [(True, 9), (True, 3)]
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(blocks_of(cache, dim, list(range(20, 32))), want))
        before = blocks_of(cache, dim, list(range(45, 49)))
        hashes = [H(b) for b in ids[:8]]
        hashes[5] = H(99)
        ex.submit(102, Blocks("G3", ids[:8], hashes), Blocks("G1", list(range(40, 48))))
        (bad,) = wait(ex)
        assert (bad.ok, bad.moved, bad.bad) == (False, 5, (5,))
        torch.cuda.synchronize()
        landed = blocks_of(cache, dim, list(range(40, 45)))
        assert all(torch.equal(g, w) for g, w in zip(landed, blocks_of(cache, dim, ids[:5])))
        assert all(torch.equal(g, w) for g, w in zip(blocks_of(cache, dim, list(range(45, 49))), before))
        assert ex._pool.free == 4 and not ex._loads
    finally:
        ex.close()


@pytest.mark.parametrize("kind", list(SHAPES))
def test_layer_wise_in_step_load_through_the_plan_runner(kind: str, tmp_path) -> None:
    """A step's in-step load from G2 and G3 landing layer by layer, each layer waited for on the
    forward pass's stream (not the default one), then the step's store: the bytes of every layer."""
    from kvbm.core.plan import LoadOp, LoadPart, StepPlan, StoreBatch
    from kvbm.transfer.runner import PlanRunner

    dim = 1 if kind == "flash" else 0
    cache = make_cache(SHAPES[kind])
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    g3 = DiskMedium(DiskArena(str(tmp_path / "g3"), 16, layout.block_bytes, file_tag="gpu"), delete_on_close=True)
    ex = TransferExecutor(layout, views, host=HostArena(16, layout.block_bytes, pin=True), media={"G3": g3})
    runner = PlanRunner(ex, {"G2": 16, "G3": 16})
    try:
        want = blocks_of(cache, dim, [1, 2, 3, 4])
        ex.submit(1, Blocks("G1", [1, 2, 3]), Blocks("G2", [5, 6, 7]))
        ex.submit(2, Blocks("G1", [4]), Blocks("G3", [0], [H(4)]))
        assert all(d.ok for d in wait(ex, 2))
        step = StepPlan(loads=[LoadOp("r", [20, 21, 22, 23], [LoadPart("G2", [5, 6, 7]),
                                                               LoadPart("G3", [0], [H(4)])], sync=True)],
                        store=StoreBatch(9, "G2", [20, 21], [10, 11]))
        forward = torch.cuda.Stream()
        reads = []
        with torch.cuda.stream(forward):
            runner.start_step(step, layer_order=[2, 0, 1])
            assert runner.layered
            idx = torch.tensor([20, 21, 22, 23], device="cuda")
            for layer in (2, 0, 1):
                runner.wait_layer(layer)
                reads.append((layer, views[layer].index_select(1, idx)))  # this layer's "attention"
            runner.store(step)
        torch.cuda.synchronize()
        got = blocks_of(cache, dim, [20, 21, 22, 23])
        assert all(torch.equal(g, w) for g, w in zip(got, want))
        for layer, read in reads:
            assert torch.equal(read.cpu(), views[layer].index_select(1, idx).cpu()), f"layer {layer} read early"
        reports = []
        for _ in range(200):
            runner.results()
            reports.append(runner.take_report())
            if any(r is not None and r.stored for r in reports):
                break
            time.sleep(0.01)
        assert [r.stored for r in reports if r is not None and r.stored] == [{9: 1}]
        assert not any(r.failed_loads or r.failed_batches for r in reports if r is not None)
        rows = ex.host.buffer[:, : layout.block_bytes]
        assert torch.equal(rows[10], rows[5]) and torch.equal(rows[11], rows[6])
    finally:
        runner.close()


def test_a_fenced_step_writes_a_stored_block_only_after_the_store_read_it(tmp_path) -> None:
    """A windowed group's stored block that vLLM hands to another request in the next step
    (``StepPlan.fence_stores``): that step's forward pass, on its own stream, overwrites the
    block; the host row must still hold what the store was asked to copy."""
    from kvbm.core.plan import StepPlan, StoreBatch
    from kvbm.transfer.runner import PlanRunner

    dim = 1
    cache = make_cache(SHAPES["flash"])
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    ex = TransferExecutor(layout, views, host=HostArena(32, layout.block_bytes, pin=True))
    runner = PlanRunner(ex, {"G2": 32})
    try:
        blocks = list(range(32, 64))
        want = blocks_of(cache, dim, blocks)
        forward = torch.cuda.Stream()
        first = StepPlan(store=StoreBatch(1, "G2", blocks, list(range(32))))
        with torch.cuda.stream(forward):
            runner.start_step(StepPlan())
            runner.store(first)
            runner.start_step(StepPlan(fence_stores=True))
            for view in views:  # the next step's "attention" writes every stored block
                view.index_fill_(1, torch.tensor(blocks, device="cuda"), 0)
        torch.cuda.synchronize()
        for _ in range(200):
            runner.results()
            report = runner.take_report()
            if report is not None and report.stored:
                break
            time.sleep(0.01)
        assert report is not None and report.stored == {1: 1}
        ex.submit(10_000, Blocks("G2", list(range(32))), Blocks("G1", blocks))  # load the rows back
        assert wait(ex)[0].ok
        torch.cuda.synchronize()
        assert all(torch.equal(g, w) for g, w in zip(blocks_of(cache, dim, blocks), want))
    finally:
        runner.close()
