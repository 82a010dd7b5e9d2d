"""The CUDA data plane: CudaCopyEngine, pinned allocation and the engine factory.

GPU tests (``-m gpu``) skip without CUDA. They build fake vLLM-shaped KV caches
on the GPU for every supported layout and dtype, describe them with
``describe_kv_caches`` and check, byte for byte, that

* a store writes exactly what TorchCopyEngine writes (on CPU copies) into a
  host arena that starts from the same random bytes (so stray writes show),
* a load into different block ids restores the blocks and touches nothing else,
* copies are ordered after the compute stream's earlier work, and never block,

for both engine modes (staged DMA, zero-copy kernel), several staging, grid
and chunk sizes, both kernel backends (Triton, CuPy) and both DMA APIs; and
that layer-wise loads land byte for byte, each layer waited for on another
stream (the forward pass's) while the load stream is held back.

The CPU tests check that the modules import without Triton/CuPy or a GPU and
that the factory picks TorchCopyEngine for CPU tensors.
"""

from __future__ import annotations

import gc
import random
import subprocess
import sys
import time
import warnings

import pytest
import torch

from kvbm.storage.host import HostArena
from kvbm.transfer.engine import Completion, TorchCopyEngine
from kvbm.transfer.layout import LayoutError, describe_kv_caches

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")

NUM_BLOCKS = 96
NUM_LAYERS = 3
TOKENS = 16
HEADS = 4
HEAD_DIM = 64

LAYOUTS = ["flash", "flashinfer", "mla", "cpu", "v2"]
DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]


def _shape(kind: str, num_blocks: int) -> tuple[int, ...]:
    return {
        "flash": (2, num_blocks, TOKENS, HEADS, HEAD_DIM),  # FlashAttention
        "flashinfer": (num_blocks, 2, TOKENS, HEADS, HEAD_DIM),  # FlashInfer
        "mla": (num_blocks, TOKENS, 576),  # MLA: latent 512 + rope 64
        "cpu": (num_blocks, HEADS, TOKENS, 2 * HEAD_DIM),  # CPU backend
        # vLLM 0.26+'s GPU model runner: logically [B, H, N, 2D], stored [B, N, H, 2D] (see PERMUTED)
        "v2": (num_blocks, TOKENS, HEADS, 2 * HEAD_DIM),
        "odd": (num_blocks, 3, 5),  # no 16-byte alignment: exercises the narrow path
    }[kind]


#: Layouts whose tensors vLLM hands over as a permuted view of the stored order.
PERMUTED = {"v2": (0, 2, 1, 3)}


