"""G4 hardening against real redis-server processes on loopback: forged values, slow links,
oversized values, bad URLs and CA bundles, and the messages a user sees at startup.

A slow link is a throttling TCP relay written here (:class:`Relay`), between kvbm and a real
redis-server; it also counts the bytes Redis sent back, which is how a test tells "refused
before reading" from "read, then refused" without timing anything.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
import uuid

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from kvbm.config import ConfigError, KvbmConfig, load_config, parse_remote_url  # noqa: E402
from kvbm.storage.remote import (  # noqa: E402
    FLAG_KEYED,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAGIC,
    RemoteSetupError,
    RemoteStore,
    remote_secret,
)
from tests.redis_procs import free_port  # noqa: E402

BLOCK = 8192
SECRET = b"fleet-secret-0123456789abcdef"


def make_blocks(n: int, size: int = BLOCK, seed: int = 0) -> tuple[list[bytes], list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [rng.bytes(16) for _ in range(n)], [rng.integers(0, 256, size, dtype=np.uint8) for _ in range(n)]


def empty(n: int, size: int = BLOCK) -> list[np.ndarray]:
    return [np.zeros(size, np.uint8) for _ in range(n)]


def open_store(url: str, identity: str = "model-a", **kwargs) -> RemoteStore:
    kwargs.setdefault("timeout_s", 2.0)
    kwargs.setdefault("backoff_s", 0.05)
    kwargs.setdefault("max_backoff_s", 0.2)
    return RemoteStore.open(url, identity, **kwargs)


def raw(server) -> redis.Redis:
    return redis.Redis(port=server.port, password=server.password)


class Relay:
    """A TCP relay on loopback in front of a redis-server. Counts the bytes passed from Redis
    to the client (``down``) and, with ``rate``, passes them at that many bytes per second."""

    def __init__(self, port: int, rate: int | None = None) -> None:
        self.target, self.rate, self.down = port, rate, 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        slow = down and self.rate is not None
        try:
            while data := src.recv(1024 if slow else 1 << 16):
                if down:
                    with self._lock:
                        self.down += len(data)
                dst.sendall(data)
                if slow:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for s in self._socks:
                s.close()


# ---- item 1: values signed with the fleet secret ---------------------------------------


def test_forged_values_are_misses_counted_and_deleted(redis_server):
    """Someone who can write to Redis and runs the same model, but lacks the secret, cannot
    have a value served: whatever header, checksum or tag it writes, the value is a miss, counted
    as ``forged``, deleted, and never copied into the destination."""
    hashes, data = make_blocks(6)
    r = raw(redis_server)
    with open_store(redis_server.url, secret=SECRET) as store, \
            open_store(redis_server.url, secret=b"another-secret-0123456789") as other, \
            open_store(redis_server.url) as unkeyed:
        assert store.keyed and not unkeyed.keyed
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 6
        dests = empty(6)
        assert store.read_blocks(list(zip(hashes, dests))) == [True] * 6
        assert all((d == s).all() for d, s in zip(dests, data))
        # Different secrets (or none) use other keys: nobody deletes another fleet's values.
        assert store.key(hashes[0]) not in (other.key(hashes[0]), unkeyed.key(hashes[0]))
        assert other.read_blocks(list(zip(hashes, empty(6)))) == [False] * 6
        assert r.exists(*[store.key(h) for h in hashes]) == 6

        evil = np.full(BLOCK, 0x66, np.uint8)  # the KV an attacker wants served
        keys = [store.key(h) for h in hashes]
        digest = bytes.fromhex(keys[0].split(b":")[1].decode())  # public: it is in every key

        def header(block_hash: bytes, flags: int) -> bytes:
            return struct.pack("<8sHH16s16sQ", MAGIC, FORMAT_VERSION, flags, block_hash, digest, BLOCK)

        # 0: a keyed header with a guessed tag; 1: the unkeyed (CRC-32) format, valid as such;
        # 2: a value signed with another secret, its header rewritten to ours; 3: a genuine value
        # with its payload replaced (tag kept)
        r.set(keys[0], header(hashes[0], FLAG_KEYED) + os.urandom(16) + evil.tobytes())
        crc_header = unkeyed._codec.header(hashes[1], evil)
        unkeyed_head = header(hashes[1], 0)
        r.set(keys[1], unkeyed_head + crc_header[len(unkeyed_head):] + evil.tobytes())
        theirs = other._codec.header(hashes[2], evil)
        r.set(keys[2], header(hashes[2], FLAG_KEYED) + theirs[52:] + evil.tobytes())
        genuine = r.get(keys[3])
        r.set(keys[3], genuine[:HEADER_SIZE] + evil.tobytes())
        dests = empty(6)
        ok = store.read_blocks(list(zip(hashes, dests)))
        assert ok == [False, False, False, False, True, True]
        assert all(not d.any() for d in dests[:4])  # not a byte of a forged value reached the destination
        s = store.stats()
        assert s["bad_values"]["forged"] == 4 and s["deleted_bad"] == 4
        assert r.exists(*keys[:4]) == 0
        # the reader's own kind of value still works after all this
        assert store.write_blocks([(hashes[0], data[0])]) == [True]
        assert store.read_blocks([(hashes[0], empty(1)[0])]) == [True]


def test_secret_settings_and_files(tmp_path, monkeypatch):
    """DYN_KVBM_REMOTE_SECRET (environment only) or _FILE with the handshake secret's rules."""
    base = {"DYN_KVBM_REMOTE_URL": "redis://127.0.0.1:6379"}
    assert remote_secret(load_config(environ=base)) is None
    cfg = load_config(environ={**base, "DYN_KVBM_REMOTE_SECRET": "  " + "k" * 20 + "  "})
    assert remote_secret(cfg) == b"k" * 20 and "k" * 20 not in repr(cfg)
    with pytest.raises(ConfigError, match="DYN_KVBM_REMOTE_SECRET must be 16"):
        load_config(environ={**base, "DYN_KVBM_REMOTE_SECRET": "short"})
    with pytest.raises(ConfigError, match=r"kv_connector_extra_config\['remote_secret'\].*leaks.*"
                                          "DYN_KVBM_REMOTE_SECRET_FILE"):
        load_config({"remote_secret": "k" * 20}, environ=base)

    var = "DYN_KVBM_REMOTE_SECRET_FILE"
    good = tmp_path / "g4-secret"
    good.write_text("f" * 32 + "\n")
    good.chmod(0o600)
    cfg = load_config({"remote_secret_file": str(good)}, environ=base)  # a path is no secret: allowed here
    assert remote_secret(cfg) == b"f" * 32
    loose = tmp_path / "loose"
    loose.write_text("f" * 32)
    loose.chmod(0o644)
    short = tmp_path / "short"
    short.write_text("f" * 8)
    short.chmod(0o600)
    link = tmp_path / "link"
    link.symlink_to(good)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    for path, needle in ((loose, "chmod 600"), (short, "16 to 4096"), (link, "symbolic link"),
                         (fifo, "not a regular file"), (tmp_path / "missing", "cannot open")):
        cfg = load_config(environ={**base, var: str(path)})
        with pytest.raises(ConfigError, match=f"{var}={path}.*{needle}"):
            remote_secret(cfg)  # a FIFO is refused at once, never waited on


