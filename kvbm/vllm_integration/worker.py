"""Worker-side half of the connector: one per tensor-parallel rank.

Owns this rank's G2 arena, G3 file and copy engine, executes the leader's
plan each step, and reports completions back (store batches through worker
metadata, loads through vLLM's finished_recving).

Disk I/O runs on a background thread so the engine step never waits on the
SSD: G3 reads land in a staging buffer and are scattered into the GPU blocks
when polled; G2→G3 spills read host slots the leader keeps pinned; disk-only
stores gather the GPU blocks into staging synchronously (the blocks may be
reused next step), then write in the background.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvbm.config import KvbmConfig
from kvbm.core.planner import DISK, LoadOp, SpillBatch, StoreBatch
from kvbm.metrics import OFFLOAD_D2D, OFFLOAD_D2H, OFFLOAD_H2D, ONBOARD_D2D, ONBOARD_H2D
from kvbm.runtime.handshake import TierSizes, WorkerHandshake, WorkerLayout
from kvbm.storage.disk import DiskArena, FaultInjector
from kvbm.storage.host import HostArena
from kvbm.transfer.engine import CopyEngine, TorchCopyEngine
from kvbm.transfer.factory import make_copy_engine, make_host_arena_buffer
from kvbm.transfer.layout import KVLayout, describe_kv_caches
from kvbm.vllm_integration.metadata import KvbmMetadata, KvbmWorkerMetadata
from kvbm.vllm_integration.sizing import storage_key

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

logger = logging.getLogger(__name__)

#: Staging rows for G1<->G3 transfers: at most this many blocks or bytes.
STAGING_ROWS = 64
STAGING_BYTES = 256 << 20


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def disk_file_tag(config: KvbmConfig, key: str, rank: int) -> str:
    """Persistent files are named by the storage key (model and slot shape: a
    restart finds them); others by process, so two servers sharing a directory
    never collide."""
    if config.disk_persist:
        return f"{hashlib.blake2b(key.encode(), digest_size=8).hexdigest()}-rank{rank}"
    return f"pid{os.getpid()}-rank{rank}"


@dataclass
class _Load:
    """One request's onboard: a G2 part (copy engine) and/or a G3 part (disk read, then scatter)."""

    op: LoadOp
    parts_left: int
    error_blocks: list[int] = field(default_factory=list)
    staging: torch.Tensor | None = None
    read: Future | None = None  # G3 part: -> list[bool]


@dataclass
class _DiskWrite:
    batch_id: int
    write: Future  # -> list[bool]
    keep_alive: list[torch.Tensor] = field(default_factory=list)