def _random_bytes_(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    raw = t.view(torch.uint8) if t.dim() else t
    raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
    return t


def _make_caches(kind: str, dtype: torch.dtype, device: str, seed: int, shared: bool = False,
                 num_blocks: int = NUM_BLOCKS) -> dict[str, torch.Tensor]:
    """Per-layer caches filled with random bytes (fp8/bf16 NaN patterns included: we compare bytes)."""
    gen = torch.Generator().manual_seed(seed)
    shape = _shape(kind, num_blocks)
    numel = 1
    for d in shape:
        numel *= d
    caches: dict[str, torch.Tensor] = {}
    perm = PERMUTED.get(kind)
    if shared:  # vLLM-style: one allocation, each layer a view at an offset
        pad = 64  # elements between layers, so offsets are not just multiples of the layer size
        flat = torch.empty(NUM_LAYERS * (numel + pad), dtype=dtype)
        _random_bytes_(flat, gen)
        flat = flat.to(device)
        for layer in range(NUM_LAYERS):
            start = layer * (numel + pad) + pad
            t = flat[start : start + numel].view(shape)
            caches[f"model.layers.{layer}.attn"] = t.permute(perm) if perm else t
        return caches
    for layer in range(NUM_LAYERS):
        t = _random_bytes_(torch.empty(shape, dtype=dtype), gen).to(device)
        caches[f"model.layers.{layer}.attn"] = t.permute(perm) if perm else t
    return caches


def _arena(buffer: torch.Tensor) -> HostArena:
    """A HostArena around a given [num_slots, block_bytes] buffer (no allocation)."""
    arena = HostArena.__new__(HostArena)
    arena.num_slots, arena.block_bytes = buffer.shape
    arena.pinned = buffer.is_pinned() if HAS_CUDA else False
    arena.buffer = buffer
    return arena


def _bytes(caches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each layer's storage bytes, in memory order (a permuted view is read as stored)."""
    out = {}
    for k, v in caches.items():
        order = sorted(range(v.dim()), key=lambda d: -v.stride(d))
        out[k] = v.permute(order).reshape(-1).view(torch.uint8).cpu()
    return out


def _wait(engine, expected: int, timeout: float = 30.0) -> list[Completion]:
    done: list[Completion] = []
    deadline = time.monotonic() + timeout
    while len(done) < expected:
        done += engine.poll()
        if time.monotonic() > deadline:
            raise AssertionError(f"only {len(done)} of {expected} completions after {timeout} s")
        time.sleep(0.001)
    return done


def _round_trip(kind: str, dtype: torch.dtype, *, shared: bool = False, seed: int = 0, batches: int = 1,
                **engine_kw) -> None:
    from kvbm.storage.host import make_host_arena_buffer
    from kvbm.transfer.factory import make_copy_engine

    rng = random.Random(seed)
    gpu_caches = _make_caches(kind, dtype, "cuda", seed, shared=shared)
    cpu_caches = {k: v.cpu().clone() for k, v in gpu_caches.items()}
    layout, gviews = describe_kv_caches(gpu_caches, NUM_BLOCKS)
    clayout, cviews = describe_kv_caches(cpu_caches, NUM_BLOCKS)
    assert layout == clayout
    num_slots = 40

    gbuf = make_host_arena_buffer(num_slots, layout.block_bytes, want_pinned=True)
    assert gbuf.is_pinned()
    _random_bytes_(gbuf, torch.Generator().manual_seed(seed + 1))  # poison: stray writes would show
    cbuf = gbuf.clone()
    engine = make_copy_engine(layout, gviews, _arena(gbuf), **engine_kw)
    ref = TorchCopyEngine(clayout, cviews, _arena(cbuf))
    assert type(engine).__name__ == "CudaCopyEngine"

    for batch in range(batches):
        # G1 -> G2: random, non-contiguous, unsorted blocks into random slots
        # (every other batch: a run of consecutive slots, which DMA merges).
        src_blocks = rng.sample(range(NUM_BLOCKS), 33)
        if batch % 2:
            first = rng.randrange(num_slots - 33)
            slots = list(range(first, first + 33))
            rng.shuffle(slots)
        else:
            slots = rng.sample(range(num_slots), 33)
        engine.store(batch, src_blocks, slots)
        ref.store(batch, src_blocks, slots)
        assert _wait(engine, 1) == [Completion("store", batch, True)]
        assert torch.equal(gbuf, cbuf), f"host arena differs from TorchCopyEngine ({kind}, {dtype})"

        # G2 -> G1 into DIFFERENT block ids; nothing else on the GPU may change.
        free = [b for b in range(NUM_BLOCKS) if b not in src_blocks]
        dst_blocks = rng.sample(free, 33)
        engine.load(f"req-{batch}", slots, dst_blocks)
        ref.load(f"req-{batch}", slots, dst_blocks)
        assert _wait(engine, 1) == [Completion("load", f"req-{batch}", True)]
        got, want = _bytes(gpu_caches), _bytes(cpu_caches)
        for name in got:
            assert torch.equal(got[name], want[name]), f"layer {name} differs after load ({kind}, {dtype})"
        # and the loaded blocks equal the stored ones, layer by layer
        for view in gviews:
            assert torch.equal(view[:, dst_blocks], view[:, src_blocks])
    engine.drain()


# ---------------------------------------------------------------- GPU tests


MODES = [
    pytest.param({"store_mode": "dma", "load_mode": "dma"}, id="dma"),
    pytest.param({"store_mode": "kernel", "load_mode": "kernel"}, id="kernel"),
]


def _small_staging(kind: str, dtype: torch.dtype) -> int:
    """Staging of 5 rows: a 33-block batch takes 7 chunks, reusing both buffers."""
    layout, _ = describe_kv_caches(_make_caches(kind, dtype, "cpu", 0, num_blocks=3), 3)
    return 5 * layout.block_bytes


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", LAYOUTS)
def test_round_trip_every_layout_and_dtype(kind: str, dtype: torch.dtype, mode: dict) -> None:
    _round_trip(kind, dtype, **mode)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", LAYOUTS)
def test_round_trip_dma_in_many_chunks(kind: str) -> None:
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        _round_trip(kind, dtype, batches=3, staging_bytes=_small_staging(kind, dtype), seed=9)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["flash", "mla"])
def test_round_trip_dma_with_plain_memcpy(kind: str) -> None:
    staging = _small_staging(kind, torch.bfloat16)
    _round_trip(kind, torch.bfloat16, batches=2, dma_api="memcpy", staging_bytes=staging)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["flash", "mla", "odd"])