def test_no_secret_warns_once_at_startup(redis_server, caplog):
    """The leader says loudly, once, that G4 trusts every writer; workers and keyed servers do not."""
    from kvbm.runtime.leader import EngineInfo, LeaderRuntime
    from kvbm.runtime.sizing import TierPlan, TierSizes
    from kvbm.storage.remote_index import remote_key

    def leader(**extra):
        cfg = KvbmConfig(remote_url=parse_remote_url("DYN_KVBM_REMOTE_URL", redis_server.url), **extra)
        return LeaderRuntime(cfg, TierPlan.configured(cfg, TierSizes(8, 0, 1024, remote_key("tiny"))),
                             EngineInfo(block_size=4, world_size=1, engine_id=None, block_bytes=512, gpu_blocks=16,
                                        storage_key="k", max_num_batched_tokens=64), identity="tiny")

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records
                if r.levelno == logging.WARNING and "NOT authenticated" in r.getMessage()]

    caplog.set_level(logging.INFO)
    rt = leader()
    try:
        assert not rt.remote.keyed
        assert len(warnings()) == 1 and "DYN_KVBM_REMOTE_SECRET" in warnings()[0]
        worker = RemoteStore.from_config(rt.config, remote_key("tiny"), rank=0, world_size=1)  # a worker's
        worker.close()
        assert len(warnings()) == 1
    finally:
        rt.close()
    caplog.clear()
    rt = leader(remote_secret="k" * 20)
    try:
        assert rt.remote.keyed and warnings() == []
    finally:
        rt.close()


