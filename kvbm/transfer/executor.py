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
* a block medium → G1: the medium reads into pool rows on its thread(s), in
  chunks of at most :data:`LOAD_CHUNK_ROWS` rows that take rows as they free up
  (a load larger than the pool streams through it, and its reads overlap the
  scatters of its earlier chunks); once polled, the verified prefix of each
  chunk is scattered into the GPU blocks by the pool's engine, in order, and
  the job completes when its last scatter did (an in-step load, read whole on
  the caller's thread and ordered before the forward pass by
  :meth:`TransferExecutor.fence`, completes when its scatter is issued; one the
  pool has no free rows for takes the old path: fresh pageable rows copied
  through staging rows on the caller's thread);
* the host tier ↔ a block medium (G2 → G3 spills): the medium reads or writes
  the host tier's rows directly (the leader keeps them pinned meanwhile);
* a block medium → another (G3 → G4): read into fresh rows, then written.

So a new tier is a new :class:`~kvbm.transfer.media.BlockMedium` under a new
name; nothing here changes. Each medium has threads of its own (a slow network
store never waits behind the disk): one, or ``jobs_at_once`` where the medium
sets it (a disk file: two, so that its I/O threads go on to the next job's reads
while one job's last reads finish). Jobs report what moved: a load may land
a verified prefix of its blocks (``moved``) and name the source slots that
failed verification (``bad``), which the leader drops.

In-step loads from the host tier may land layer by layer (``layered``; see
:mod:`kvbm.transfer.engine`): they are issued together by :meth:`TransferExecutor.start_layers`,
the forward pass waits per layer (:meth:`TransferExecutor.wait_layer`), and
:meth:`TransferExecutor.fence` ends them.

Timing: the copy engines time their own copies; a medium's job is timed on
its thread (a chunked load: the union of its chunks' reads).
``seconds`` is what a bandwidth metric divides by.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvbm.core.hashing import BlockHash
from kvbm.core.tiers import G1
from kvbm.storage.host import HostArena, make_host_arena_buffer
from kvbm.transfer.factory import make_copy_engine
from kvbm.transfer.layout import KVLayout
from kvbm.transfer.media import BlockMedium

logger = logging.getLogger(__name__)

__all__ = ["Blocks", "Done", "TransferExecutor", "STAGING_ROWS", "STAGING_BYTES", "POOL_ROWS", "POOL_BYTES",
           "LOAD_CHUNK_ROWS", "LOAD_CHUNK_BYTES"]

#: Staging rows between G1 and the block media for jobs the row pool cannot take: at most
#: this many blocks or bytes.
STAGING_ROWS = 64
STAGING_BYTES = 256 << 20
#: The row pool between G1 and the block media: at most this many blocks or bytes.
POOL_ROWS = 4096
POOL_BYTES = 512 << 20
#: A load from a block medium into G1 moves through the pool in chunks of at most this many
#: rows or bytes, each read by one medium call and scattered as soon as it (and every chunk
#: before it) verified. A 256-block job of 2 MiB blocks once took the whole 512 MiB pool and
#: read it all before scattering any (0.65-0.71 of raw reads, ``bench/disk.py --executor``);
#: in chunks its reads overlap its scatters and the next job's reads start as rows free up.
LOAD_CHUNK_ROWS = 64
LOAD_CHUNK_BYTES = 64 << 20


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
        self.rows = rows
        self._free = list(range(rows - 1, -1, -1))  # descending: pop() gives the lowest row
        self._row_views = list(self.arena.buffer.numpy())  # a numpy view per row, made once (µs each)

    def take(self, n: int) -> list[int] | None:
        """``n`` free rows, or None (a store then takes the unpooled path, a load's chunk waits)."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def give(self, rows: Sequence[int]) -> None:
        if rows:
            self._free.extend(rows)
            self._free.sort(reverse=True)

    @property
    def free(self) -> int:
        return len(self._free)

    def buffers(self, rows: Sequence[int]) -> list:
        return [self._row_views[row] for row in rows]

    def close(self) -> None:
        self.engine.drain()
        self.engine.close()


@dataclass
class _Chunk:
    """Part of a pooled load: ``count`` blocks from ``start``, read into ``rows`` by one medium call."""

    start: int
    count: int
    rows: list[int] = field(default_factory=list)
    future: Future | None = None  # the medium's read, once started
    ok: list[bool] | None = None  # per block, once read


@dataclass
class _PoolLoad:
    """A load from a medium into G1 through pool rows, chunk by chunk (see the module doc).

    Chunks start in order as rows free up (the job's reads are then in flight), land in order
    (the verified prefix of each is scattered once every chunk before it verified whole), and
    the job is done when every chunk started has landed and no scatter is in flight. After a
    block fails, no further chunk starts and none scatters: vLLM recomputes from that block."""

    job_id: int
    src: Blocks
    dst: Blocks
    chunks: list[_Chunk]
    now: bool = False
    started: int = 0  # chunks started (read in flight or done)
    landed: int = 0  # chunks scattered or dropped, in order
    good: int = 0  # the verified prefix that was scattered
    failed: bool = False  # a block of the prefix did not verify: start and scatter no further
    scatter_failed_at: int | None = None  # the first block of a chunk whose scatter failed
    verified: int = 0  # blocks read and verified (bytes moved)
    bad: list[int] = field(default_factory=list)  # source slots that failed
    reads: list[tuple[float, float]] = field(default_factory=list)  # (start, end) of each chunk's read
    scatters: int = 0  # scatters in flight
    reported: bool = False  # an in-step load's Done went out when its scatter was issued

    def finished(self) -> bool:
        return (self.landed == self.started and not self.scatters
                and (self.failed or self.started == len(self.chunks)))

    def done(self, block_bytes: int) -> Done:
        moved = self.good if self.scatter_failed_at is None else min(self.good, self.scatter_failed_at)
        n = len(self.src.ids)
        return Done(self.job_id, moved == n, self.verified * block_bytes, self.seconds(), moved, tuple(self.bad))

    def seconds(self) -> float:
        """The time the medium spent reading the load: the union of its chunks' reads (two may
        overlap; waiting for rows between them is not the medium's time)."""
        total, end = 0.0, float("-inf")
        for start, stop in sorted(self.reads):
            if stop > end:
                total += stop - max(start, end)
                end = stop
        return total


@dataclass
class _PoolJob:
    """A job from G1 to a medium through pool rows: gather → write."""

    job_id: int
    src: Blocks
    dst: Blocks
    rows: list[int]
    stage: str  # "gather", "write"
    future: Future | None = None


@dataclass
class _IoJob:
    job_id: int
    src: Blocks
    dst: Blocks
    rows: torch.Tensor | None  # fresh host rows of a job from or to G1 (None: the host tier's own rows)
    future: Future  # -> (per-block ok, start, end)


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
        self._pooled: dict[int, _PoolJob] = {}  # G1 -> medium jobs through the pool, by job id
        self._loads: dict[int, _PoolLoad] = {}  # medium -> G1 jobs through the pool, by job id
        # per medium: the loads with chunks still to start, in submission order
        self._waiting: dict[str, collections.deque[_PoolLoad]] = {name: collections.deque() for name in self.media}
        # chunk reads that finished, appended by the medium's threads (deque.append is atomic): a poll
        # costs what finished, not what is in flight (the benchmark has 64 jobs in flight at 128 KiB)
        self._read_done: collections.deque[tuple[_PoolLoad, _Chunk]] = collections.deque()
        self._scatters: dict[int, tuple[_PoolLoad, _Chunk]] = {}  # the pool engine's key of each scatter
        self._gathers: dict[int, _PoolJob] = {}  # the pool engine's key of each gather
        self._keys = itertools.count()  # the pool engine's keys (its own: job ids are the caller's)
        self._jobs_at_once = {name: max(1, int(getattr(medium, "jobs_at_once", 1)))
                              for name, medium in self.media.items()}
        self._threads = {name: ThreadPoolExecutor(max_workers=self._jobs_at_once[name],
                                                  thread_name_prefix=f"kvbm-{name.lower()}")
                         for name in self.media}
        self._reading = dict.fromkeys(self.media, 0)  # chunk reads started and not yet collected, per medium
        # a chunk never needs more rows than the pool has (it would wait for ever)
        self._chunk_rows = max(1, min(LOAD_CHUNK_ROWS, LOAD_CHUNK_BYTES // self.block_bytes,
                                      self._pool.rows if self._pool is not None else 1))
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
        if dst.tier == G1 and self._pool is not None and not now:
            self._submit_load(_PoolLoad(job_id, src, dst, [
                _Chunk(start, min(self._chunk_rows, n - start)) for start in range(0, n, self._chunk_rows)]))
            return
        if G1 in (src.tier, dst.tier) and self._pool is not None:
            pool_rows = self._pool.take(n)
            if pool_rows is not None:
                if dst.tier == G1:  # an in-step load: one chunk, read here and now
                    self._submit_load(_PoolLoad(job_id, src, dst, [_Chunk(0, n, pool_rows)], now=True))
                    return
                job = self._pooled[job_id] = _PoolJob(job_id, src, dst, pool_rows, "gather")
                key = next(self._keys)
                self._gathers[key] = job
                self._pool.engine.store(key, list(src.ids), pool_rows)
                self._pool_completions(self._done)  # a synchronous engine (CPU) gathered already: write now
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
        self._io.append(_IoJob(job_id, src, dst, rows, self._run(work, dst.tier if dst.tier in self.media else src.tier,
                                                                 now)))

    def _submit_load(self, load: _PoolLoad) -> None:
        """Queue a pooled load; its chunks start as rows free up (an in-step one: at once, here)."""
        if not load.chunks:
            self._done.append(load.done(self.block_bytes))
            return
        self._loads[load.job_id] = load
        if load.now:
            self._start_chunk(load, load.chunks[0])
        else:
            self._waiting[load.src.tier].append(load)
            self._start_chunks()

    def _start_chunks(self) -> None:
        """Start the queued chunks of the pooled loads, oldest job first, while rows are free and
        the medium has fewer than twice as many reads started as it runs jobs at once (so its
        threads go from one read to the next between two polls, and the rest of the pool stays
        free for stores and the scatters of what was read)."""
        assert self._pool is not None
        for tier, waiting in self._waiting.items():
            while waiting and self._reading[tier] < 2 * self._jobs_at_once[tier]:
                load = waiting[0]
                if load.failed or load.started == len(load.chunks):
                    waiting.popleft()  # every chunk started, or none will (a block failed)
                    continue
                chunk = load.chunks[load.started]
                rows = self._pool.take(chunk.count)
                if rows is None:
                    return  # in order: a later job does not overtake one that waits for rows
                chunk.rows = rows
                self._start_chunk(load, chunk)

    def _start_chunk(self, load: _PoolLoad, chunk: _Chunk) -> None:
        assert self._pool is not None
        end = chunk.start + chunk.count
        src = Blocks(load.src.tier, load.src.ids[chunk.start : end], load.src.hashes[chunk.start : end])
        work = self._work(src, load.dst, None, self._pool.buffers(chunk.rows))
        load.started += 1
        self._reading[load.src.tier] += 1
        chunk.future = self._run(work, load.src.tier, load.now)
        chunk.future.add_done_callback(lambda _, load=load, chunk=chunk: self._read_done.append((load, chunk)))

    def _run(self, work: Callable[[], tuple[list[bool], float, float]], tier: str, now: bool) -> Future:
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
              buffers: list | None = None) -> Callable[[], tuple[list[bool], float, float]]:
        """What runs on the medium's thread: read the source medium and/or write the destination.
        Returns per-block success and when it started and ended (``time.perf_counter``)."""
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

        def work() -> tuple[list[bool], float, float]:
            start = time.perf_counter()
            ok = [True] * len(buffers)
            if reader is not None:
                ok = reader.read(src.ids, src.hashes, buffers)
                if len(ok) != len(buffers):
                    raise RuntimeError(f"{src.tier} answered {len(ok)} of {len(buffers)} blocks")
            if writer is not None:
                # A copy between tiers is stored whole or not at all (the leader commits batches).
                ok = writer.write(dst.ids, dst.hashes, buffers) if all(ok) else [False] * len(buffers)
            return ok, start, time.perf_counter()

        return work

    def poll(self) -> list[Done]:
        """Jobs finished since the last poll; never blocks. Scatters finished medium reads into G1."""
        done, self._done = self._done, []
        if self._pooled or self._loads:
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
        """Advance the pooled jobs: engine completions, finished writes, finished chunk reads
        (scattered in order), then start the chunks that rows were freed for; then the
        completions of the copies started here (synchronous on CPU)."""
        assert self._pool is not None
        self._pool_completions(done)
        for job in list(self._pooled.values()):
            if job.future is None or not job.future.done():
                continue
            n = len(job.src.ids)
            ok, span = self._outcome(job.future, n, job.src.tier, job.dst.tier)
            seconds = self._seconds(span)
            job.future = None
            self._end(job)
            done.append(Done(job.job_id, all(ok), sum(ok) * self.block_bytes, seconds, sum(ok)))
        landed: dict[int, _PoolLoad] = {}
        while self._read_done:
            load, chunk = self._read_done.popleft()
            self._collect(load, chunk)
            landed[load.job_id] = load
        for load in landed.values():
            self._land(load, done)
        self._start_chunks()
        self._pool_completions(done)
        for load in landed.values():
            self._finish_load(load, done)

    def _outcome(self, future: Future, n: int, src: str, dst: str) -> tuple[list[bool], tuple[float, float] | None]:
        """A finished medium call's per-block success and (start, end); all failed and None if it raised."""
        try:
            ok, start, end = future.result()
        except Exception:
            logger.exception("kvbm: %s -> %s transfer failed", src, dst)
            return [False] * n, None
        return ok, (start, end)

    @staticmethod
    def _seconds(span: tuple[float, float] | None) -> float:
        return span[1] - span[0] if span is not None else 0.0

    def _collect(self, load: _PoolLoad, chunk: _Chunk) -> None:
        """A chunk's read finished: its per-block outcome, for :meth:`_land`."""
        assert chunk.future is not None
        end = chunk.start + chunk.count
        chunk.ok, span = self._outcome(chunk.future, chunk.count, load.src.tier, G1)
        if span is not None:
            load.reads.append(span)
        chunk.future = None
        self._reading[load.src.tier] -= 1
        load.verified += sum(chunk.ok)
        load.bad.extend(slot for slot, fine in zip(load.src.ids[chunk.start : end], chunk.ok) if not fine)

    def _land(self, load: _PoolLoad, done: list[Done]) -> None:
        """Land the load's read chunks in order: each chunk's verified prefix is scattered (none
        once a block failed) and its other rows go back to the pool."""
        assert self._pool is not None
        while load.landed < load.started and load.chunks[load.landed].ok is not None:
            chunk = load.chunks[load.landed]
            load.landed += 1
            assert chunk.ok is not None
            good = 0 if load.failed else (chunk.ok.index(False) if False in chunk.ok else chunk.count)
            self._pool.give(chunk.rows[good:])
            chunk.rows = chunk.rows[:good]
            if good < chunk.count:
                load.failed = True  # vLLM recomputes from the first block that did not verify
            if not good:
                continue
            load.good += good
            key = next(self._keys)
            self._scatters[key] = (load, chunk)
            load.scatters += 1
            self._pool.engine.load(key, chunk.rows, list(load.dst.ids[chunk.start : chunk.start + good]))
        if load.now and not load.reported and load.landed == load.started:
            # the forward pass of this step is ordered after the scatter (fence)
            load.reported = True
            done.append(load.done(self.block_bytes))

    def _finish_load(self, load: _PoolLoad, done: list[Done]) -> None:
        """Report the load if it is finished (once: later calls for it do nothing)."""
        if load.finished() and self._loads.pop(load.job_id, None) is not None and not load.reported:
            done.append(load.done(self.block_bytes))

    def _pool_completions(self, done: list[Done]) -> None:
        assert self._pool is not None
        for c in self._pool.engine.poll():
            scatter = self._scatters.pop(c.key, None)
            if scatter is not None:  # a chunk scattered: its rows are free again
                load, chunk = scatter
                if not c.ok and (load.scatter_failed_at is None or chunk.start < load.scatter_failed_at):
                    load.scatter_failed_at = chunk.start
                self._pool.give(chunk.rows)
                chunk.rows = []
                load.scatters -= 1
                self._finish_load(load, done)
                continue
            job = self._gathers.pop(c.key, None)
            if job is None:
                continue
            if not c.ok:  # a gather failed
                self._end(job)
                done.append(Done(job.job_id, False))
                continue
            job.stage = "write"
            job.future = self._run(self._work(job.src, job.dst, None, self._pool.buffers(job.rows)),
                                   job.dst.tier, False)

    def _end(self, job: _PoolJob) -> None:
        assert self._pool is not None
        self._pool.give(job.rows)
        job.rows = []
        del self._pooled[job.job_id]

    def _finish(self, job: _IoJob) -> Done:
        n = len(job.src.ids)
        ok, span = self._outcome(job.future, n, job.src.tier, job.dst.tier)
        seconds = self._seconds(span)
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
