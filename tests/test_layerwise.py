"""Layer-wise in-step loads without vLLM: the CPU engine's lazy per-layer copies, the
executor's and runner's per-layer scheduling, the hook gate, and the CUDA engine's
per-layer DMA addresses, both ways (applied with memmove to real CPU tensors).

The same path inside real vLLM: tests/test_vllm_host_tier.py (mode "layerwise");
on a GPU, byte for byte: tests/test_gpu_transfer.py (``-m gpu``).
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import pytest
import torch

from kvbm.core.plan import LoadOp, LoadPart, StepPlan, StoreBatch
from kvbm.runtime.layers import LayerHooks, hooks_run
from kvbm.storage.host import HostArena
from kvbm.transfer.cuda import layer_copies, stage_copies, staged_chunks, view_planes
from kvbm.transfer.engine import Completion, TorchCopyEngine
from kvbm.transfer.executor import TransferExecutor
from kvbm.transfer.layout import describe_kv_caches
from kvbm.transfer.runner import PlanRunner
from tests.test_executor import DictMedium, H

NUM_BLOCKS = 24
LAYERS = 3
SLOTS = 10


def caches(shape=(NUM_BLOCKS, 2, 4, 16), seed: int = 0, perm=None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(LAYERS):
        t = torch.randint(-1000, 1000, shape, generator=gen).to(torch.bfloat16)
        out[f"model.layers.{i}.attn"] = t.permute(perm) if perm else t
    return out


def arena(block_bytes: int, seed: int = 1) -> HostArena:
    a = HostArena(SLOTS, block_bytes, pin=False)
    a.buffer.copy_(torch.randint(0, 256, a.buffer.shape, dtype=torch.uint8,
                                 generator=torch.Generator().manual_seed(seed)))
    return a


def loaded(views, host: HostArena, layout, layer: int, slots, blocks) -> bool:
    """Layer ``layer`` of ``blocks`` holds the bytes of host ``slots``."""
    seg = host.segment(layout.layers[layer].offset, layout.layers[layer].outer, layout.layers[layer].inner_bytes)
    return all(torch.equal(views[layer][:, b], seg[s]) for s, b in zip(slots, blocks))


# ---- the CPU engine -------------------------------------------------------------------


def test_torch_engine_copies_a_layer_when_it_is_waited_for():
    layout, views = describe_kv_caches(caches(), NUM_BLOCKS)
    host = arena(layout.block_bytes)
    engine = TorchCopyEngine(layout, views, host)
    before = [v.clone() for v in views]
    slots, blocks = [4, 5, 9], [7, 8, 2]
    engine.load_layers([(1, slots, blocks), (2, [0], [NUM_BLOCKS]), (3, [1], [20])], order=[2, 0, 1])
    assert engine.poll() == [Completion("load", 2, False)]  # a bad id fails its load at once, alone
    assert all(torch.equal(v, b) for v, b in zip(views, before))  # lazy: nothing copied yet
    engine.wait_layer(2)
    engine.wait_layer(2)  # twice: copied once
    assert loaded(views, host, layout, 2, slots, blocks) and loaded(views, host, layout, 2, [1], [20])
    assert torch.equal(views[0], before[0]) and torch.equal(views[1], before[1])
    assert engine.poll() == []  # complete only when every layer landed
    engine.fence_loads()
    assert all(loaded(views, host, layout, i, slots, blocks) for i in range(LAYERS))
    done = engine.poll()
    assert [(c.kind, c.key, c.ok) for c in done] == [("load", 1, True), ("load", 3, True)]
    untouched = [b for b in range(NUM_BLOCKS) if b not in blocks + [20]]
    assert all(torch.equal(v[:, untouched], b[:, untouched]) for v, b in zip(views, before))
    engine.wait_layer(0)  # no layer-wise load pending: nothing happens
    engine.fence_loads()
    assert engine.poll() == []


def test_torch_engine_lands_earlier_layer_wise_loads_before_new_ones():
    layout, views = describe_kv_caches(caches(), NUM_BLOCKS)
    host = arena(layout.block_bytes)
    engine = TorchCopyEngine(layout, views, host)
    engine.load_layers([(1, [3], [4])], order=[0, 1, 2])
    engine.load_layers([(2, [3], [5])], order=[0, 1, 2])  # like a stream: the first lands first
    assert [c.key for c in engine.poll()] == [1]
    assert all(loaded(views, host, layout, i, [3], [4]) for i in range(LAYERS))
    engine.close()
    assert [c.key for c in engine.poll()] == [2]


# ---- the CUDA engine's per-layer DMA, on CPU pointers -----------------------------------


@pytest.mark.parametrize("shape,perm", [
    ((2, NUM_BLOCKS, 16, 2, 8), None),  # FlashAttention: K and V planes (outer 2)
    ((NUM_BLOCKS, 2, 16, 16), None),  # CPU backend
    ((NUM_BLOCKS, 16, 2, 16), (0, 2, 1, 3)),  # vLLM 0.26+ GPU runner: a permuted view
    ((NUM_BLOCKS, 16, 36), None),  # MLA
], ids=["flash", "cpu", "v2", "mla"])
def test_layer_copies_land_what_the_torch_engine_lands(shape, perm):
    """The addresses the CUDA engine hands cuMemcpyBatchAsync, applied with memmove."""
    cache = caches(shape, seed=3, perm=perm)
    ref_cache = {k: v.clone() for k, v in cache.items()}
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    ref_layout, ref_views = describe_kv_caches(ref_cache, NUM_BLOCKS)
    host = arena(layout.block_bytes)
    slots, blocks = [9, 0, 4, 5, 6], [3, 17, 0, 1, NUM_BLOCKS - 1]
    TorchCopyEngine(ref_layout, ref_views, host).load(1, slots, blocks)
    planes = view_planes(layout, views)
    assert len(planes) == sum(layer.outer for layer in layout.layers)
    first = 0
    for layer in layout.layers:
        dsts, srcs, sizes = layer_copies(planes[first : first + layer.outer], host.buffer.data_ptr(),
                                         host.buffer.stride(0), slots, blocks)
        first += layer.outer
        assert len(dsts) == len(srcs) == len(sizes) == len(blocks) * layer.outer
        for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
            ctypes.memmove(dst, src, size)
    for name in cache:
        assert torch.equal(cache[name].view(torch.int16), ref_cache[name].view(torch.int16)), name  # bytes: NaNs too


def test_staged_chunks_sort_slots_into_runs():
    chunks = staged_chunks([7, 3, 4, 5, 9, 8, 0], [70, 30, 40, 50, 90, 80, 0], rows_per_chunk=4)
    assert [c.blocks for c in chunks] == [[0, 30, 40, 50], [70, 80, 90]]
    assert [c.runs for c in chunks] == [[(0, 0, 1), (1, 3, 3)], [(0, 7, 3)]]
    assert staged_chunks([], [], 4) == []
    with pytest.raises(ValueError):
        staged_chunks([1], [1], 0)


@pytest.mark.parametrize("shape,perm", [
    ((2, NUM_BLOCKS, 16, 2, 8), None),  # FlashAttention: K and V planes (outer 2)
    ((NUM_BLOCKS, 16, 2, 16), (0, 2, 1, 3)),  # vLLM 0.26+ GPU runner: a permuted view
    ((NUM_BLOCKS, 16, 36), None),  # MLA
], ids=["flash", "v2", "mla"])
@pytest.mark.parametrize("min_run", [1, 3, 99])  # all 2-D, mixed, all batch entries
def test_staged_layer_copies_land_what_the_torch_engine_lands(shape, perm, min_run):
    """The staged layer path's DMAs (2-D runs and batch entries) applied with memmove into a
    staging buffer, then the scatter the kernel does (staging row j, plane o -> block j's plane o),
    layer by layer: the cache ends equal to a whole load by the CPU engine."""
    cache = caches(shape, seed=4, perm=perm)
    ref_cache = {k: v.clone() for k, v in cache.items()}
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    ref_layout, ref_views = describe_kv_caches(ref_cache, NUM_BLOCKS)
    host = arena(layout.block_bytes, seed=5)
    slots, blocks = [9, 2, 3, 4, 0, 5, 7, 8], [3, 17, 0, 1, NUM_BLOCKS - 1, 6, 12, 9]
    TorchCopyEngine(ref_layout, ref_views, host).load(1, slots, blocks)
    widest = max(layer.block_bytes for layer in layout.layers)
    staging = torch.zeros(3 * widest, dtype=torch.uint8)  # 3 rows: several chunks
    for i, layer in enumerate(layout.layers):
        for chunk in staged_chunks(slots, blocks, 3):
            two_d, (dsts, srcs, sizes) = stage_copies(chunk, host.buffer.data_ptr(), host.buffer.stride(0),
                                                      layer.offset, layer.block_bytes, staging.data_ptr(), min_run)
            for dst, dpitch, src, spitch, width, height in two_d:
                for r in range(height):
                    ctypes.memmove(dst + r * dpitch, src + r * spitch, width)
            for dst, src, size in zip(dsts.tolist(), srcs.tolist(), sizes.tolist()):
                ctypes.memmove(dst, src, size)
            for j, block in enumerate(chunk.blocks):
                row = staging[j * layer.block_bytes : (j + 1) * layer.block_bytes].view(layer.outer, -1)
                views[i][:, block] = row
    for name in cache:
        assert torch.equal(cache[name].view(torch.int16), ref_cache[name].view(torch.int16)), name


# ---- executor and runner ----------------------------------------------------------------


def rank(cache, media: dict | None = None) -> tuple[PlanRunner, list[torch.Tensor], HostArena, object]:
    layout, views = describe_kv_caches(cache, NUM_BLOCKS)
    host = arena(layout.block_bytes)
    executor = TransferExecutor(layout, views, host=host, media=media)
    return PlanRunner(executor, {"G2": SLOTS}), views, host, layout


def plan(slots=(2, 3), blocks=(10, 11), store=True) -> StepPlan:
    return StepPlan(loads=[LoadOp("r1", list(blocks), [LoadPart("G2", list(slots))], sync=True)],
                    store=StoreBatch(7, "G2", [12], [8]) if store else None)


def test_runner_lands_in_step_loads_layer_by_layer_then_stores():
    runner, views, host, layout = rank(caches())
    step = plan()
    runner.start_step(step, layer_order=[1, 0, 2])
    assert runner.layered_steps == 1 and runner.layered
    assert not any(loaded(views, host, layout, i, [2, 3], [10, 11]) for i in range(LAYERS))
    runner.wait_layer(1)
    assert loaded(views, host, layout, 1, [2, 3], [10, 11])
    assert not loaded(views, host, layout, 0, [2, 3], [10, 11])
    runner.store(step)  # the stores read G1 after every layer landed
    assert all(loaded(views, host, layout, i, [2, 3], [10, 11]) for i in range(LAYERS))
    runner.results()
    report = runner.take_report()
    assert report.sync_loaded == {"r1": 1} and not report.failed_loads
    assert report.stored == {7: 1}
    runner.close()


def test_runner_unknown_layer_waits_for_all_and_results_end_a_step_without_store():
    runner, views, host, layout = rank(caches())
    runner.start_step(plan(store=False), layer_order=[0, 1, 2])
    runner.wait_layer(None)  # a layer kvbm does not know: everything lands
    assert all(loaded(views, host, layout, i, [2, 3], [10, 11]) for i in range(LAYERS))
    runner.start_step(plan(slots=(4,), blocks=(13,), store=False), layer_order=[0, 1, 2])
    runner.results()  # no forward pass, no store: the results end the loads
    assert all(loaded(views, host, layout, i, [4], [13]) for i in range(LAYERS))
    assert runner.take_report().sync_loaded == {"r1": 2}


def test_runner_whole_loads_without_an_order_and_layered_only_with_sync_loads():
    runner, views, host, layout = rank(caches())
    runner.start_step(plan(store=False))  # no layer order: whole loads, landed before the forward
    assert all(loaded(views, host, layout, i, [2, 3], [10, 11]) for i in range(LAYERS))
    runner.start_step(StepPlan(), layer_order=[0, 1, 2])  # nothing to load: not a layer-wise step
    assert runner.layered_steps == 0 and not runner.layered


def test_runner_medium_parts_land_before_the_forward_in_a_layered_step():
    cache = caches()
    medium = DictMedium()
    runner, views, host, layout = rank(cache, {"G3": medium})
    runner.capacities["G3"] = 4
    want = torch.randint(0, 256, (layout.block_bytes,), dtype=torch.uint8).numpy().tobytes()
    medium.blocks[H(1)] = want
    step = StepPlan(loads=[LoadOp("r", [10, 11], [LoadPart("G2", [2]), LoadPart("G3", [0], [H(1)])], sync=True)])
    runner.start_step(step, layer_order=[0, 1, 2])
    for i, layer in enumerate(layout.layers):  # G3's block is in place; G2's waits for its layer
        got = views[i][:, 11].reshape(-1).numpy().tobytes()
        assert got == want[layer.offset : layer.offset + layer.block_bytes]
    assert not loaded(views, host, layout, 0, [2], [10])
    runner.store(step)
    assert loaded(views, host, layout, 0, [2], [10])
    runner.close()


def test_runner_fail_layers_recomputes_the_loads_and_drops_the_stores():
    runner, _, _, _ = rank(caches())
    step = plan()
    runner.start_step(step, layer_order=[0, 1, 2])
    runner.fail_layers()
    runner.store(step)
    runner.results()
    assert runner.load_error_blocks() == {10, 11}
    report = runner.take_report()
    assert report.failed_loads == {"r1"} and report.failed_batches == {7} and not report.stored


def test_runner_a_failed_layer_wise_load_poisons_the_store():
    runner, _, _, _ = rank(caches())
    step = plan(slots=(2, SLOTS + 5))  # a slot out of range: the load fails when issued
    runner.start_step(step, layer_order=[0, 1, 2])
    runner.store(step)
    assert runner.load_error_blocks() == {10, 11}
    assert 7 in runner.take_report().failed_batches


# ---- which steps may load layer by layer ------------------------------------------------

NAMES = ["model.layers.0.attn", "model.layers.1.attn", "model.layers.2.attn"]


def run_step(hooks: LayerHooks, hooked=NAMES, run=True, loads=True) -> tuple[list[int] | None, bool]:
    order = hooks.begin_step(run)
    for name in hooked:
        hooks.hooked(name)
    return order, hooks.end_step(layered=order is not None and loads)


def test_hooks_are_learned_from_a_whole_load_step_then_used():
    hooks = LayerHooks(NAMES, NAMES, enabled=True)
    assert run_step(hooks, hooked=[]) == (None, False)  # no hook ran (e.g. no forward): still learning
    assert run_step(hooks, hooked=[NAMES[2], NAMES[0], NAMES[1], NAMES[0]]) == (None, False)
    assert hooks.armed and hooks.order == [2, 0, 1]  # learned in the order the forward ran them
    assert run_step(hooks) == ([2, 0, 1], False)
    assert run_step(hooks, run=False) == (None, False)  # a full CUDA graph step: whole loads
    assert hooks.hooked(NAMES[1]) == 1 and hooks.hooked("drafter.attn") is None


def test_hooks_missing_a_layer_turn_layer_wise_off():
    hooks = LayerHooks(NAMES, NAMES, enabled=True)
    assert run_step(hooks, hooked=NAMES[:2]) == (None, False)  # learning: a layer never waited for
    assert not hooks.enabled and run_step(hooks) == (None, False)
    hooks = LayerHooks(NAMES, NAMES, enabled=True)
    run_step(hooks, hooked=NAMES + ["other.attn"])  # a hook kvbm has no cache for
    assert not hooks.enabled
    hooks = LayerHooks(NAMES, NAMES, enabled=True)
    run_step(hooks)
    assert run_step(hooks, hooked=NAMES[1:]) == ([0, 1, 2], True)  # a layered step skipped a layer
    assert not hooks.enabled and run_step(hooks) == (None, False)
    hooks = LayerHooks(NAMES, NAMES, enabled=True)
    run_step(hooks)
    assert run_step(hooks, hooked=[]) == ([0, 1, 2], True)  # the hooks did not run at all


def test_hooks_a_step_without_layered_loads_proves_nothing():
    """vLLM 0.29+ starts a step without in-step loads after its forward pass: no hook is seen."""
    hooks = LayerHooks(NAMES, NAMES, enabled=True)
    run_step(hooks)
    assert run_step(hooks, hooked=[], loads=False) == ([0, 1, 2], False)
    assert hooks.armed


def test_hooks_off_when_disabled_or_kv_is_shared():
    assert not LayerHooks(NAMES, NAMES, enabled=False).enabled
    shared = LayerHooks(NAMES[:2], NAMES, enabled=True)  # layer 2 shares layer 1's cache
    assert not shared.enabled
    run_step(shared)
    assert run_step(shared) == (None, False)


def test_hooks_run_only_outside_full_cuda_graphs():
    def ctx(meta, mode=None):
        return SimpleNamespace(attn_metadata=meta, cudagraph_runtime_mode=SimpleNamespace(name=mode) if mode else None)

    assert hooks_run(ctx({"l": 1}, "NONE")) and hooks_run(ctx({"l": 1}, "PIECEWISE")) and hooks_run(ctx([{}]))
    assert not hooks_run(ctx({"l": 1}, "FULL"))  # V1 runner replaying a full graph
    assert not hooks_run(ctx(None))  # V2 runner: loads started outside the forward context
    assert not hooks_run(ctx({})) and not hooks_run(object())


@pytest.mark.parametrize("failidx", [False, True], ids=["v2", "v1"])
def test_batch_copier_passes_numpy_arrays_as_it_passes_lists(failidx):
    """copy_arrays (layer-wise loads) must hand cuMemcpyBatchAsync exactly what copy() hands it
    (the path the GPU tests cover), here recorded instead of called (no CUDA driver on CPU)."""
    import numpy as np

    from kvbm.transfer.cuda_driver import BatchCopier

    calls = []

    def record(*args):
        decoded = []
        for i, arg in enumerate(args):
            if i < 3:  # dsts, srcs, sizes: pointers to count uint64 values
                count = args[3].value
                decoded.append(list((ctypes.c_uint64 * count).from_address(ctypes.cast(arg, ctypes.c_void_p).value)))
            elif isinstance(arg, (ctypes.c_size_t, ctypes.c_void_p)):
                decoded.append(arg.value)
            else:
                decoded.append(type(arg).__name__)
        calls.append(decoded)
        return 0

    copier = BatchCopier.__new__(BatchCopier)
    copier._batch, copier._failidx = record, failidx
    copier._attrs, copier._zero = {False: ctypes.c_int(0), True: ctypes.c_int(1)}, (ctypes.c_size_t * 1)(0)
    dsts, srcs, sizes = [1 << 40, 5, 77], [3, 1 << 33, 9], [4096, 65536, 15]
    copier.copy(dsts, srcs, sizes, False, 1234)
    copier.copy_arrays(*(np.array(a, dtype=np.uint64) for a in (dsts, srcs, sizes)), False, 1234)
    assert calls[0] == calls[1]
    assert calls[0][:4] == [dsts, srcs, sizes, 3] and calls[0][-1] == 1234
