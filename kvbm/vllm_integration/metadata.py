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
    #: Requests whose load failed on this rank (recomputed). vLLM 0.30+ also says so
    #: through failed_recving; older releases only through block ids, so kvbm carries it.
    failed_loads: set[str] = field(default_factory=set)
    #: Synchronous loads whose copies completed on this rank (vLLM does not track them):
    #: the leader unpins their slots once every rank reported.
    sync_loaded: dict[str, int] = field(default_factory=dict)
    #: For metrics (bandwidth per direction, see kvbm.metrics.DIRECTIONS):
    #: bytes this rank copied and seconds it spent copying since its last report.
    transfer_bytes: dict[str, int] = field(default_factory=dict)
    transfer_seconds: dict[str, float] = field(default_factory=dict)
    #: G3 block failures by kind (kvbm.metrics.DISK_ERROR_KINDS) since the last report.
    disk_errors: dict[str, int] = field(default_factory=dict)

    def is_empty(self) -> bool:
        return not (self.stored or self.failed_batches or self.bad_disk_slots or self.failed_loads
                    or self.sync_loaded or self.transfer_bytes or self.transfer_seconds or self.disk_errors)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KvbmWorkerMetadata:
        assert isinstance(other, KvbmWorkerMetadata)
        stored = dict(self.stored)
        for batch_id, count in other.stored.items():
            stored[batch_id] = stored.get(batch_id, 0) + count
        return KvbmWorkerMetadata(
            stored=stored,
            failed_batches=self.failed_batches | other.failed_batches,
            bad_disk_slots=self.bad_disk_slots | other.bad_disk_slots,
            failed_loads=self.failed_loads | other.failed_loads,
            sync_loaded=_add(self.sync_loaded, other.sync_loaded),
            # Summed over ranks; the leader divides seconds by the rank count.
            transfer_bytes=_add(self.transfer_bytes, other.transfer_bytes),
            transfer_seconds=_add(self.transfer_seconds, other.transfer_seconds),
            disk_errors=_add(self.disk_errors, other.disk_errors),
        )


def _add(a: dict, b: dict) -> dict:
    out = dict(a)
    for key, value in b.items():
        out[key] = out.get(key, 0) + value
    return out