# ---- item 2: one deadline per round trip; oversized values refused unread ------------------


def test_slow_link_is_bounded_per_round_trip(redis_server):
    """16 KB/s between kvbm and Redis, two 256 KiB blocks, a 1 s timeout: the read gives up as a
    whole (misses, a timeout, the node down) long before the 32 s the bytes would take; a
    socket timeout per recv never fires on a link that trickles."""
    size = 256 << 10
    hashes, data = make_blocks(2, size)
    with open_store(redis_server.url) as direct:
        assert direct.write_blocks(list(zip(hashes, data))) == [True, True]
    relay = Relay(redis_server.port, rate=16 << 10)
    try:
        with open_store(relay.url, timeout_s=1.0, backoff_s=60.0) as store:
            dests = empty(2, size)
            assert store.read_blocks(list(zip(hashes, dests))) == [False, False]
            passed = relay.down
            assert passed < size  # gave up with most of the bytes still to come
            s = store.stats()
            assert s["errors"]["timeout"] >= 1 and not s["up"]
            assert not any(d.any() for d in dests)
    finally:
        relay.close()


def test_oversized_values_are_refused_before_their_payload(redis_server):
    """Four 16 MB values under the keys of four 8 KiB blocks: each costs at most a block's value
    and one byte on the wire (GETRANGE), not 16 MB; they are misses and deleted."""
    hashes, _ = make_blocks(4)
    relay = Relay(redis_server.port)
    r = raw(redis_server)
    try:
        with open_store(relay.url) as store:
            keys = [store.key(h) for h in hashes]
            for key in keys:
                r.set(key, b"\x00" * (16 << 20))
            before = relay.down
            assert store.read_blocks(list(zip(hashes, empty(4)))) == [False] * 4
            assert relay.down - before <= 4 * (HEADER_SIZE + BLOCK + 1) + 4096
            s = store.stats()
            assert s["bad_values"]["foreign"] == 4 and s["deleted_bad"] == 4 and s["up"]
            assert r.exists(*keys) == 0
    finally:
        relay.close()


# ---- item 8: bad host names and CA bundles are setup errors --------------------------------


def test_host_label_over_63_characters_names_the_variable():
    url = "redis://" + "a" * 64 + ".example:6379"
    for build in (lambda: parse_remote_url("DYN_KVBM_REMOTE_URL", url),
                  lambda: load_config(environ={"DYN_KVBM_REMOTE_URL": url}),
                  lambda: RemoteStore(url, "model-a")):
        with pytest.raises(ConfigError, match="DYN_KVBM_REMOTE_URL.*not a valid host name.*63"):
            build()
    with pytest.raises(ConfigError, match="DYN_KVBM_REMOTE_URL"):
        parse_remote_url("DYN_KVBM_REMOTE_URL", "redis://a..b:6379")
    assert parse_remote_url("x", "redis://" + "a" * 63 + ".example:6379").nodes[0][0] == "a" * 63 + ".example"


def test_missing_ca_bundle_is_a_setup_error_not_unreachable(tmp_path):
    missing = tmp_path / "ca.pem"
    url = f"rediss://127.0.0.1:{free_port()}?ssl_ca_certs={missing}"
    with pytest.raises(RemoteSetupError) as err:
        open_store(url, optional=True, timeout_s=0.5)  # optional does not cover a setting to fix
    message = str(err.value)
    assert "DYN_KVBM_REMOTE_URL" in message and str(missing) in message and "does not exist" in message
    assert not err.value.unreachable and "cannot reach" not in message


