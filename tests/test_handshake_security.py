"""The handshake against hostile local users, over real ZMQ sockets (TCP, as launch setups use).

An attacker here is code that can reach the ports but does not know the
deployment secret: it sends garbage and forged statuses to the leader, binds
the ports before the leader to feed workers forged or replayed beacons, and
floods. None of it may crash the leader, complete the handshake, or make a
worker allocate anything.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any

import pytest
import zmq

from kvbm.config import ConfigError, KvbmConfig, load_config
from kvbm.runtime import wire
from kvbm.runtime.handshake import (
    HandshakeError,
    LeaderHandshake,
    TierPlan,
    TierSizes,
    WorkerHandshake,
    WorkerLayout,
    handshake_endpoints,
    private_dir,
)

BPB = 65536
SECRET = "0123456789abcdef-test-secret"


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def tcp_config(ports: list[int] | None = None, secret: str | None = SECRET, timeout: float = 60, **extra: Any):
    pub, ack = ports or free_ports(2)
    values = {"cpu_cache_gb": 0.001, "leader_worker_init_timeout_secs": timeout,
              "leader_zmq_pub_port": pub, "leader_zmq_ack_port": ack, **extra}
    env = {"DYN_KVBM_LEADER_ZMQ_SECRET": secret} if secret else {}
    return load_config(values, environ=env)


class Allocations:
    """An allocate callback that records every call (the attacker's goal is to cause one)."""

    def __init__(self) -> None:
        self.calls: list[TierSizes] = []

    def __call__(self, plan: TierPlan, progress) -> bytearray:
        sizes = plan.settings_sizes()
        self.calls.append(sizes)
        return bytearray(sizes.host_slots * BPB)


def worker(cfg: KvbmConfig, rank: int = 0, world: int = 1, allocate: Any = None, **kwargs: Any) -> WorkerHandshake:
    layout = WorkerLayout(rank, world, BPB, 64, layout="test")
    return WorkerHandshake(cfg, None, layout, allocate or Allocations(), **kwargs).start()


class Attacker:
    """Raw ZMQ sockets of someone without the secret."""

    def __init__(self) -> None:
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []

    def socket(self, kind: int, *, bind: str | None = None, connect: str | None = None) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.linger = 0
        if kind == zmq.SUB:
            sock.setsockopt(zmq.SUBSCRIBE, b"")
        if bind:
            sock.bind(bind)
        if connect:
            sock.connect(connect)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()
        self.context.term()


@pytest.fixture
def attacker():
    a = Attacker()
    yield a
    a.close()


def learn_session(sub: zmq.Socket, timeout: float = 10) -> str:
    """What anyone can do over TCP: subscribe to the leader's beacons and read the session id."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sub.poll(100):
            frame = sub.recv()
            return json.loads(frame[len(wire.MAGIC) + 32:])["session"]
    raise AssertionError("no beacon heard")


def forged_statuses(session: str, state: str = "ready") -> list[bytes]:
    """Statuses of a worker that claims rank 0: unsigned (the old format), signed with a guessed key,
    broken in its fields, deeply nested."""
    status = {"session": session, "nonce": "ab" * 16, "rank": 0, "world_size": 1, "bytes_per_block": BPB,
              "num_gpu_blocks": 64, "layout": "x", "pid": 4242, "host": "evil", "state": state,
              "progress": None, "error": None}
    wrong_key = wire.handshake_key(load_config({"cpu_cache_gb": 1}, environ={
        "DYN_KVBM_LEADER_ZMQ_SECRET": "not-the-secret-at-all"}), True, "")
    frames = [
        json.dumps({**status, "protocol": 1}).encode(),  # what today's kvbm accepted
        wire.seal(wrong_key, status),
        wire.MAGIC + b"\0" * 32 + json.dumps(status).encode(),  # right magic, no MAC
        b"\xff" * 100,
        b"[" * 30_000 + b"]" * 30_000,  # nesting deep enough to blow a JSON parser's stack
    ]
    for key, value in (("rank", [0]), ("world_size", True), ("state", {"a": 1}), ("bytes_per_block", 1 << 60)):
        frames.append(json.dumps({**status, "protocol": 1, key: value}).encode())
        frames.append(wire.seal(wrong_key, {**status, key: value}))
    return frames


# ---- the leader --------------------------------------------------------------------
def test_forged_and_malformed_statuses_do_not_crash_the_leader(attacker, caplog):
    cfg = tcp_config()
    ep = handshake_endpoints(cfg, None)
    leader = LeaderHandshake(cfg, 1, None).start()
    try:
        session = learn_session(attacker.socket(zmq.SUB, connect=ep.pub))
        push = attacker.socket(zmq.PUSH, connect=ep.ack)
        for frame in forged_statuses(session, "failed") + forged_statuses(session, "ready"):
            push.send(frame)
        # Oversized: libzmq drops the connection (MAXMSGSIZE); on its own socket so the rest arrive.
        attacker.socket(zmq.PUSH, connect=ep.ack).send(b"x" * (wire.MAX_MESSAGE_BYTES + 1))
        time.sleep(1.0)
        assert not leader._future.done()  # neither crashed nor fooled into "done" or "failed"
        real = worker(cfg)
        result = leader.wait(30)
        assert real.wait(30)[0] == result.plan
        assert [w.pid for w in result.workers] == [os.getpid()]  # the real worker, not pid 4242
        assert leader.drops.total >= 10
        assert "dropped" in caplog.text and "bad signature" in caplog.text
    finally:
        leader.close()


def test_fake_worker_without_the_secret_cannot_complete_the_handshake(attacker):
    cfg = tcp_config(timeout=3)
    ep = handshake_endpoints(cfg, None)
    leader = LeaderHandshake(cfg, 1, None).start()
    impostor = worker(tcp_config([int(ep.pub.rsplit(":", 1)[1]), int(ep.ack.rsplit(":", 1)[1])],
                                 secret="a-guessed-secret-that-is-wrong", timeout=3))
    try:
        session = learn_session(attacker.socket(zmq.SUB, connect=ep.pub))
        push = attacker.socket(zmq.PUSH, connect=ep.ack)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # keep claiming rank 0 is ready
            for frame in forged_statuses(session)[:3]:
                push.send(frame)
            time.sleep(0.1)
        with pytest.raises(HandshakeError) as err:
            leader.wait(30)
        message = str(err.value)
        assert "never joined" in message
        assert "dropped" in message and "DYN_KVBM_LEADER_ZMQ_SECRET" in message
        with pytest.raises(HandshakeError, match="never joined a leader"):
            impostor.wait(30)  # the impostor never trusted the real leader either
        assert impostor._allocate.calls == []
    finally:
        leader.close()
        impostor.close()


# ---- the workers -------------------------------------------------------------------
def squat(attacker: Attacker, ep) -> tuple[zmq.Socket, zmq.Socket]:
    """Bind the leader's ports before the leader does."""
    return attacker.socket(zmq.PUB, bind=ep.pub), attacker.socket(zmq.PULL, bind=ep.ack)


def test_port_squatter_cannot_make_workers_allocate(attacker):
    cfg = tcp_config(timeout=3)
    ep = handshake_endpoints(cfg, None)
    pub, pull = squat(attacker, ep)
    allocations = Allocations()
    victim = worker(cfg, allocate=allocations)
    huge = {"host_slots": 1 << 40, "disk_slots": 1 << 40, "bytes_per_block_all_ranks": BPB}
    beacon = {"session": "cd" * 16, "world_size": 1, "state": "allocate", "sizes": huge, "error": None,
              "peers": [victim.nonce]}  # even knowing the nonce does not help without the key
    wrong_key = wire.handshake_key(tcp_config(secret="squatters-own-secret-123"), True, "")
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            for frame in (json.dumps({**beacon, "protocol": 1}).encode(), wire.seal(wrong_key, beacon),
                          wire.MAGIC + b"\0" * 32 + json.dumps(beacon).encode(), b"garbage"):
                pub.send(frame)
            while pull.poll(0):
                pull.recv()  # the victim never says anything: it heard no authentic leader
            time.sleep(0.05)
        with pytest.raises(HandshakeError) as err:
            victim.wait(30)
        assert "never joined a leader" in str(err.value)
        assert "dropped" in str(err.value)
        assert allocations.calls == []
    finally:
        victim.close()


def test_replayed_beacons_of_a_real_leader_are_inert(attacker):
    """A MAC cannot tell a replay from a fresh beacon: nonces do. Record a real leader's
    authentic beacons (allocate, done, failed), then squat its ports and replay them."""
    ports = free_ports(2)
    cfg = tcp_config(ports)
    ep = handshake_endpoints(cfg, None)
    spy = attacker.socket(zmq.SUB, connect=ep.pub)
    recorded: list[bytes] = []
    ok = LeaderHandshake(cfg, 1, None).start()
    honest = worker(cfg)
    ok.wait(30)
    honest.wait(30)
    ok.close()  # joins its thread: the ports are free once its context is gone
    honest.close()
    while spy.poll(200):
        recorded.append(spy.recv())
    failing = LeaderHandshake(tcp_config(ports, timeout=1.5), 2, None).start()
    spy = attacker.socket(zmq.SUB, connect=ep.pub)  # a fresh one: reconnecting may take longer than 1.5 s
    with pytest.raises(HandshakeError):
        failing.wait(30)
    while spy.poll(200):
        recorded.append(spy.recv())
    states = {json.loads(f[len(wire.MAGIC) + 32:])["state"] for f in recorded}
    assert {"allocate", "done", "failed"} <= states

    pub, pull = squat(attacker, ep)
    allocations = Allocations()
    victim = worker(tcp_config(ports, timeout=3), allocate=allocations)
    try:
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            for frame in recorded:
                pub.send(frame)
            time.sleep(0.05)
        with pytest.raises(HandshakeError) as err:
            victim.wait(30)
        assert "never joined a leader" in str(err.value)  # neither allocated nor failed by a replay
        assert allocations.calls == []
    finally:
        victim.close()


# ---- sizes beyond the machine ------------------------------------------------------
def test_tiers_beyond_this_hosts_memory_are_refused_before_allocating():
    cfg = load_config({"cpu_cache_gb": 100_000, "leader_worker_init_timeout_secs": 30}, environ={})
    eid = os.urandom(8).hex()
    allocations = Allocations()
    w = WorkerHandshake(cfg, eid, WorkerLayout(0, 1, BPB, 64), allocations).start()
    try:
        with pytest.raises(HandshakeError) as err:
            LeaderHandshake(cfg, 1, eid).start().wait()
        assert "DYN_KVBM_CPU_CACHE_GB" in str(err.value) and "memory available" in str(err.value)
        with pytest.raises(HandshakeError, match="DYN_KVBM_CPU_CACHE_GB"):
            w.wait(30)  # told by the leader
        assert allocations.calls == []
    finally:
        w.close()


def test_a_worker_on_another_host_checks_its_own_memory():
    """The leader only sees its own host; a worker elsewhere refuses what its host cannot hold."""
    cfg = load_config({"cpu_cache_gb": 100_000, "leader_worker_init_timeout_secs": 30}, environ={})
    eid = os.urandom(8).hex()
    allocations = Allocations()
    elsewhere = WorkerLayout(0, 1, BPB, 64, host="another-host")
    w = WorkerHandshake(cfg, eid, elsewhere, allocations).start()
    try:
        with pytest.raises(HandshakeError, match=r"worker rank 0 .* failed: .*another-host.*DYN_KVBM_CPU_CACHE_GB"):
            LeaderHandshake(cfg, 1, eid).start().wait()
        assert allocations.calls == []
    finally:
        w.close()


# ---- progress ----------------------------------------------------------------------
def test_allocation_progress_reaches_the_leader_log(caplog):
    caplog.set_level(logging.INFO, logger="kvbm.runtime.handshake")
    cfg = load_config({"cpu_cache_gb": 0.001, "leader_worker_init_timeout_secs": 60}, environ={})
    eid = os.urandom(8).hex()

    def slow(plan: TierPlan, progress) -> None:
        for i in range(1, 11):
            time.sleep(0.3)
            progress(i / 10)

    w = WorkerHandshake(cfg, eid, WorkerLayout(0, 1, BPB, 64), slow).start()
    try:
        LeaderHandshake(cfg, 1, eid, progress_log_s=0.5).start().wait()
        w.wait(30)
    finally:
        w.close()
    lines = [r.getMessage() for r in caplog.records if "still allocating" in r.getMessage()]
    assert any("rank 0 allocating" in line and "%" in line for line in lines), lines


def test_host_arena_reports_progress_to_the_end():
    from kvbm.storage.host import HostArena

    seen: list[float] = []
    HostArena(40, 4 << 20, pin=False, on_progress=seen.append)  # 160 MB: several populate chunks
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)