def test_round_trip_shared_allocation_and_odd_alignment(kind: str, mode: dict) -> None:
    # Layers as views into one buffer at unaligned offsets, and a layout with
    # 15-byte runs: the engine must fall back to narrower accesses, still exact.
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        _round_trip(kind, dtype, shared=True, seed=3, batches=2, **mode)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("ctas,chunk_bytes", [(1, 16384), (7, 4096), (300, 8192), (132, 65536)])
def test_round_trip_grid_and_chunk_variants(ctas: int, chunk_bytes: int) -> None:
    for kind in ("flash", "mla"):  # mla runs are not a multiple of the chunk: masked path
        _round_trip(kind, torch.bfloat16, store_mode="kernel", load_mode="kernel", ctas=ctas,
                    chunk_bytes=chunk_bytes, seed=ctas)
        _round_trip(kind, torch.bfloat16, staging_ctas=ctas, chunk_bytes=chunk_bytes, seed=ctas,
                    staging_bytes=_small_staging(kind, torch.bfloat16))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_round_trip_cupy_backend(kind: str, mode: dict) -> None:
    pytest.importorskip("cupy")
    _round_trip(kind, torch.bfloat16, backend="cupy", seed=5, batches=2, **mode)


def _engine(kind: str = "flash", dtype: torch.dtype = torch.bfloat16, num_slots: int = 16, **kw):
    from kvbm.storage.host import make_host_arena_buffer
    from kvbm.transfer.factory import make_copy_engine

    caches = _make_caches(kind, dtype, "cuda", seed=11)
    layout, views = describe_kv_caches(caches, NUM_BLOCKS)
    buf = make_host_arena_buffer(num_slots, layout.block_bytes, want_pinned=True)
    return make_copy_engine(layout, views, _arena(buf), **kw), views, buf


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
def test_store_waits_for_compute_stream_and_does_not_block(mode: dict) -> None:
    engine, views, buf = _engine(**mode)
    blocks, slots = [5, 61, 2, 40], [3, 0, 9, 4]
    compute = torch.cuda.current_stream()
    for view in views:  # load the fill kernel now: CUDA's lazy module loading may synchronize
        view[:, 0] = 0
    torch.cuda.synchronize()
    start, slept = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(compute)
    torch.cuda._sleep(400_000_000)  # ~0.2 s of GPU time queued ahead of the writes
    slept.record(compute)
    for view in views:  # the "forward pass": writes the blocks after the sleep
        for b in blocks:  # plain fills: no index upload on the sleeping stream
            view[:, b] = 0xA5
    t0 = time.perf_counter()
    engine.store(1, blocks, slots)
    submit_s = time.perf_counter() - t0
    early = engine.poll()
    busy = not compute.query()
    done = early + _wait(engine, 1 - len(early))
    info = (
        f"submit {submit_s:.4f} s, compute busy after submit: {busy}, sleep "
        f"{start.elapsed_time(slept):.1f} ms, streams: compute {compute.cuda_stream:#x} store "
        f"{engine._store_stream.cuda_stream:#x} dma {engine._store_dma_stream.cuda_stream:#x}"
    )
    # store() did not block: the compute stream (0.2 s of GPU sleep queued) is still busy when it returns
    assert busy, f"store() waited for the compute stream, or it finished before the check; {info}"
    assert early == [], f"store reported complete while the compute stream was still busy; {info}"
    assert done == [Completion("store", 1, True)]
    for slot in slots:
        assert bool((buf[slot] == 0xA5).all()), "store did not see the compute stream's writes"


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
def test_load_is_ordered_after_compute_stream(mode: dict) -> None:
    engine, views, buf = _engine(**mode)
    slots, blocks = [1, 7], [10, 20]
    buf[slots] = 0x3C
    for view in views:  # load the fill kernel now: CUDA's lazy module loading may synchronize
        view[:, 0] = 0
    torch.cuda.synchronize()
    torch.cuda._sleep(200_000_000)
    for view in views:  # queued before the load: the load must land after it
        for b in blocks:
            view[:, b] = 0x11
    engine.load("r", slots, blocks)
    assert engine.poll() == [] and not torch.cuda.current_stream().query()
    assert _wait(engine, 1) == [Completion("load", "r", True)]
    for view in views:
        assert bool((view[:, blocks] == 0x3C).all())


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("mode", MODES)
def test_many_batches_complete_in_order_and_drain(mode: dict) -> None:
    engine, views, buf = _engine(num_slots=64, staging_bytes=1, **mode)  # dma: one row per chunk
    rng = random.Random(2)
    for batch in range(20):
        blocks = rng.sample(range(NUM_BLOCKS), 3)
        engine.store(batch, blocks, [batch * 3 + i for i in range(3)])
        engine.load(f"r{batch}", [batch], rng.sample(range(NUM_BLOCKS), 1))
    engine.drain()
    done = engine.poll()
    assert [c.key for c in done if c.kind == "store"] == list(range(20))
    assert [c.key for c in done if c.kind == "load"] == [f"r{b}" for b in range(20)]
    assert all(c.ok for c in done)
    engine.store(99, [], [])  # empty batches complete too
    engine.drain()
    assert engine.poll() == [Completion("store", 99, True)]


