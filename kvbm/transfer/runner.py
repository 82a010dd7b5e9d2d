"""A rank's side of a step plan: the leader's loads, stores and spills as executor jobs,
and the jobs' outcomes as the report the leader needs.

Independent of vLLM: the connector's worker calls :meth:`PlanRunner.start_step`
before the forward pass, :meth:`PlanRunner.store` after it, and collects
:meth:`PlanRunner.results` and :meth:`PlanRunner.take_report` every step.

Rules kept here (they hold for every tier):

* a store batch and a spill batch each complete as one unit (the leader
  commits a batch once every rank reported it);
* a load completes when all its parts (one per tier) did; blocks from the
  first one that did not land to the end of the load are reported as load
  errors, and vLLM recomputes them;
* a synchronous (in-step) load that failed poisons the step's store batch:
  blocks computed on top of bad KV are never kept (the leader re-stores what
  vLLM recomputes).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from kvbm.core.plan import LoadOp, StepPlan, WorkerReport
from kvbm.core.tiers import G1, move
from kvbm.transfer.executor import Blocks, Done, TransferExecutor

logger = logging.getLogger(__name__)

__all__ = ["PlanRunner"]


@dataclass
class _Load:
    op: LoadOp
    parts_left: int
    error_blocks: list[int] = field(default_factory=list)


@dataclass
class _Job:
    src: str
    dst: str
    batch_id: int = 0  # a store or spill batch
    load: _Load | None = None  # a load part
    offset: int = 0  # a load part's first block in the load's GPU blocks


class PlanRunner:
    """Runs step plans on one rank; ``capacities``: blocks per tier this rank allocated."""

    def __init__(self, executor: TransferExecutor, capacities: Mapping[str, int]) -> None:
        self.executor = executor
        self.capacities = dict(capacities)
        self._jobs: dict[int, _Job] = {}
        self._next_job = 0
        self._loads: dict[str, _Load] = {}
        self._inflight_stores: set[int] = set()
        self._release_after: dict[str, int] = {}  # req_id -> store batch to wait for
        self._finished_loads: set[str] = set()
        self._failed_loads: set[str] = set()
        self._load_error_blocks: set[int] = set()
        #: A synchronous load failed this step: its store batch is dropped (see store).
        self._poisoned = False
        self._report = WorkerReport()

    def check(self, capacities: Mapping[str, int]) -> None:
        """The leader's tier sizes must be this rank's."""
        if dict(capacities) != self.capacities:
            raise RuntimeError(
                f"kvbm: the leader sized the tiers at {capacities} blocks but this worker at "
                f"{self.capacities}; start all processes with the same kvbm settings"
            )

    def _submit(self, job: _Job, src: Blocks, dst: Blocks, now: bool = False) -> None:
        self._next_job += 1
        self._jobs[self._next_job] = job
        self.executor.submit(self._next_job, src, dst, now=now)

    # ---- per step -------------------------------------------------------
    def start_step(self, plan: StepPlan) -> None:
        """Before the forward pass: the spills (they read committed blocks) and the loads."""
        for spill in plan.spills:
            self._submit(_Job(spill.src, spill.dst, spill.batch_id), Blocks(spill.src, spill.src_slots, spill.hashes),
                         Blocks(spill.dst, spill.dst_slots, spill.hashes))
        for req_id, batch_id in plan.release_after_store:
            self._release_after[req_id] = batch_id
        for op in plan.loads:
            load = self._loads[op.req_id] = _Load(op, parts_left=len(op.parts))
            offset = 0
            for part in op.parts:
                gpu = op.gpu_blocks[offset : offset + len(part.slots)]
                self._submit(_Job(part.tier, G1, load=load, offset=offset), Blocks(part.tier, part.slots, part.hashes),
                             Blocks(G1, gpu), now=op.sync)
                offset += len(part.slots)
        if any(op.sync for op in plan.loads):
            # Land the in-step loads now (a medium's verified blocks are scattered when polled)
            # and see a copy that failed to start: its blocks are reported invalid in this
            # step's output, and vLLM recomputes them.
            self.poll()
            self.executor.fence()  # the forward pass waits for the copies, not the CPU

    def store(self, plan: StepPlan) -> None:
        """After the forward pass: the blocks this step filled, G1 → the first tier."""
        poisoned, self._poisoned = self._poisoned, False
        store = plan.store
        if store is None:
            return
        if poisoned:
            # A synchronous load of this step failed: blocks computed on top of it are
            # suspect. vLLM recomputes them; kvbm keeps none of them (a few misses).
            self._report.failed_batches.add(store.batch_id)
            return
        self._inflight_stores.add(store.batch_id)
        self._submit(_Job(G1, store.tier, store.batch_id), Blocks(G1, store.gpu_blocks),
                     Blocks(store.tier, store.slots, store.hashes))

    def drain(self) -> None:
        """Requests were preempted: in-flight stores read GPU blocks that may be reused."""
        self.executor.drain()

    def poll(self) -> None:
        report = self._report
        for done in self.executor.poll():
            job = self._jobs.pop(done.job_id)
            if done.nbytes:
                report.add_transfer(move(job.src, job.dst), done.nbytes, done.seconds)
            if done.bad:
                report.bad_slots.setdefault(job.src, set()).update(done.bad)
            if job.load is not None:
                self._part_done(job, done)
                continue
            self._inflight_stores.discard(job.batch_id)
            if done.ok:
                report.stored[job.batch_id] = report.stored.get(job.batch_id, 0) + 1
            else:
                report.failed_batches.add(job.batch_id)

    def _part_done(self, job: _Job, done: Done) -> None:
        load = job.load
        assert load is not None
        if not done.ok:  # vLLM recomputes from the first block that did not land
            load.error_blocks.extend(load.op.gpu_blocks[job.offset + done.moved :])
        load.parts_left -= 1
        if load.parts_left > 0:
            return
        op = load.op
        del self._loads[op.req_id]
        if op.sync:  # vLLM scheduled it already; only the leader waits (to unpin slots)
            self._report.sync_loaded[op.req_id] = self._report.sync_loaded.get(op.req_id, 0) + 1
        else:
            self._finished_loads.add(op.req_id)
        if load.error_blocks:
            if op.sync:
                self._poisoned = True
            else:  # vLLM 0.30+ hears of failed asynchronous loads as failed_recving
                self._failed_loads.add(op.req_id)
            self._report.failed_loads.add(op.req_id)
            self._load_error_blocks.update(load.error_blocks)

    # ---- what vLLM and the leader hear ----------------------------------
    def results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call."""
        self.poll()
        released = {r for r, b in self._release_after.items() if b not in self._inflight_stores}
        for req_id in released:
            del self._release_after[req_id]
        loads, self._finished_loads = self._finished_loads, set()
        failed, self._failed_loads = self._failed_loads, set()
        return released, loads, failed

    def load_error_blocks(self) -> set[int]:
        errors, self._load_error_blocks = self._load_error_blocks, set()
        return errors

    def take_report(self) -> WorkerReport | None:
        self._report.errors = self.executor.take_errors()
        self._report.round_trips = self.executor.take_round_trips()
        report, self._report = self._report, WorkerReport()
        return None if report.is_empty() else report

    def close(self) -> None:
        self.executor.close()
