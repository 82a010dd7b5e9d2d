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
  vLLM recomputes);
* in-step loads from the host tier may land layer by layer (``layer_order``
  in :meth:`PlanRunner.start_step`): the forward pass calls
  :meth:`PlanRunner.wait_layer` before each attention layer, and the step's
  stores (or, without a forward pass, the step's results) first end them, so
  every layer has landed before anything else reads G1.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
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
        #: This step's in-step loads land layer by layer, until end_layers.
        self._layers_open = False
        self._layered_ops: list[LoadOp] = []  # this step's loads that land layer by layer
        #: Steps whose in-step loads landed layer by layer (for tests and logs).
        self.layered_steps = 0

    def check(self, capacities: Mapping[str, int]) -> None:
        """The leader's tier sizes must be this rank's."""
        if dict(capacities) != self.capacities:
            raise RuntimeError(
                f"kvbm: the leader sized the tiers at {capacities} blocks but this worker at "
                f"{self.capacities}; start all processes with the same kvbm settings"
            )

    def _submit(self, job: _Job, src: Blocks, dst: Blocks, now: bool = False, layered: bool = False) -> None:
        self._next_job += 1
        self._jobs[self._next_job] = job
        self.executor.submit(self._next_job, src, dst, now=now, layered=layered)

    # ---- per step -------------------------------------------------------
    def start_step(self, plan: StepPlan, layer_order: Sequence[int] | None = None) -> None:
        """Before the forward pass: the spills (they read committed blocks) and the loads.
        ``layer_order``: in-step loads from the host tier land layer by layer, layers (indices
        into the layout) in this order, and the forward pass calls :meth:`wait_layer` before
        each attention layer; None: the forward pass waits for whole loads."""
        self.end_layers()
        if plan.fence_stores:
            # An earlier store read blocks of a sliding-window group, which vLLM frees while the
            # request runs, and this step gives one of them to another request: its forward pass
            # (and the loads below) must not write the block before the store has read it.
            self.executor.fence_stores()
        layered = layer_order is not None and any(op.sync for op in plan.loads)
        self._layered_ops = [op for op in plan.loads if op.sync] if layered else []
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
                             Blocks(G1, gpu), now=op.sync, layered=layered and op.sync)
                offset += len(part.slots)
        if layered:
            assert layer_order is not None
            self.executor.start_layers(layer_order)
            self._layers_open = True
            self.layered_steps += 1
        if any(op.sync for op in plan.loads):
            # Land the in-step loads now (a medium's verified blocks are scattered when polled)
            # and see a copy that failed to start: its blocks are reported invalid in this
            # step's output, and vLLM recomputes them.
            self.poll()
            if not layered:
                self.executor.fence()  # the forward pass waits for the copies, not the CPU

    @property
    def layered(self) -> bool:
        """This step's in-step loads land layer by layer."""
        return bool(self._layered_ops)

    def wait_layer(self, layer: int | None) -> None:
        """Before an attention layer (``layer``: its index in the layout; None: a layer kvbm
        does not know, which waits for every layer)."""
        if not self._layers_open:
            return
        if layer is None:
            self.end_layers()
        else:
            self.executor.wait_layer(layer)

    def fail_layers(self) -> None:
        """Some attention layer of this step ran without waiting for its layer-wise loads: they
        count as failed (vLLM discards what the step computed on them and recomputes them), and
        the step's stores are dropped."""
        for op in self._layered_ops:
            self._report.failed_loads.add(op.req_id)
            self._load_error_blocks.update(op.gpu_blocks)
            self._poisoned = True
        self._layered_ops = []

    def end_layers(self) -> None:
        """Every layer of this step's layer-wise loads lands before what comes next (on CUDA
        the compute stream waits; nothing blocks the CPU); a failed one poisons the store."""
        if self._layers_open:
            self._layers_open = False
            self.executor.fence()
            self.poll()

    def store(self, plan: StepPlan) -> None:
        """After the forward pass: the blocks this step filled, G1 → the first tier."""
        self.end_layers()  # the stores read G1 after every loaded layer (and see failed loads)
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
        self.end_layers()  # a step without a forward pass (no store) ends its loads here
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