# ---- secrets -------------------------------------------------------------------------
def test_tcp_without_a_secret_uses_a_private_per_user_one(tmp_path):
    cfg = tcp_config(secret=None)
    key = wire.handshake_key(cfg, True, str(tmp_path))
    info = os.stat(tmp_path / wire.SECRET_FILE_NAME)
    assert info.st_mode & 0o777 == 0o600
    assert wire.handshake_key(cfg, True, str(tmp_path)) == key  # every process of this user agrees
    keys: list[bytes] = []
    other = tmp_path / "race"
    other.mkdir(mode=0o700)
    threads = [threading.Thread(target=lambda: keys.append(wire.handshake_key(cfg, True, str(other))))
               for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1  # racing creators end with one secret
    assert [p.name for p in other.iterdir()] == [wire.SECRET_FILE_NAME]  # no temp files left
    assert os.stat(private_dir()).st_mode & 0o777 == 0o700


def test_secret_file_must_be_private(tmp_path):
    path = tmp_path / "secret"
    path.write_text("s" * 32)
    var = "DYN_KVBM_LEADER_ZMQ_SECRET_FILE"
    cfg = load_config({"cpu_cache_gb": 1, "leader_zmq_pub_port": 7100}, environ={var: str(path)})
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match=f"{var}=.*chmod 600"):
        wire.handshake_key(cfg, True, str(tmp_path))
    os.chmod(path, 0o600)
    assert wire.handshake_key(cfg, True, str(tmp_path)) != wire.handshake_key(tcp_config(), True, "")
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="symbolic link"):
        wire.handshake_key(load_config({"cpu_cache_gb": 1}, environ={var: str(link)}), True, "")
    path.write_text("short")
    with pytest.raises(ConfigError, match=var):
        wire.handshake_key(cfg, True, str(tmp_path))