# ---- item 9: clean startup messages, a self-explaining summary line ------------------------


def test_unreachable_redis_at_startup_is_a_clean_handshake_error():
    """A worker that cannot open G4 fails the handshake with the setting to fix, not with
    dataclass reprs (``TierSizes(...)``, ``remote_key=...``) or exception class names."""
    from kvbm.runtime.handshake import HandshakeError, LeaderHandshake, WorkerHandshake, WorkerLayout
    from kvbm.storage.remote_index import open_remote

    url = f"redis://127.0.0.1:{free_port()}"
    cfg = load_config({"remote_url": url, "remote_timeout_secs": 0.5, "cpu_cache_override_num_blocks": 4,
                       "leader_worker_init_timeout_secs": 60}, environ={})
    engine_id = str(uuid.uuid4())

    def allocate(sizes, progress):  # what kvbm.runtime.worker does for a G4 tier
        return open_remote(cfg, sizes.remote_key, rank=0, world_size=1)

    worker = WorkerHandshake(cfg, engine_id, WorkerLayout(0, 1, 4096, num_gpu_blocks=16, layout="test"),
                             allocate).start()
    try:
        with pytest.raises(HandshakeError) as err:
            LeaderHandshake(cfg, 1, engine_id, identity=lambda layouts: "tiny").start().wait()
    finally:
        worker.close()
    message = str(err.value)
    assert "DYN_KVBM_REMOTE_URL" in message and "cannot reach Redis" in message and "G4 (Redis)" in message
    for internal in ("TierSizes(", "remote_key", "RemoteSetupError", "host_slots"):
        assert internal not in message, message


def test_summary_line_explains_g4(redis_server):
    from kvbm.runtime.leader import EngineInfo, LeaderRuntime
    from kvbm.runtime.sizing import TierPlan, TierSizes
    from kvbm.storage.remote_index import remote_key

    cfg = KvbmConfig(remote_url=parse_remote_url("DYN_KVBM_REMOTE_URL", redis_server.url))
    rt = LeaderRuntime(cfg, TierPlan.configured(cfg, TierSizes(8, 0, 1024, remote_key("tiny"))),
                       EngineInfo(block_size=4, world_size=1, engine_id=None, block_bytes=512, gpu_blocks=16,
                                  storage_key="k", max_num_batched_tokens=64), identity="tiny")
    try:
        line = rt.metrics.summary()
    finally:
        rt.close()
    assert "G4 0 blocks known to be in Redis" in line and "G2 0/8 used" in line
    assert "/0 used" not in line  # G4 has no capacity of its own: Redis's maxmemory bounds it


def test_doctor_says_whether_g4_values_are_signed(tmp_path):
    from kvbm.tools.doctor import FAIL, PASS, WARN, check_remote

    probe = {"target": "redis://127.0.0.1:6379", "error": None, "unreachable": False, "mode": "single node",
             "nodes": 1, "version": "7", "maxmemory": 1 << 30, "maxmemory_policy": "allkeys-lru", "latency_ms": 0.1}
    base = {"DYN_KVBM_REMOTE_URL": "redis://127.0.0.1:6379"}

    def status(**env) -> tuple[str, str]:
        check = {c.name: c for c in check_remote(load_config(environ={**base, **env}), probe=probe)}["G4 values"]
        return check.status, check.detail

    assert status()[0] == WARN and "DYN_KVBM_REMOTE_SECRET" in status()[1]
    assert status(DYN_KVBM_REMOTE_SECRET="k" * 20)[0] == PASS
    loose = tmp_path / "secret"
    loose.write_text("k" * 20)
    loose.chmod(0o644)
    result, detail = status(DYN_KVBM_REMOTE_SECRET_FILE=str(loose))
    assert result == FAIL and "chmod 600" in detail
    loose.chmod(0o600)
    assert status(DYN_KVBM_REMOTE_SECRET_FILE=str(loose))[0] == PASS
