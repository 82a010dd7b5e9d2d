"""What travels between kvbm's leader and workers through vLLM each step."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)

from kvbm.core.planner import StepPlan


@dataclass
class KvbmMetadata(KVConnectorMetadata):
    """Leader → workers: the step's loads and stores."""

    plan: StepPlan
    #: The leader's G2/G3 sizes; every worker checks it sized its own alike.
    num_host_slots: int
    num_disk_slots: int = 0


@dataclass
class KvbmWorkerMetadata(KVConnectorWorkerMetadata):
    """Workers → leader: which store batches completed (or failed) this step.

    vLLM aggregates one of these per worker; counts add up, and the leader
    makes a batch visible only once all ranks have reported it.
    """

    stored: dict[int, int] = field(default_factory=dict)
    failed_batches: set[int] = field(default_factory=set)
    #: G3 slots that failed verification or I/O on read: the leader drops them.
    bad_disk_slots: set[int] = field(default_factory=set)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvbmWorkerMetadata:
        assert isinstance(other, KvbmWorkerMetadata)
        stored = dict(self.stored)
        for batch_id, count in other.stored.items():
            stored[batch_id] = stored.get(batch_id, 0) + count
        return KvbmWorkerMetadata(
            stored=stored,
            failed_batches=self.failed_batches | other.failed_batches,
            bad_disk_slots=self.bad_disk_slots | other.bad_disk_slots,
        )