@pytest.mark.gpu
@gpu
def test_bad_ids_fail_the_batch_not_the_process() -> None:
    engine, _, _ = _engine()
    engine.store(1, [NUM_BLOCKS], [0])
    engine.load("x", [10_000], [0])
    engine.store(2, [1, 2], [0])
    expected = [Completion("store", 1, False), Completion("load", "x", False), Completion("store", 2, False)]
    assert sorted(engine.poll(), key=str) == sorted(expected, key=str)


@pytest.mark.gpu
@gpu
def test_pageable_arena_is_registered_by_the_engine() -> None:
    from kvbm.transfer.cuda import CudaCopyEngine

    caches = _make_caches("flashinfer", torch.float16, "cuda", seed=4)
    layout, views = describe_kv_caches(caches, NUM_BLOCKS)
    buf = torch.zeros((8, layout.block_bytes), dtype=torch.uint8)
    assert not buf.is_pinned()
    engine = CudaCopyEngine(layout, views, _arena(buf))
    assert buf.is_pinned()
    engine.store(0, [3, 4], [6, 1])
    engine.drain()
    assert engine.poll() == [Completion("store", 0, True)]
    for view, layer in zip(views, layout.layers, strict=True):
        host = buf[:, layer.offset : layer.offset + layer.block_bytes].view(8, layer.outer, layer.inner_bytes)
        assert torch.equal(host[[6, 1]], view[:, [3, 4]].transpose(0, 1).cpu())
    engine.close()
    assert not buf.is_pinned()


