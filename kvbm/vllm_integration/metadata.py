"""What travels between kvbm's leader and workers through vLLM each step: the plan and
the report of :mod:`kvbm.core.plan`, wrapped in vLLM's connector metadata types."""

from __future__ import annotations

from dataclasses import dataclass

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvbm.core.plan import StepPlan, WorkerReport


@dataclass
class KvbmMetadata(KVConnectorMetadata):
    """Leader → workers: the step's loads, stores and spills."""

    plan: StepPlan
    #: The leader's tier sizes (tier -> blocks); every worker checks it sized its own alike.
    capacities: dict[str, int]


@dataclass
class KvbmWorkerMetadata(WorkerReport, KVConnectorWorkerMetadata):
    """Workers → leader: one rank's :class:`WorkerReport`. vLLM aggregates one per
    worker; counts add up, and the leader makes a batch visible only once all ranks
    have reported it."""

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvbmWorkerMetadata:
        assert isinstance(other, KvbmWorkerMetadata)
        return KvbmWorkerMetadata(**self.merged(other))