def test_a_fifo_as_the_secret_file_is_refused_without_hanging(tmp_path):
    """Before, the open blocked until a writer came, before any timeout applied: startup hung."""
    import subprocess
    import sys
    from pathlib import Path

    fifo = tmp_path / "secret"
    os.mkfifo(fifo, 0o600)
    var = "DYN_KVBM_LEADER_ZMQ_SECRET_FILE"
    code = ("import sys\nfrom kvbm.config import ConfigError\nfrom kvbm.runtime.wire import read_secret_file\n"
            "try:\n    read_secret_file(sys.argv[1], sys.argv[2])\nexcept ConfigError as e:\n    print('REFUSED', e)")
    root = str(Path(__file__).resolve().parent.parent)
    try:
        out = subprocess.run([sys.executable, "-c", code, str(fifo), var], capture_output=True, text=True,
                             timeout=60, env={**os.environ, "PYTHONPATH": root})
    except subprocess.TimeoutExpired:
        pytest.fail(f"a FIFO as {var} hung the start-up")
    assert f"REFUSED {var}=" in out.stdout and "not a regular file" in out.stdout, out
    writer_side = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)  # with a writer attached: still refused
    try:
        with pytest.raises(ConfigError, match=f"{var}=.*not a regular file"):
            wire.read_secret_file(str(fifo), var)
    finally:
        os.close(writer_side)


def test_weak_or_leaky_secret_settings_are_refused():
    with pytest.raises(ConfigError, match="DYN_KVBM_LEADER_ZMQ_SECRET must be 16"):
        load_config({"cpu_cache_gb": 1}, environ={"DYN_KVBM_LEADER_ZMQ_SECRET": "hunter2"})
    with pytest.raises(ConfigError, match="startup log"):
        load_config({"cpu_cache_gb": 1, "leader_zmq_secret": "x" * 32}, environ={})
    assert SECRET not in repr(tcp_config())