@pytest.mark.gpu
@gpu
def test_allocate_pinned_is_pinned_and_dma_works() -> None:
    from kvbm.storage.pinned import AllocStats, allocate_host, allocate_pinned

    seen = []
    host = allocate_pinned(64 << 20, progress=lambda d, t: seen.append((d, t)))
    assert host.dtype == torch.uint8 and host.shape == (64 << 20,)
    assert host.is_pinned()
    assert seen and seen[-1][0] == seen[-1][1] >= 64 << 20
    assert int(host[:: 1 << 20].sum()) == 0
    dev = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8, device="cuda")
    host.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(host, dev.cpu())
    stats = AllocStats()
    other = allocate_host(1 << 20, pin=True, stats=stats)
    assert stats.pinned and other.is_pinned()
    del host, other
    gc.collect()


def _layered_load(kind: str, dtype: torch.dtype, *, dma_api: str = "batch", seed: int = 21,
                  fence: bool = False, min_mean_run: int = 1, **engine_options) -> None:
    """Layer-wise loads (two requests, one bad one) issued from a side "compute" stream while the
    load stream is held busy; each layer is waited for on that compute stream and read there at
    once. Every read must see the loaded bytes, and the caches end equal to TorchCopyEngine's."""
    from kvbm.storage.host import make_host_arena_buffer
    from kvbm.transfer.cuda import CudaCopyEngine

    rng = random.Random(seed)
    gpu_caches = _make_caches(kind, dtype, "cuda", seed)
    cpu_caches = {k: v.cpu().clone() for k, v in gpu_caches.items()}
    layout, gviews = describe_kv_caches(gpu_caches, NUM_BLOCKS)
    clayout, cviews = describe_kv_caches(cpu_caches, NUM_BLOCKS)
    num_slots = 40
    gbuf = make_host_arena_buffer(num_slots, layout.block_bytes, want_pinned=True)
    _random_bytes_(gbuf, torch.Generator().manual_seed(seed + 1))
    engine = CudaCopyEngine(layout, gviews, _arena(gbuf), dma_api=dma_api, **engine_options)
    engine.min_mean_run = min_mean_run  # 1: the staged path whatever the slots; 8 (default): whole here
    ref = TorchCopyEngine(clayout, cviews, _arena(gbuf.clone()))
    blocks = rng.sample(range(NUM_BLOCKS), 30)
    slots = rng.sample(range(num_slots), 30)
    slots[3:12] = range(20, 29)  # a run of consecutive slots (one 2-D DMA) among scattered ones
    loads = [("a", slots[:17], blocks[:17]), ("bad", [0], [NUM_BLOCKS]), ("b", slots[17:], blocks[17:])]
    order = list(range(len(layout.layers)))[::-1]
    for key, s, b in loads[::2]:
        ref.load(key, s, b)
    compute = torch.cuda.Stream()
    idx = torch.tensor(blocks, device="cuda")  # uploaded now: no index upload on the held stream
    for view in gviews:  # load the kernels now: CUDA's lazy module loading may synchronize
        view.index_select(1, idx)
    torch.cuda.synchronize()
    with torch.cuda.stream(engine.load_stream):
        torch.cuda._sleep(200_000_000)  # the loads start ~0.1 s late: an unordered read shows
    with torch.cuda.stream(compute):
        engine.load_layers(loads, order)
        assert engine.poll() == [Completion("load", "bad", False)]  # fails alone, at once
        reads = {}
        if fence:
            engine.fence_loads()
        for layer in order:
            if not fence:
                engine.wait_layer(layer)  # the compute stream waits for this layer only
            reads[layer] = gviews[layer].index_select(1, idx)  # the "attention" of this layer
    assert not compute.query(), "the compute stream was not held back by the loads"
    done = _wait(engine, 2)
    assert [(c.key, c.ok) for c in done] == [("a", True), ("b", True)]
    torch.cuda.synchronize()
    for layer, got in reads.items():
        want = cviews[layer][:, blocks]
        assert torch.equal(got.cpu(), want), f"layer {layer} read before its load landed ({kind}, {dtype})"
    got, want = _bytes(gpu_caches), _bytes(cpu_caches)
    for name in got:
        assert torch.equal(got[name], want[name]), f"layer {name} differs after layer-wise load ({kind}, {dtype})"
    engine.close()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("kind", LAYOUTS + ["odd"])
