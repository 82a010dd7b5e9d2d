"""One transfer executor per worker rank: every copy between tiers behind one job interface.

In the style of vLLM's offloading handlers: the caller submits a job
``submit(job_id, src, dst)`` (blocks of one tier to blocks of another) and
later collects ``poll() -> [Done(job_id, ok, nbytes, seconds)]``; nothing
here blocks the engine step on a slow tier. The executor picks the mover
from the two tiers:

* G1 ↔ the host tier (G2): the copy engine (CUDA streams on GPUs, ``copy_`` on
  CPU), one gather or scatter per layer per batch;
* G1 → a block medium (G3 in disk-only mode): the GPU blocks are gathered
  into rows of the *row pool* (pinned host rows with a copy engine of their
  own) asynchronously; once the engine reports the gather complete, the medium
  writes the rows on its own thread;
* a block medium → G1: the medium reads into pool rows on its thread; once
  polled, the verified prefix is scattered into the GPU blocks by the pool's
  engine, and the job completes when the scatter did (an in-step load, whose
  forward pass is ordered after the scatter by :meth:`TransferExecutor.fence`,
  completes when the scatter is issued). A job the pool has no free rows for
  takes the old path: fresh pageable rows copied through staging rows on the
  caller's thread;
* the host tier ↔ a block medium (G2 → G3 spills): the medium reads or writes
  the host tier's rows directly (the leader keeps them pinned meanwhile);
* a block medium → another (G3 → G4): read into fresh rows, then written.

So a new tier is a new :class:`~kvbm.transfer.media.BlockMedium` under a new
name; nothing here changes. Each medium has one I/O thread (a slow network
store never waits behind the disk). Jobs report what moved: a load may land
a verified prefix of its blocks (``moved``) and name the source slots that
failed verification (``bad``), which the leader drops.

In-step loads from the host tier may land layer by layer (``layered``; see
:mod:`kvbm.transfer.engine`): they are issued together by :meth:`TransferExecutor.start_layers`,
the forward pass waits per layer (:meth:`TransferExecutor.wait_layer`), and
:meth:`TransferExecutor.fence` ends them.

Timing: the copy engines time their own copies; a medium's job is timed on
its thread. ``seconds`` is what a bandwidth metric divides by.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from kvbm.core.hashing import BlockHash
from kvbm.core.tiers import G1
from kvbm.storage.host import HostArena, make_host_arena_buffer
from kvbm.transfer.factory import make_copy_engine
from kvbm.transfer.layout import KVLayout
from kvbm.transfer.media import BlockMedium

logger = logging.getLogger(__name__)

__all__ = ["Blocks", "Done", "TransferExecutor", "STAGING_ROWS", "STAGING_BYTES", "POOL_ROWS", "POOL_BYTES"]

#: Staging rows between G1 and the block media for jobs the row pool cannot take: at most
#: this many blocks or bytes.
STAGING_ROWS = 64
STAGING_BYTES = 256 << 20
#: The row pool between G1 and the block media: at most this many blocks or bytes.
POOL_ROWS = 4096
POOL_BYTES = 512 << 20


@dataclass(frozen=True)
class Blocks:
    """One side of a job: blocks of one tier (G1 block ids, or the tier's slots)."""

    tier: str
    ids: Sequence[int]
    #: The blocks' hashes, for a medium that verifies them or is keyed by them.
    hashes: Sequence[BlockHash] = ()


@dataclass(frozen=True)
class Done:
    """A finished job."""

    job_id: int
    ok: bool  # every block moved
    nbytes: int = 0  # bytes the mover moved
    seconds: float = 0.0  # time the mover spent on it
    moved: int = 0  # blocks that moved (into G1: the verified prefix that landed)
    bad: tuple[int, ...] = ()  # source slots that failed verification or I/O


class _Staging:
    """Host rows between G1 and the block media, with a copy engine of their own
    (pinned on GPUs), built once: engines compile kernels and allocate at construction."""

    def __init__(self, layout: KVLayout, views: list[torch.Tensor]) -> None:
        rows = max(1, min(STAGING_ROWS, STAGING_BYTES // layout.block_bytes))
        on_gpu = bool(views) and views[0].is_cuda
        self.rows = HostArena.wrap(make_host_arena_buffer(rows, layout.block_bytes, on_gpu))
        self.engine = make_copy_engine(layout, views, self.rows)

    def copy(self, gpu_blocks: Sequence[int], rows: torch.Tensor, to_gpu: bool) -> bool:
        """Gather GPU blocks into ``rows`` (or scatter ``rows`` into them) now, a staging-full at a time."""
        stage, engine, size = self.rows.buffer, self.engine, self.rows.num_slots
        ok = True
        for start in range(0, len(gpu_blocks), size):
            chunk = list(gpu_blocks[start : start + size])
            n = len(chunk)
            if to_gpu:
                stage[:n].copy_(rows[start : start + n])
                engine.load(0, list(range(n)), chunk)
            else:
                engine.store(0, chunk, list(range(n)))
            engine.drain()
            ok = all(done.ok for done in engine.poll()) and ok
            if not to_gpu:
                rows[start : start + n].copy_(stage[:n])
        return ok

    def close(self) -> None:
        self.engine.drain()
        self.engine.close()


class _RowPool:
    """Pinned host rows for jobs between G1 and the block media, with a copy engine of their own.

    Rows are handed out lowest first, so a job's rows are mostly one run (one copy per layer
    on CPU). The engine is the one G2 uses (CUDA streams and events on GPUs), so a gather or
    scatter never blocks the step thread; its completions say when rows may be reused."""

    def __init__(self, layout: KVLayout, views: list[torch.Tensor]) -> None:
        rows = max(1, min(POOL_ROWS, POOL_BYTES // layout.block_bytes))
        on_gpu = bool(views) and views[0].is_cuda
        self.arena = HostArena.wrap(make_host_arena_buffer(rows, layout.block_bytes, on_gpu))
        # on CPU: copies on the step thread only, leaving the cores to the medium's I/O threads
        self.engine = make_copy_engine(layout, views, self.arena, cpu_parallel=False)
        self._free = list(range(rows - 1, -1, -1))  # descending: pop() gives the lowest row

    def take(self, n: int) -> list[int] | None:
        """``n`` free rows, or None (the caller takes the unpooled path)."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def give(self, rows: Sequence[int]) -> None:
        if rows:
            self._free.extend(rows)
            self._free.sort(reverse=True)

    def buffers(self, rows: Sequence[int]) -> list:
        return [self.arena.buffer[row].numpy() for row in rows]

    def close(self) -> None:
        self.engine.drain()
        self.engine.close()


@dataclass
class _PoolJob:
    """A job between G1 and a medium through pool rows: gather → write, or read → scatter."""

    job_id: int
    src: Blocks
    dst: Blocks
    rows: list[int]
    stage: str  # "gather", "write", "read", "scatter"
    now: bool = False
    future: Future | None = None
    result: Done | None = None  # a scatter's outcome, reported when the scatter completes
    reported: bool = False  # an in-step load's Done went out when its scatter was issued


@dataclass
class _IoJob:
    job_id: int
    src: Blocks
    dst: Blocks
    rows: torch.Tensor | None  # fresh host rows of a job from or to G1 (None: the host tier's own rows)
    future: Future  # -> (per-block ok, seconds)


class TransferExecutor:
    """Moves blocks between G1, the host tier and the block media of one rank.

    ``layout``/``views``: vLLM's KV cache on this rank
    (:func:`kvbm.transfer.layout.describe_kv_caches`). ``host``: the host tier's
    arena, named ``host_tier``. ``media``: the block media by tier name.
    """

    def __init__(self, layout: KVLayout, views: list[torch.Tensor], *, host: HostArena | None = None,
                 host_tier: str = "G2", media: Mapping[str, BlockMedium] | None = None) -> None:
        self.block_bytes = layout.block_bytes
        self.host = host
        self.host_tier = host_tier if host is not None else None
        self.media = dict(media or {})
        self._engine = make_copy_engine(layout, views, host) if host is not None else None
        self._staging = _Staging(layout, views) if self.media else None
        self._pool = _RowPool(layout, views) if self.media else None
        self._pooled: dict[int, _PoolJob] = {}
        self._threads = {name: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"kvbm-{name.lower()}")
                         for name in self.media}
        self._engine_jobs: dict[int, int] = {}  # job id -> blocks, for copy-engine jobs
        self._io: list[_IoJob] = []
        self._done: list[Done] = []
        self._layered: list[tuple[int, list[int], list[int]]] = []  # (job id, slots, blocks) not started

    @property
    def tiers(self) -> list[str]:
        """The tiers this rank holds (besides G1)."""
        return ([self.host_tier] if self.host_tier else []) + list(self.media)

    def submit(self, job_id: int, src: Blocks, dst: Blocks, *, now: bool = False, layered: bool = False) -> None:
        """Start copying ``src`` into ``dst`` (same number of blocks). ``now``: a medium's read
        runs on the caller's thread (the forward pass of this step reads the blocks); the job
        still completes through :meth:`poll`. ``layered``: a host tier → G1 load waits for
        :meth:`start_layers` and lands layer by layer (ignored for other jobs). Raises only for
        caller bugs (an unknown tier, mismatched lengths); a failed copy is a Done with ``ok=False``."""
        n = len(src.ids)
        if n != len(dst.ids):
            raise ValueError(f"job {job_id}: {n} source blocks but {len(dst.ids)} destination blocks")
        for tier in (src.tier, dst.tier):
            if tier != G1 and tier != self.host_tier and tier not in self.media:
                raise ValueError(f"job {job_id}: this rank has no tier {tier!r} (it has {self.tiers})")
        if src.tier == dst.tier:
            raise ValueError(f"job {job_id}: {src.tier} to itself")
        for side in (src, dst):
            if side.tier in self.media and len(side.hashes) != n:
                raise ValueError(f"job {job_id}: {side.tier} blocks need their hashes ({len(side.hashes)} for {n})")
        if {src.tier, dst.tier} == {G1, self.host_tier}:
            assert self._engine is not None
            self._engine_jobs[job_id] = n
            if src.tier == G1:
                self._engine.store(job_id, list(src.ids), list(dst.ids))
            elif layered:
                self._layered.append((job_id, list(src.ids), list(dst.ids)))
            else:
                self._engine.load(job_id, list(src.ids), list(dst.ids))
            return
        if G1 in (src.tier, dst.tier) and self._pool is not None:
            pool_rows = self._pool.take(n)
            if pool_rows is not None:
                self._submit_pooled(_PoolJob(job_id, src, dst, pool_rows, "gather" if src.tier == G1 else "read",
                                             now=now))
                return
        rows = None  # host rows of the job: fresh ones unless one side is the host tier
        if self.host_tier not in (src.tier, dst.tier):
            rows = torch.empty((n, self.block_bytes), dtype=torch.uint8)
        if src.tier == G1:
            assert self._staging is not None and rows is not None
            if not self._staging.copy(src.ids, rows, to_gpu=False):
                self._done.append(Done(job_id, False))
                return
        work = self._work(src, dst, rows)
        thread = self._threads[dst.tier if dst.tier in self.media else src.tier]
        if now:
            future: Future = Future()
            try:
                future.set_result(work())
            except Exception as exc:
                future.set_exception(exc)
        else:
            future = thread.submit(work)
        self._io.append(_IoJob(job_id, src, dst, rows, future))

    def _submit_pooled(self, job: _PoolJob) -> None:
        """Start a pooled job: the gather on the pool's engine, or the read on the medium."""
        assert self._pool is not None
        self._pooled[job.job_id] = job
        if job.stage == "gather":
            self._pool.engine.store(job.job_id, list(job.src.ids), job.rows)
            self._pool_completions(self._done)  # a synchronous engine (CPU) gathered already: write now
            return
        work = self._work(job.src, job.dst, None, self._pool.buffers(job.rows))
        job.future = self._run(work, job.src.tier, job.now)

    def _run(self, work: Callable[[], tuple[list[bool], float]], tier: str, now: bool) -> Future:
        """``work`` on the tier's I/O thread, or here and now."""
        if not now:
            return self._threads[tier].submit(work)
        future: Future = Future()
        try:
            future.set_result(work())
        except Exception as exc:
            future.set_exception(exc)
        return future

    def _work(self, src: Blocks, dst: Blocks, rows: torch.Tensor | None,
              buffers: list | None = None) -> Callable[[], tuple[list[bool], float]]:
        """What runs on the medium's thread: read the source medium and/or write the destination."""
        if buffers is not None:
            pass  # pool rows
        elif rows is not None:
            buffers = [row.numpy() for row in rows]
        else:  # the host tier's own rows
            assert self.host is not None
            host_ids = src.ids if src.tier == self.host_tier else dst.ids
            buffers = [self.host.buffer[slot].numpy() for slot in host_ids]
        reader = self.media.get(src.tier)
        writer = self.media.get(dst.tier)

        def work() -> tuple[list[bool], float]:
            start = time.perf_counter()
            ok = [True] * len(buffers)
            if reader is not None:
                ok = reader.read(src.ids, src.hashes, buffers)
                if len(ok) != len(buffers):
                    raise RuntimeError(f"{src.tier} answered {len(ok)} of {len(buffers)} blocks")
            if writer is not None:
                # A copy between tiers is stored whole or not at all (the leader commits batches).
                ok = writer.write(dst.ids, dst.hashes, buffers) if all(ok) else [False] * len(buffers)
            return ok, time.perf_counter() - start

        return work

    def poll(self) -> list[Done]:
        """Jobs finished since the last poll; never blocks. Scatters finished medium reads into G1."""
        done, self._done = self._done, []
        if self._pooled:
            self._poll_pool(done)
        if self._engine is not None:
            for c in self._engine.poll():
                n = self._engine_jobs.pop(c.key, 0)
                done.append(Done(c.key, c.ok, n * self.block_bytes if c.ok else 0, c.seconds, n if c.ok else 0))
        still = []
        for job in self._io:
            if job.future.done():
                done.append(self._finish(job))
            else:
                still.append(job)
        self._io = still
        return done

    def _poll_pool(self, done: list[Done]) -> None:
        """Advance the pooled jobs: engine completions, then finished medium work, then the
        completions of copies that work started (synchronous on CPU)."""
        assert self._pool is not None
        self._pool_completions(done)
        started = False
        for job in list(self._pooled.values()):
            if job.future is None or not job.future.done():
                continue
            n = len(job.src.ids)
            try:
                ok, seconds = job.future.result()
            except Exception:
                logger.exception("kvbm: %s -> %s transfer failed", job.src.tier, job.dst.tier)
                ok, seconds = [False] * n, 0.0
            job.future = None
            if job.stage == "write":  # G1 → medium, written
                self._end(job)
                done.append(Done(job.job_id, all(ok), sum(ok) * self.block_bytes, seconds, sum(ok)))
                continue
            # medium → G1, read: the verified prefix lands; vLLM recomputes from the first block that did not
            bad = tuple(slot for slot, fine in zip(job.src.ids, ok) if not fine)
            good = ok.index(False) if False in ok else n
            result = Done(job.job_id, good == n, sum(ok) * self.block_bytes, seconds, good, bad)
            self._pool.give(job.rows[good:])
            job.rows = job.rows[:good]
            if not good:
                self._end(job)
                done.append(result)
                continue
            job.stage, job.result = "scatter", result
            self._pool.engine.load(job.job_id, job.rows, list(job.dst.ids[:good]))
            started = True
            if job.now:  # the forward pass of this step is ordered after the scatter (fence)
                job.reported = True
                done.append(result)
        if started:
            self._pool_completions(done)

    def _pool_completions(self, done: list[Done]) -> None:
        assert self._pool is not None
        for c in self._pool.engine.poll():
            job = self._pooled.get(c.key)
            if job is None:
                continue
            if job.stage == "gather":
                if not c.ok:
                    self._end(job)
                    done.append(Done(job.job_id, False))
                    continue
                job.stage = "write"
                job.future = self._run(self._work(job.src, job.dst, None, self._pool.buffers(job.rows)),
                                       job.dst.tier, False)
                continue
            # a scatter completed: the rows are free again
            self._end(job)
            if not job.reported:
                assert job.result is not None
                r = job.result
                done.append(Done(r.job_id, r.ok and c.ok, r.nbytes, r.seconds, r.moved if c.ok else 0, r.bad))

    def _end(self, job: _PoolJob) -> None:
        assert self._pool is not None
        self._pool.give(job.rows)
        job.rows = []
        del self._pooled[job.job_id]

    def _finish(self, job: _IoJob) -> Done:
        n = len(job.src.ids)
        try:
            ok, seconds = job.future.result()
        except Exception:
            logger.exception("kvbm: %s -> %s transfer failed", job.src.tier, job.dst.tier)
            ok, seconds = [False] * n, 0.0
        bad = tuple(slot for slot, fine in zip(job.src.ids, ok) if not fine) if job.src.tier in self.media else ()
        nbytes = sum(ok) * self.block_bytes
        if job.dst.tier != G1:
            return Done(job.job_id, all(ok), nbytes, seconds, sum(ok), bad)
        # Into G1: the verified prefix lands; vLLM recomputes from the first block that did not.
        good = ok.index(False) if False in ok else n
        assert self._staging is not None and job.rows is not None
        if good and not self._staging.copy(job.dst.ids[:good], job.rows[:good], to_gpu=True):
            good = 0
        return Done(job.job_id, good == n, nbytes, seconds, good, bad)

    def start_layers(self, order: Sequence[int]) -> None:
        """Issue the layered loads submitted since the last call, together, layer by layer (layers
        are indices into the layout, in ``order``: the order the forward pass reaches them)."""
        if self._layered:
            assert self._engine is not None
            self._engine.load_layers(self._layered, order)
            self._layered = []

    def wait_layer(self, layer: int) -> None:
        """The forward pass waits for layer ``layer`` of the layered loads (without blocking the CPU)."""
        if self._engine is not None:
            self._engine.wait_layer(layer)

    def fence(self) -> None:
        """The forward pass waits for every G2 load submitted so far, layered ones included, and
        for every scatter of a medium's load issued so far (without blocking the CPU)."""
        if self._engine is not None:
            self._engine.fence_loads()
        if self._pool is not None:
            self._pool.engine.fence_loads()

    def fence_stores(self) -> None:
        """The next forward pass runs after every store submitted so far has read its GPU blocks
        (without blocking the CPU on CUDA); medium writes read their own host rows."""
        if self._engine is not None:
            self._engine.fence_stores()
        if self._pool is not None:
            self._pool.engine.fence_stores()

    def drain(self) -> None:
        """Block until the copy engines' in-flight copies are done (preemption: their GPU blocks
        may be reused); medium writes read host rows and need no drain."""
        if self._engine is not None:
            self._engine.drain()
        if self._pool is not None:
            self._pool.engine.drain()

    def take_errors(self) -> dict[str, dict[str, int]]:
        """Failures by kind per medium since the last call."""
        return {tier: errors for tier, medium in self.media.items() if (errors := medium.errors())}

    def take_round_trips(self) -> dict[str, list[float]]:
        """Round-trip histograms of the media that measure them (G4) since the last call."""
        out: dict[str, list[float]] = {}
        for medium in self.media.values():
            take = getattr(medium, "round_trips", None)
            if take is not None:
                out.update(take())
        return out

    def close(self) -> None:
        """Finish what is in flight, then release engines, threads and media."""
        if self._engine is not None:
            self._engine.drain()
            self._engine.close()
        if self._staging is not None:
            self._staging.close()
        for thread in self._threads.values():
            thread.shutdown(wait=True)
        if self._pool is not None:
            self._pool.close()
        for medium in self.media.values():
            medium.close()
