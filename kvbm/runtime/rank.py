"""One tensor-parallel rank's kvbm, without vLLM: the counterpart of :class:`~kvbm.runtime.leader.LeaderRuntime`.

The KV cache registration starts the rank's boot (:class:`kvbm.runtime.worker.WorkerBoot`:
handshake, then tiers), and from the first step on every call goes to the rank's
:class:`kvbm.transfer.runner.PlanRunner`, which runs the leader's plan through the transfer
executor and reports back (store batches through the step's report, loads through the engine's
finished-receiving set). Whether a step's in-step loads land layer by layer is
:class:`kvbm.runtime.layers.LayerHooks`' call. The vLLM adapter
(:mod:`kvbm.vllm_integration.worker`) only reads the rank from vLLM's config and wraps the report.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from kvbm.config import KvbmConfig
from kvbm.core.plan import StepPlan, WorkerReport
from kvbm.runtime.layers import LayerHooks, hooks_run
from kvbm.runtime.worker import RankInfo, WorkerBoot
from kvbm.transfer.layout import describe_kv_caches
from kvbm.transfer.runner import PlanRunner

logger = logging.getLogger(__name__)

__all__ = ["WorkerRuntime"]


class WorkerRuntime:
    def __init__(self, config: KvbmConfig, info: RankInfo) -> None:
        self.config = config
        self.info = info
        self._boot: WorkerBoot | None = None  # from register_kv_caches until the first step
        self._runner: PlanRunner | None = None  # from the first step on
        self._hooks = LayerHooks((), (), enabled=False)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layout, views = describe_kv_caches(kv_caches, self.info.num_gpu_blocks)
        logger.info("kvbm worker: KV layout %s", layout.describe())
        mode = self.config.layerwise_loads
        self._hooks = LayerHooks([layer.name for layer in layout.layers], kv_caches,
                                 enabled=mode == "on" or (mode == "auto" and views[0].is_cuda))
        # vLLM builds the scheduler (our leader) only after every worker has
        # registered and warmed up: never block here. The first step waits.
        self._boot = WorkerBoot(self.config, self.info, layout, views)

    @property
    def runner(self) -> PlanRunner:
        """The rank's plan runner, built at the first step that needs it."""
        if self._runner is None:
            if self._boot is None:
                raise RuntimeError("kvbm: vLLM ran a step before registering its KV caches")
            self._runner, self._boot = self._boot.wait(), None
        return self._runner

    def handle_preemptions(self, plan: StepPlan) -> None:
        if plan.drain_stores:
            self.runner.drain()

    def start_load(self, plan: StepPlan, capacities: dict[str, int], forward_context: Any) -> None:
        """Every step, empty ones included: start the step's loads, and the plan's work that
        does not depend on this step's forward pass (spills read committed blocks). vLLM
        before 0.31 skips ``wait_for_save`` on steps without a forward pass, so work left
        for :meth:`save` would be lost there; only stores of blocks this step computes wait
        for it, and an empty step computes none. ``capacities``: the leader's tier sizes."""
        self.runner.check(capacities)
        self.runner.start_step(plan, self._hooks.begin_step(hooks_run(forward_context)))

    def wait_for_layer_load(self, layer_name: str) -> None:
        index = self._hooks.hooked(layer_name)
        if self._runner is not None:
            self._runner.wait_layer(index)

    def save(self, plan: StepPlan) -> None:
        """After the forward pass: store the blocks this step filled."""
        if self._hooks.end_step(self.runner.layered):
            self.runner.fail_layers()
        self.runner.store(plan)

    # Asked every step after the forward pass; nothing to say before the first step.
    def transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished sending, finished receiving, failed receiving) since the last call."""
        return self._runner.results() if self._runner is not None else (set(), set(), set())

    def load_error_blocks(self) -> set[int]:
        return self._runner.load_error_blocks() if self._runner is not None else set()

    def take_report(self) -> WorkerReport | None:
        return self._runner.take_report() if self._runner is not None else None

    def shutdown(self) -> None:
        if self._boot is not None:
            self._boot.close()
        if self._runner is not None:
            self._runner.close()
