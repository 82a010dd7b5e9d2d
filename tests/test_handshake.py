"""Leader/worker handshake over real ZMQ with real worker processes (spawned).

Workers own real memory of the agreed size; failures (a rank that never
joins, a worker or leader killed mid-handshake, a failed allocation) must end
in a clear error well before the configured timeout where they can.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import re
import signal
import socket
import threading
import time
import uuid
from typing import Any

import pytest

from kvbm.config import KvbmConfig, load_config
from kvbm.runtime.handshake import (
    DEAD_AFTER_S,
    TIMEOUT_VAR,
    HandshakeError,
    LeaderHandshake,
    TierSizes,
    WorkerHandshake,
    WorkerLayout,
    handshake_endpoints,
)
from kvbm.runtime.sizing import SizingError, plan_tiers
from tests.handshake_procs import leader_main, worker_main

CTX = mp.get_context("spawn")
BPB = 65536  # bytes per block on one rank


def config(**extra: Any) -> KvbmConfig:
    return load_config({"leader_worker_init_timeout_secs": 60, "cpu_cache_gb": 0.001, **extra}, environ={})


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tcp_config(**extra: Any) -> KvbmConfig:
    pub, ack = free_ports(2)
    return config(leader_zmq_pub_port=pub, leader_zmq_ack_port=ack, **extra)


class Procs:
    """Spawned processes of one test, always reaped."""

    def __init__(self) -> None:
        self.results = CTX.Queue()
        self.procs: list[mp.Process] = []

    def worker(self, cfg: KvbmConfig, engine_id: str | None, rank: int, world: int = 2,
               bpb: int = BPB, **kwargs: Any) -> mp.Process:
        proc = CTX.Process(target=worker_main, args=(cfg, engine_id, rank, world, bpb, self.results), kwargs=kwargs)
        proc.start()
        self.procs.append(proc)
        return proc

    def leader(self, cfg: KvbmConfig, engine_id: str | None, world: int = 2) -> mp.Process:
        proc = CTX.Process(target=leader_main, args=(cfg, engine_id, world, self.results))
        proc.start()
        self.procs.append(proc)
        return proc

    def collect(self, n: int, timeout: float = 60) -> list[dict]:
        """The next ``n`` results (``{"rank", "pid", "sizes"|"error", ...}``)."""
        out: list[dict] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            try:
                out.append(self.results.get(timeout=max(0.1, deadline - time.monotonic())))
            except queue.Empty:
                raise AssertionError(f"only {len(out)} of {n} results after {timeout}s: {out}") from None
        return out

    def by_rank(self, n: int, timeout: float = 60) -> dict[int, dict]:
        return {item["rank"]: item for item in self.collect(n, timeout)}

    def close(self) -> None:
        for proc in self.procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()


@pytest.fixture
def procs():
    p = Procs()
    yield p
    p.close()


def run_leader(cfg: KvbmConfig, engine_id: str | None, world: int = 2, **kwargs: Any):
    return LeaderHandshake(cfg, world, engine_id, **kwargs).start().wait()


def assert_agreed(results: dict, sizes: TierSizes, bytes_per_rank: dict[int, int]) -> None:
    for rank, bpb in bytes_per_rank.items():
        assert "error" not in results[rank], results[rank]
        assert TierSizes(**results[rank]["sizes"]) == sizes
        assert results[rank]["allocated_bytes"] == sizes.host_slots * bpb


# ---- agreement -------------------------------------------------------------
def test_two_worker_processes_agree_and_allocate_gb_split_across_ranks(procs):
    """GB is the total over ranks: divided by the sum of every rank's bytes per block."""
    cfg = config(cpu_cache_gb=0.001, disk_cache_gb=0.002)
    eid = str(uuid.uuid4())
    per_rank = {0: BPB, 1: BPB // 2}  # unequal shards prove the leader sums them
    for rank, bpb in per_rank.items():
        procs.worker(cfg, eid, rank, bpb=bpb, arena="torch")  # kvbm's real HostArena
    result = run_leader(cfg, eid)
    total = sum(per_rank.values())
    assert result.plan.settings_sizes() == TierSizes(1_000_000 // total, 2_000_000 // total, total)
    assert [w.bytes_per_block for w in result.workers] == [BPB, BPB // 2]
    assert {w.pid for w in result.workers} == {p.pid for p in procs.procs}
    assert_agreed(procs.by_rank(2), result.plan.settings_sizes(), per_rank)


def test_override_block_counts_win_over_gb(procs):
    cfg = config(cpu_cache_gb=0.001, cpu_cache_override_num_blocks=5, disk_cache_gb=1, disk_cache_override_num_blocks=7)
    eid = str(uuid.uuid4())
    for rank in range(2):
        procs.worker(cfg, eid, rank)
    result = run_leader(cfg, eid)
    assert (result.plan.settings_sizes().host_slots, result.plan.settings_sizes().disk_slots) == (5, 7)
    assert_agreed(procs.by_rank(2), result.plan.settings_sizes(), {0: BPB, 1: BPB})


def test_worker_started_after_leader(procs):
    cfg, eid = config(), str(uuid.uuid4())
    leader = LeaderHandshake(cfg, 2, eid).start()
    time.sleep(1.0)
    for rank in range(2):
        procs.worker(cfg, eid, rank)
    result = leader.wait()
    assert_agreed(procs.by_rank(2), result.plan.settings_sizes(), {0: BPB, 1: BPB})


def test_leader_started_after_workers(procs):
    """vLLM's order: workers register their KV caches before the scheduler exists."""
    cfg, eid = config(), str(uuid.uuid4())
    for rank in range(2):
        procs.worker(cfg, eid, rank)
    time.sleep(2.0)
    result = run_leader(cfg, eid)
    assert_agreed(procs.by_rank(2), result.plan.settings_sizes(), {0: BPB, 1: BPB})


# ---- failures --------------------------------------------------------------
def _silent_s(message: str) -> float:
    """The silence a handshake error reports ("... (3.2s silent ...")."""
    match = re.search(r"\((\d+(?:\.\d+)?)s silent", message)
    assert match, message
    return float(match.group(1))


def test_worker_that_never_joins_fails_within_timeout(procs):
    cfg, eid = config(leader_worker_init_timeout_secs=2), str(uuid.uuid4())
    procs.worker(cfg, eid, 0)
    start = time.monotonic()
    with pytest.raises(HandshakeError) as err:
        run_leader(cfg, eid)
    assert time.monotonic() - start >= 2  # never before the timeout (its end is bounded by the test's own timeout)
    message = str(err.value)
    assert "rank(s) 1 of world_size 2 never joined" in message
    assert TIMEOUT_VAR in message
    # The rank that did join is told, instead of waiting for its own timeout.
    assert "never joined" in procs.by_rank(1, timeout=30)[0]["error"]


def test_worker_killed_mid_handshake_is_reported(procs):
    cfg, eid = config(), str(uuid.uuid4())  # 60 s timeout, default 30 s heartbeat limit
    allocating = CTX.Event()
    procs.worker(cfg, eid, 0)
    victim = procs.worker(cfg, eid, 1, alloc_delay_s=60, allocating=allocating)
    leader = LeaderHandshake(cfg, 2, eid).start()
    assert allocating.wait(30)
    os.kill(victim.pid, signal.SIGKILL)
    with pytest.raises(HandshakeError, match=r"worker rank 1 \(pid \d+ on .*\) stopped responding") as err:
        leader.wait()
    # Its closed connection gave it away, not the 30 s silence limit: the rule that fired, from the
    # silence the leader measured (not this test's wall clock, which a busy machine stretches).
    assert _silent_s(str(err.value)) < DEAD_AFTER_S
    assert "worker rank 1" in procs.by_rank(1, timeout=30)[0]["error"]


def test_failed_allocation_is_reported_by_rank(procs):
    cfg, eid = config(), str(uuid.uuid4())
    procs.worker(cfg, eid, 0)
    procs.worker(cfg, eid, 1, fail_alloc=True)
    with pytest.raises(HandshakeError, match="worker rank 1 .* could not allocate .*MemoryError"):
        run_leader(cfg, eid)


def test_leader_killed_mid_handshake_is_reported_by_workers(procs):
    cfg, eid = config(), str(uuid.uuid4())
    allocating = CTX.Event()
    procs.worker(cfg, eid, 0, alloc_delay_s=60, allocating=allocating)
    procs.worker(cfg, eid, 1, alloc_delay_s=60)
    leader = procs.leader(cfg, eid)
    assert allocating.wait(30)
    leader.kill()
    results = procs.by_rank(2, timeout=60)
    for rank in range(2):
        assert "the leader at ipc://" in results[rank]["error"]
        assert _silent_s(results[rank]["error"]) < DEAD_AFTER_S  # the closed connection, not the limit
        assert "stopped responding" in results[rank]["error"]
    ep = handshake_endpoints(cfg, eid)  # a killed leader cannot clean up after itself
    for path in (ep.pub[len("ipc://"):], ep.ack[len("ipc://"):], ep.lock):
        if os.path.exists(path):
            os.unlink(path)


def test_restarted_leader_gets_a_fresh_handshake(procs):
    cfg, eid = config(), str(uuid.uuid4())
    allocating = CTX.Event()
    procs.worker(cfg, eid, 0, alloc_delay_s=3, allocating=allocating)
    procs.worker(cfg, eid, 1, alloc_delay_s=3)
    first = procs.leader(cfg, eid)
    assert allocating.wait(30)
    first.kill()
    first.join()
    result = run_leader(cfg, eid)  # same sockets: the workers drop their allocation and re-join
    assert_agreed(procs.by_rank(2), result.plan.settings_sizes(), {0: BPB, 1: BPB})


# ---- side by side ----------------------------------------------------------
def _two_instances(procs: Procs, cfgs: list[KvbmConfig], eids: list[str | None]) -> list:
    for i, (cfg, eid) in enumerate(zip(cfgs, eids)):
        for rank in range(2):
            procs.worker(cfg, eid, rank, bpb=BPB * (i + 1))
    results: list = [None, None]

    def lead(i: int) -> None:
        try:
            results[i] = run_leader(cfgs[i], eids[i])
        except Exception as exc:  # surfaced by the assertions below
            results[i] = exc

    threads = [threading.Thread(target=lead, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_instances_side_by_side_with_distinct_ports(procs):
    cfgs = [tcp_config(cpu_cache_override_num_blocks=3), tcp_config(cpu_cache_override_num_blocks=4)]
    assert handshake_endpoints(cfgs[0], "x").pub.startswith("tcp://127.0.0.1:")
    results = _two_instances(procs, cfgs, [None, None])
    assert [r.plan.settings_sizes().host_slots for r in results] == [3, 4]
    assert [r.plan.settings_sizes().bytes_per_block_all_ranks for r in results] == [2 * BPB, 4 * BPB]
    workers = procs.collect(4)
    assert sorted((w["rank"], w["sizes"]["host_slots"]) for w in workers) == [(0, 3), (0, 4), (1, 3), (1, 4)]


def test_two_instances_side_by_side_with_the_default_transport(procs):
    cfgs = [config(cpu_cache_override_num_blocks=3), config(cpu_cache_override_num_blocks=4)]
    eids = [str(uuid.uuid4()), str(uuid.uuid4())]
    assert handshake_endpoints(cfgs[0], eids[0]).pub.startswith("ipc://")
    assert handshake_endpoints(cfgs[0], eids[0]) != handshake_endpoints(cfgs[1], eids[1])
    results = _two_instances(procs, cfgs, eids)
    assert [r.plan.settings_sizes().host_slots for r in results] == [3, 4]
    assert [r.plan.settings_sizes().bytes_per_block_all_ranks for r in results] == [2 * BPB, 4 * BPB]
    workers = procs.collect(4)
    assert sorted((w["rank"], w["sizes"]["host_slots"]) for w in workers) == [(0, 3), (0, 4), (1, 3), (1, 4)]
    for cfg, eid in zip(cfgs, eids):  # the leaders cleaned up their socket and lock files
        ep = handshake_endpoints(cfg, eid)
        assert not any(os.path.exists(p) for p in (ep.pub[len("ipc://"):], ep.ack[len("ipc://"):], ep.lock))


def test_second_leader_on_taken_ports_fails_clearly():
    cfg = tcp_config()
    first = LeaderHandshake(cfg, 1, None).start()
    try:
        with pytest.raises(HandshakeError, match="DYN_KVBM_LEADER_ZMQ_PUB_PORT"):
            LeaderHandshake(cfg, 1, None).start()
    finally:
        first.close()


def test_second_leader_with_same_engine_id_fails_clearly():
    cfg, eid = config(), str(uuid.uuid4())
    first = LeaderHandshake(cfg, 1, eid).start()
    try:
        with pytest.raises(HandshakeError, match="same kv_transfer_config.engine_id"):
            LeaderHandshake(cfg, 1, eid).start()
    finally:
        first.close()
    LeaderHandshake(cfg, 1, eid).start().close()  # the lock died with the first leader


# ---- in-process checks (threads) --------------------------------------------
def test_worker_of_another_instance_is_rejected():
    cfg, eid = config(), str(uuid.uuid4())
    stranger = WorkerHandshake(cfg, eid, WorkerLayout(0, 4, BPB, 64), lambda sizes, progress: None).start()
    try:
        with pytest.raises(HandshakeError, match="worker rank 0 .* reports world_size 4, the leader expects 2"):
            run_leader(cfg, eid, world=2)
        with pytest.raises(HandshakeError, match="expects world_size 2, this worker 4"):
            stranger.wait()
    finally:
        stranger.close()


def test_endpoints_default_to_private_unix_sockets_keyed_by_engine_id():
    cfg = config()
    a, b = handshake_endpoints(cfg, "engine-a"), handshake_endpoints(cfg, "engine-b")
    assert a.pub.startswith("ipc://") and a.ack.startswith("ipc://") and a != b
    directory = os.path.dirname(a.pub[len("ipc://"):])
    assert os.stat(directory).st_mode & 0o777 == 0o700
    assert handshake_endpoints(cfg, None).pub == "tcp://127.0.0.1:56001"
    explicit = load_config({"cpu_cache_gb": 1}, environ={"DYN_KVBM_LEADER_ZMQ_ACK_PORT": "7000"})
    assert handshake_endpoints(explicit, "engine-a").ack == "tcp://127.0.0.1:7000"
    v6 = load_config({"cpu_cache_gb": 1, "leader_zmq_host": "::1"}, environ={})
    assert handshake_endpoints(v6, "engine-a").pub == "tcp://[::1]:56001"


def test_plan_tiers_errors_name_the_fix():
    cfg = config(cpu_cache_gb=0.00001)
    with pytest.raises(SizingError, match="DYN_KVBM_CPU_CACHE_GB"):
        plan_tiers(cfg, [WorkerLayout(0, 2, BPB, 64), WorkerLayout(1, 2, BPB, 64)])
    with pytest.raises(SizingError, match="different numbers of GPU blocks"):
        plan_tiers(config(), [WorkerLayout(0, 2, BPB, 64), WorkerLayout(1, 2, BPB, 65)])