def test_layer_wise_load_is_byte_exact_and_waited_per_layer(kind: str, dtype: torch.dtype) -> None:
    _layered_load(kind, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kind", ["flash", "v2"])
def test_layer_wise_load_with_plain_memcpy_and_whole_fence(kind: str) -> None:
    _layered_load(kind, torch.bfloat16, dma_api="memcpy", seed=22)
    _layered_load(kind, torch.bfloat16, fence=True, seed=23)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("options", [
    {"layer_path": "batch"},  # one DMA entry per block and plane, straight into the cache
    {"load_mode": "kernel"},  # no load staging: the batch path
    {"staging_bytes": 1},  # staging of one row: a staging buffer-full per block, both buffers in turn
    {"min_mean_run": 8},  # these slots are too scattered: the loads land whole, every layer waits for all
], ids=["batch", "kernel-loads", "tiny-staging", "scattered-whole"])
def test_layer_wise_load_paths(options: dict) -> None:
    _layered_load("flash", torch.bfloat16, seed=24, **options)
    _layered_load("v2", torch.bfloat16, seed=25, **options)


@pytest.mark.gpu
@gpu
def test_layer_wise_loads_complete_in_order_with_other_copies() -> None:
    engine, views, buf = _engine(num_slots=32)
    buf[:4] = 0x5A
    engine.load("whole", [0], [1])
    engine.load_layers([("layered", [1, 2], [2, 3])], [0, 1, 2])
    engine.fence_loads()  # as the runner does before a step's stores
    engine.store(7, [2, 3], [10, 11])  # reads the blocks the layered load filled
    engine.drain()
    assert [(c.key, c.ok) for c in engine.poll()] == [(7, True), ("whole", True), ("layered", True)]
    assert bool((buf[[10, 11]] == 0x5A).all())
    for view in views:
        assert bool((view[:, [1, 2, 3]] == 0x5A).all())


# ---------------------------------------------------------------- CPU tests


def test_cuda_modules_import_without_gpu_libraries() -> None:
    code = (
        "import sys, kvbm.transfer.cuda, kvbm.transfer.factory, kvbm.storage.pinned\n"
        "bad = [m for m in ('triton', 'cupy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_factory_returns_torch_engine_for_cpu_tensors() -> None:
    from kvbm.storage.host import make_host_arena_buffer
    from kvbm.transfer.factory import make_copy_engine

    caches = _make_caches("cpu", torch.bfloat16, "cpu", seed=1)
    ref_caches = {k: v.clone() for k, v in caches.items()}
    layout, views = describe_kv_caches(caches, NUM_BLOCKS)
    buf = make_host_arena_buffer(8, layout.block_bytes, want_pinned=False)
    assert buf.shape == (8, layout.block_bytes) and buf.dtype == torch.uint8
    assert int(buf.sum()) == 0
    engine = make_copy_engine(layout, views, _arena(buf))
    assert isinstance(engine, TorchCopyEngine)
    engine.store(1, [4, 9], [2, 5])
    engine.load("r", [2, 5], [30, 31])
    assert engine.poll() == [Completion("store", 1, True), Completion("load", "r", True)]
    for name, t in caches.items():
        assert torch.equal(t[[30, 31]].view(torch.uint8), ref_caches[name][[4, 9]].view(torch.uint8))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_torch_engine_round_trip_every_layout(kind: str) -> None:
    """Every layout (the permuted one of vLLM's GPU model runner too) round-trips byte for byte."""
    from kvbm.storage.host import make_host_arena_buffer
    from kvbm.transfer.factory import make_copy_engine

    caches = _make_caches(kind, torch.bfloat16, "cpu", seed=3)
    original = {k: v.clone() for k, v in caches.items()}
    layout, views = describe_kv_caches(caches, NUM_BLOCKS)
    engine = make_copy_engine(layout, views, _arena(make_host_arena_buffer(4, layout.block_bytes, False)))
    engine.store(1, [2, 7], [0, 3])
    engine.load("r", [0, 3], [11, 12])
    assert [c.ok for c in engine.poll()] == [True, True]
    dim = 1 if kind == "flash" else 0
    for name, t in caches.items():
        moved = original[name].index_select(dim, torch.tensor([2, 7]))
        want = original[name].index_copy(dim, torch.tensor([11, 12]), moved)
        assert torch.equal(t.view(torch.uint8), want.view(torch.uint8)), f"{kind}: layer {name}"
    assert "physical order" in layout.describe()


def test_layout_rejects_caches_with_gaps() -> None:
    strided = torch.zeros((NUM_BLOCKS, 4, 16, 64), dtype=torch.bfloat16)[:, :, :, :32]
    with pytest.raises(LayoutError, match="dense"):
        describe_kv_caches({"l0": strided}, NUM_BLOCKS)


def test_cuda_engine_rejects_cpu_tensors() -> None:
    from kvbm.transfer.cuda import CudaCopyEngine

    caches = _make_caches("flash", torch.float16, "cpu", seed=1)
    layout, views = describe_kv_caches(caches, NUM_BLOCKS)
    with pytest.raises(ValueError, match="CUDA tensors"):
        CudaCopyEngine(layout, views, _arena(torch.zeros((2, layout.block_bytes), dtype=torch.uint8)))


def test_allocate_host_pageable_and_released() -> None:
    from kvbm.storage.pinned import AllocStats, allocate_host

    stats = AllocStats()
    seen = []
    size = (200 << 20) + 123  # not a multiple of the page or chunk size
    t = allocate_host(size, pin=False, threads=3, stats=stats, progress=lambda d, n: seen.append(d))
    assert t.shape == (size,) and t.dtype == torch.uint8
    assert stats.populate_method in ("madvise", "touch") and not stats.pinned
    assert seen == sorted(seen) and seen[-1] >= size
    t[-1] = 7
    t[0] = 9
    view = t[-10:]
    addr = t.data_ptr()
    del t
    gc.collect()
    assert int(view[-1]) == 7  # a view keeps the mapping alive
    del view
    gc.collect()
    with open("/proc/self/maps") as maps:
        starts = {int(line.split("-", 1)[0], 16) for line in maps}
    assert addr not in starts, "mapping was not released"


@pytest.mark.skipif(HAS_CUDA, reason="checks the no-CUDA fallback")
def test_allocate_pinned_without_cuda_warns_and_falls_back() -> None:
    from kvbm.storage.pinned import allocate_pinned

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = allocate_pinned(1 << 20, threads=2)
    assert any("not pinned" in str(w.message) for w in caught)
    assert t.shape == (1 << 20,)
    t.fill_(1)
    assert int(t.sum()) == 1 << 20


def test_torch_engine_copies_runs_and_rejects_bad_ids() -> None:
    from kvbm.storage.host import make_host_arena_buffer
    from kvbm.transfer.factory import make_copy_engine

    caches = _make_caches("cpu", torch.float16, "cpu", seed=5)
    original = {k: v.clone() for k, v in caches.items()}
    layout, views = describe_kv_caches(caches, NUM_BLOCKS)
    engine = make_copy_engine(layout, views, _arena(make_host_arena_buffer(8, layout.block_bytes, False)))
    assert TorchCopyEngine._runs([5, 6, 7, 9, 2], [0, 1, 2, 3, 7]) == [(2, 7, 1), (5, 0, 3), (9, 3, 1)]
    engine.store(1, [5, 6, 7, 9, 2], [0, 1, 2, 3, 7])
    engine.load("r", [0, 1, 2, 3, 7], [20, 21, 22, 30, 31])
    for name, t in caches.items():
        assert torch.equal(t[[20, 21, 22, 30, 31]].view(torch.uint8), original[name][[5, 6, 7, 9, 2]].view(torch.uint8))
    engine.store(2, [NUM_BLOCKS], [0])
    engine.load("bad", [8], [0])
    assert [(c.key, c.ok) for c in engine.poll()] == [(1, True), ("r", True), (2, False), ("bad", False)]