class KvbmWorker:
    def __init__(self, config: KvbmConfig, vllm_config: VllmConfig, kv_cache_config: KVCacheConfig) -> None:
        self.config = config
        self._kv_cache_config = kv_cache_config
        self._storage_key = storage_key(vllm_config, kv_cache_config)
        self._world_size = vllm_config.parallel_config.world_size
        self._engine_id = vllm_config.kv_transfer_config.engine_id
        #: Set from the leader's answer in the startup handshake (handshake.py).
        self.num_host_slots = 0
        self.num_disk_slots = 0
        self._handshake: WorkerHandshake | None = None
        self.layout: KVLayout | None = None
        self._views: list[torch.Tensor] = []
        self.engine: CopyEngine | None = None
        self.arena: HostArena | None = None
        self.disk: DiskArena | None = None
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvbm-disk")
        self._loads: dict[str, _Load] = {}
        self._disk_writes: list[_DiskWrite] = []
        self._inflight_batches: set[int] = set()
        self._release_after: dict[str, int] = {}  # req_id -> store batch to wait for
        self._finished_loads: set[str] = set()
        self._failed_loads: set[str] = set()
        self._load_error_blocks: set[int] = set()
        #: A synchronous load failed this step: its store batch is dropped (see save).
        self._poisoned = False
        self._report = KvbmWorkerMetadata()
        self._stage_rows: HostArena | None = None
        self._stage_engine: CopyEngine | None = None
        #: ("store", batch id) / ("load", req id) -> (submitted, finished if synchronous, bytes)
        self._copy_times: dict[tuple[str, int | str], tuple[float, float | None, int]] = {}
        self._disk_seen: dict[str, float] = {}

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.layout, self._views = describe_kv_caches(kv_caches, self._kv_cache_config.num_blocks)
        logger.info("kvbm worker: KV layout %s", self.layout.describe())
        # vLLM builds the scheduler (our leader) only after every worker has
        # registered and warmed up: never block here. The first step waits.
        report = WorkerLayout(
            rank=_rank() % self._world_size, world_size=self._world_size,
            bytes_per_block=self.layout.block_bytes, num_gpu_blocks=self._kv_cache_config.num_blocks,
            layout=self.layout.signature(),
        )
        self._handshake = WorkerHandshake(self.config, self._engine_id, report, self._allocate).start()

    def _allocate(
        self, sizes: TierSizes, progress: Callable[[float], None]
    ) -> tuple[HostArena | None, DiskArena | None]:
        """On the handshake's thread, every rank at once: the slow part (pinning pages, fallocate)."""
        assert self.layout is not None
        if self._views and self._views[0].is_cuda:
            torch.cuda.set_device(self._views[0].device)  # per thread: pin in this rank's CUDA context
        arena = HostArena(sizes.host_slots, self.layout.block_bytes, on_progress=progress) if sizes.host_slots else None
        disk = None
        if sizes.disk_slots:
            cfg = self.config
            faults = dict(cfg.disk_fault_injection)
            seed = int(faults.pop("seed", 0)) + _rank()
            disk = DiskArena(
                cfg.disk_cache_dir, sizes.disk_slots, self.layout.block_bytes,
                file_tag=disk_file_tag(cfg, self._storage_key, _rank()),
                zerofill_fallback=cfg.disk_zerofill_fallback,
                disable_o_direct=cfg.disk_disable_o_direct,
                fault_hook=FaultInjector(faults, seed) if faults else None,
            )
        return arena, disk

    def _ensure_ready(self) -> None:
        """First real step: take the agreed tiers. Bounded by DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS,
        and instant in practice: the leader's constructor returned only after every rank acked."""
        if self._handshake is None:
            return
        sizes, (self.arena, self.disk) = self._handshake.wait()
        self._handshake = None
        self.num_host_slots, self.num_disk_slots = sizes.host_slots, sizes.disk_slots
        assert self.layout is not None
        if self.arena is not None:
            self.engine = make_copy_engine(self.layout, self._views, self.arena)
        if self.disk is not None:
            # Blocks cross between G1 and G3 through a bounded set of staging
            # rows with their own engine (pinned on GPUs), built once: engines
            # compile kernels and allocate at construction.
            rows = max(1, min(STAGING_ROWS, STAGING_BYTES // self.layout.block_bytes))
            on_gpu = bool(self._views) and self._views[0].is_cuda
            self._stage_rows = HostArena.wrap(make_host_arena_buffer(rows, self.layout.block_bytes, on_gpu))
            self._stage_engine = make_copy_engine(self.layout, self._views, self._stage_rows)

    def _staging(self, rows: int) -> torch.Tensor:
        """Host rows for blocks on their way to or from G3 (owned by one transfer)."""
        assert self.layout is not None
        return torch.empty((rows, self.layout.block_bytes), dtype=torch.uint8)

    def _gpu_to_host(self, gpu_blocks: list[int], out: torch.Tensor) -> bool:
        """Gather GPU blocks into ``out`` rows now, through the staging rows."""
        return self._through_staging(gpu_blocks, out, to_gpu=False)

    def _host_to_gpu(self, rows: torch.Tensor, gpu_blocks: list[int]) -> bool:
        """Scatter host rows into GPU blocks now, through the staging rows."""
        return self._through_staging(gpu_blocks, rows, to_gpu=True)

    def _through_staging(self, gpu_blocks: list[int], rows: torch.Tensor, to_gpu: bool) -> bool:
        assert self._stage_rows is not None and self._stage_engine is not None
        stage, engine, size = self._stage_rows.buffer, self._stage_engine, self._stage_rows.num_slots
        ok = True
        for start in range(0, len(gpu_blocks), size):
            chunk = gpu_blocks[start : start + size]
            n = len(chunk)
            if to_gpu:
                stage[:n].copy_(rows[start : start + n])
                engine.load("stage", list(range(n)), chunk)
            else:
                engine.store(-1, chunk, list(range(n)))
            engine.drain()
            ok = all(done.ok for done in engine.poll()) and ok
            if not to_gpu:
                rows[start : start + n].copy_(stage[:n])
        return ok

    # ---- per step -------------------------------------------------------
    def _check(self, meta: KvbmMetadata) -> None:
        if (meta.num_host_slots, meta.num_disk_slots) != (self.num_host_slots, self.num_disk_slots):
            raise RuntimeError(
                f"kvbm: leader sized G2/G3 at {meta.num_host_slots}/{meta.num_disk_slots} blocks but "
                f"this worker at {self.num_host_slots}/{self.num_disk_slots}; start all processes "
                "with the same DYN_KVBM_* settings"
            )

    def handle_preemptions(self, meta: KvbmMetadata) -> None:
        self._ensure_ready()
        if meta.plan.drain_stores and self.engine is not None:
            self.engine.drain()

    def start_load(self, meta: KvbmMetadata) -> None:
        """Every step, empty ones included: start the step's loads, and the plan's work that
        does not depend on this step's forward pass (G2→G3 spills read committed G2 rows).
        vLLM before 0.31 skips ``wait_for_save`` on steps without a forward pass, so work
        left for :meth:`save` would be lost there; only stores of blocks this step computes
        wait for it, and an empty step computes none."""
        self._ensure_ready()
        self._check(meta)
        plan = meta.plan
        if plan.spill is not None:
            self._spill(plan.spill)
        for req_id, batch_id in plan.release_after_store:
            self._release_after[req_id] = batch_id
        for op in plan.loads:
            load = self._loads[op.req_id] = _Load(op, parts_left=bool(op.host_slots) + bool(op.disk_slots))
            if op.host_slots:
                assert self.engine is not None
                start = time.perf_counter()
                self.engine.load(op.req_id, op.host_slots, op.gpu_blocks[: len(op.host_slots)])
                self._timed("load", op.req_id, start, len(op.host_slots))
            if op.disk_slots:
                assert self.disk is not None
                load.staging = self._staging(len(op.disk_slots))
                items = [(slot, h, load.staging[i].numpy())
                         for i, (slot, h) in enumerate(zip(op.disk_slots, op.disk_hashes))]
                if op.sync:  # read now: the forward pass of this step reads these blocks
                    load.read = Future()
                    load.read.set_result(self.disk.read_blocks(items))
                else:
                    load.read = self._io.submit(self.disk.read_blocks, items)
        if any(op.sync for op in plan.loads):
            # Scatter synchronous G3 parts now, and see a G2 copy that failed to start
            # (its blocks are then reported invalid in this step's output: vLLM recomputes).
            self._poll()
            if self.engine is not None:
                self.engine.fence_loads()  # the forward pass waits for the copies, not the CPU

    def save(self, meta: KvbmMetadata) -> None:
        """After the forward pass: store the blocks this step filled (G1→G2, or G1→G3)."""
        self._ensure_ready()
        plan = meta.plan
        poisoned, self._poisoned = self._poisoned, False
        if plan.store is not None and poisoned:
            # A synchronous load of this step failed: blocks computed on top of it are
            # suspect. vLLM recomputes them; kvbm keeps none of them (a few misses).
            self._report.failed_batches.add(plan.store.batch_id)
        elif plan.store is not None:
            self._inflight_batches.add(plan.store.batch_id)
            if plan.store.tier == DISK:
                self._store_to_disk(plan.store)
            else:
                assert self.engine is not None
                start = time.perf_counter()
                self.engine.store(plan.store.batch_id, plan.store.gpu_blocks, plan.store.slots)
                self._timed("store", plan.store.batch_id, start, len(plan.store.slots))

    def _timed(self, kind: str, key: int | str, start: float, blocks: int) -> None:
        """Remember a G1<->G2 copy for bandwidth metrics. A synchronous engine
        is done when the call returns; an asynchronous one when polled done."""
        assert self.layout is not None
        done = time.perf_counter() if isinstance(self.engine, TorchCopyEngine) else None
        self._copy_times[(kind, key)] = (start, done, blocks * self.layout.block_bytes)

    def _count_copy(self, kind: str, key: int | str, ok: bool) -> None:
        timing = self._copy_times.pop((kind, key), None)
        if timing is None or not ok:
            return
        start, done, nbytes = timing
        direction = OFFLOAD_D2H if kind == "store" else ONBOARD_H2D
        self._add_transfer(direction, nbytes, (done or time.perf_counter()) - start)

    def _add_transfer(self, direction: str, nbytes: float, seconds: float) -> None:
        report = self._report
        report.transfer_bytes[direction] = report.transfer_bytes.get(direction, 0) + int(nbytes)
        report.transfer_seconds[direction] = report.transfer_seconds.get(direction, 0.0) + seconds

    def _collect_disk_counters(self) -> None:
        """Disk traffic and errors since the last report, from the arena's own counters
        (timed around the actual I/O). Writes are spills (G2→G3), or G1→G3 stores
        in disk-only mode; reads are always onboards."""
        if self.disk is None:
            return
        now = self.disk.stats()
        seen, self._disk_seen = self._disk_seen, now
        delta = {key: value - seen.get(key, 0) for key, value in now.items()}
        if delta["bytes_written"] or delta["write_seconds"]:
            self._add_transfer(OFFLOAD_H2D if self.arena is not None else OFFLOAD_D2D,
                               delta["bytes_written"], delta["write_seconds"])
        if delta["bytes_read"] or delta["read_seconds"]:
            self._add_transfer(ONBOARD_D2D, delta["bytes_read"], delta["read_seconds"])
        for kind, key in (("read", "read_failures"), ("checksum", "checksum_failures"),
                          ("mismatch", "mismatches"), ("write", "write_failures")):
            if delta[key]:
                self._report.disk_errors[kind] = self._report.disk_errors.get(kind, 0) + int(delta[key])

    def _store_to_disk(self, store: StoreBatch) -> None:
        """G1→G3 (disk-only mode): gather now, write in the background."""
        assert self.disk is not None
        assert self.layout is not None
        staging = self._staging(len(store.slots))
        if not self._gpu_to_host(store.gpu_blocks, staging):
            self._report.failed_batches.add(store.batch_id)
            self._inflight_batches.discard(store.batch_id)
            return
        items = [(slot, h, staging[i].numpy()) for i, (slot, h) in enumerate(zip(store.slots, store.hashes))]
        self._disk_writes.append(_DiskWrite(store.batch_id, self._submit_write(items), [staging]))

    def _spill(self, spill: SpillBatch) -> None:
        """G2→G3: the leader keeps the host slots pinned until we report."""
        assert self.disk is not None and self.arena is not None
        rows = self.arena.buffer
        items = [(d, h, rows[s].numpy()) for s, d, h in zip(spill.host_slots, spill.disk_slots, spill.hashes)]
        self._disk_writes.append(_DiskWrite(spill.batch_id, self._submit_write(items)))

    def _submit_write(self, items: list) -> Future:
        assert self.disk is not None
        disk = self.disk
        persist = self.config.disk_persist

        def write() -> list[bool]:
            ok = disk.write_blocks(items)
            if persist and all(ok):
                disk.sync()  # durable before the leader journals it
            return ok

        return self._io.submit(write)

    def _poll(self) -> None:
        for load in [load for load in self._loads.values() if load.read is not None and load.read.done()]:
            self._finish_disk_read(load)
        still = []
        for write in self._disk_writes:
            if not write.write.done():
                still.append(write)
                continue
            ok = _result(write.write)
            if ok is not None and all(ok):
                self._report.stored[write.batch_id] = self._report.stored.get(write.batch_id, 0) + 1
            else:
                self._report.failed_batches.add(write.batch_id)
            self._inflight_batches.discard(write.batch_id)
        self._disk_writes = still
        if self.engine is None:
            return
        for done in self.engine.poll():
            self._count_copy(done.kind, done.key, done.ok)
            if done.kind == "store":
                self._inflight_batches.discard(done.key)  # type: ignore[arg-type]
                if done.ok:
                    self._report.stored[done.key] = self._report.stored.get(done.key, 0) + 1  # type: ignore[index]
                else:
                    self._report.failed_batches.add(done.key)  # type: ignore[arg-type]
            elif done.key in self._loads:
                self._part_done(self._loads[done.key], done.ok)  # type: ignore[index]

    def _finish_disk_read(self, load: _Load) -> None:
        """The G3 part is read (or not): scatter what verified, recompute the rest."""
        op, staging = load.op, load.staging
        assert load.read is not None and staging is not None and self.layout is not None
        ok = _result(load.read) or [False] * len(op.disk_slots)
        good = ok.index(False) if False in ok else len(ok)
        self._report.bad_disk_slots.update(slot for slot, fine in zip(op.disk_slots, ok) if not fine)
        first = len(op.host_slots)
        if good and not self._host_to_gpu(staging[:good], op.gpu_blocks[first : first + good]):
            good = 0
        # vLLM recomputes from the first block that did not arrive.
        load.error_blocks.extend(op.gpu_blocks[first + good :])
        load.read = load.staging = None
        self._part_done(load)

    def _part_done(self, load: _Load, ok: bool = True) -> None:
        if not ok:  # a failed G2 part: the whole prefix is recomputed
            load.error_blocks.extend(load.op.gpu_blocks)
        load.parts_left -= 1
        if load.parts_left > 0:
            return
        req_id = load.op.req_id
        del self._loads[req_id]
        if load.op.sync:  # vLLM scheduled it already; only the leader waits (to unpin slots)
            self._report.sync_loaded[req_id] = self._report.sync_loaded.get(req_id, 0) + 1
        else:
            self._finished_loads.add(req_id)
        if load.error_blocks:
            if load.op.sync:
                self._poisoned = True
            else:  # vLLM 0.30+ hears of failed asynchronous loads as failed_recving
                self._failed_loads.add(req_id)
            self._report.failed_loads.add(req_id)
            self._load_error_blocks.update(load.error_blocks)

    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since last call."""
        self._poll()
        released = {r for r, b in self._release_after.items() if b not in self._inflight_batches}
        for req_id in released:
            del self._release_after[req_id]
        loads, self._finished_loads = self._finished_loads, set()
        failed, self._failed_loads = self._failed_loads, set()
        return released, loads, failed

    def load_error_blocks(self) -> set[int]:
        errors, self._load_error_blocks = self._load_error_blocks, set()
        return errors

    def take_report(self) -> KvbmWorkerMetadata | None:
        self._collect_disk_counters()
        report, self._report = self._report, KvbmWorkerMetadata()
        return None if report.is_empty() else report

    def shutdown(self) -> None:
        if self._handshake is not None:
            self._handshake.close()
        for engine in (self.engine, self._stage_engine):
            if engine is not None:
                engine.drain()
                close = getattr(engine, "close", None)
                if close is not None:
                    close()
        self._io.shutdown(wait=True)
        if self.disk is not None:
            path = self.disk.path
            self.disk.close()
            if not self.config.disk_persist:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _result(future: Future) -> list[bool] | None:
    try:
        return future.result()
    except Exception:
        logger.exception("kvbm: disk transfer failed")
        return None
