"""G4 (kvbm/storage/remote.py) against real redis-server processes on loopback.

Single nodes and a 3-node Redis Cluster started per test (tests/redis_procs.py);
faults are real: servers killed with SIGKILL and restarted, a server stalled
with ``DEBUG SLEEP``, eviction under a real ``maxmemory``, values corrupted in
Redis itself. No timing asserts: waits poll for a state with a generous bound.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

redis = pytest.importorskip("redis")

from kvbm.config import ConfigError, KvbmConfig, parse_remote_url  # noqa: E402
from kvbm.storage.remote import HEADER_SIZE, RemoteSetupError, RemoteStore, probe_remote  # noqa: E402
from kvbm.tools.doctor import FAIL, PASS, SKIP, WARN, check_remote  # noqa: E402
from tests.redis_procs import free_port  # noqa: E402

BLOCK = 8192


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


def wait_until(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)


def raw(server) -> redis.Redis:
    return redis.Redis(port=server.port, password=server.password)


def same(dests: list[np.ndarray], data: list[np.ndarray], ok: list[bool]) -> bool:
    return all((d == s).all() for d, s, good in zip(dests, data, ok) if good)


@pytest.fixture
def sends(monkeypatch):
    """Counts the pipelines sent (kvbm frames commands itself): one per round trip."""
    from kvbm.storage.remote_wire import Wire

    count = {"n": 0}
    original = Wire.send

    def counting(self, frames):
        count["n"] += 1
        return original(self, frames)

    monkeypatch.setattr(Wire, "send", counting)
    return count


# ---- single node ---------------------------------------------------------------------


def test_round_trip_prefix_and_buffers(redis_server):
    import torch

    hashes, data = make_blocks(8)
    with open_store(redis_server.url) as store:
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 8
        assert store.contains_prefix(hashes) == 8
        assert store.contains_prefix([*hashes[:3], b"\x00" * 16, *hashes[3:]]) == 3
        assert store.contains_prefix([]) == 0
        dests = empty(6)
        tensor = torch.zeros(BLOCK, dtype=torch.uint8)  # as a host-tier row would be
        buf = bytearray(BLOCK)
        ok = store.read_blocks([*zip(hashes[:6], dests), (hashes[6], tensor), (hashes[7], buf)])
        assert ok == [True] * 8
        assert same(dests, data, ok)
        assert (tensor.numpy() == data[6]).all() and bytes(buf) == data[7].tobytes()
        s = store.stats()
        assert s["written_blocks"] == 8 and s["written_bytes"] == 8 * BLOCK
        assert s["read_hits"] == 8 and s["read_bytes"] == 8 * BLOCK and s["read_misses"] == 0
        assert s["lookups"] == 3 and s["lookup_hits"] == 11 and s["lookup_blocks"] == 17
        assert s["latency"]["read"]["count"] == 1 and s["latency"]["read"]["buckets"][-1][1] == 1
        assert s["up"] and s["down_episodes"] == 0 and not any(s["errors"].values())
        # a value is header + payload, stored whole under the documented key
        key = store.key(hashes[0])
        assert key.startswith(b"kvbm:") and key.endswith(hashes[0].hex().encode())
        assert raw(redis_server).strlen(key) == HEADER_SIZE + BLOCK


def test_caller_bugs_raise_before_any_io(redis_server):
    hashes, data = make_blocks(1)
    with open_store(redis_server.url) as store:
        with pytest.raises(ValueError, match="not 16 bytes"):
            store.contains_prefix([b"short"])
        with pytest.raises(ValueError, match="read-only"):
            store.read_blocks([(hashes[0], bytes(BLOCK))])
        with pytest.raises(ValueError, match="C-contiguous"):
            store.write_blocks([(hashes[0], np.zeros((BLOCK, 2), np.uint8)[:, 0])])
        assert store.stats()["round_trips"] == 0
    with pytest.raises(RuntimeError, match="closed"):
        store.contains_prefix(hashes)
    with pytest.raises(ConfigError, match="DYN_KVBM_REMOTE_NAMESPACE"):
        RemoteStore(redis_server.url, "model-a", namespace="{pinned}")


def test_one_round_trip_per_call_and_bounded_batches(redis_server, sends):
    n = 300
    hashes, data = make_blocks(n)
    r = raw(redis_server)
    with open_store(redis_server.url) as store:
        store.contains_prefix(hashes[:1])  # connect outside the counted calls
        before = sends["n"]
        assert store.write_blocks(list(zip(hashes, data))) == [True] * n
        assert store.contains_prefix(hashes) == n
        assert store.read_blocks(list(zip(hashes, empty(n)))) == [True] * n
        assert sends["n"] - before == 3  # one round trip each, not one per block
        stats = r.info("commandstats")
        assert stats["cmdstat_set"]["calls"] == n and stats["cmdstat_getrange"]["calls"] == n
    # bounded batches: by keys, then by bytes
    with open_store(redis_server.url, batch_keys=100) as store:
        store.contains_prefix(hashes[:1])
        before = sends["n"]
        store.write_blocks(list(zip(hashes, data)))
        assert sends["n"] - before == 3
    with open_store(redis_server.url, batch_bytes=10 * (BLOCK + HEADER_SIZE)) as store:
        store.contains_prefix(hashes[:1])
        before = sends["n"]
        assert store.read_blocks(list(zip(hashes[:25], empty(25)))) == [True] * 25
        assert sends["n"] - before == 3
    with open_store(redis_server.url, lookup_batch_keys=128) as store:
        store.contains_prefix(hashes[:1])
        before = sends["n"]
        assert store.contains_prefix(hashes) == n
        assert sends["n"] - before == 3
        before = sends["n"]
        assert store.contains_prefix([b"\x01" * 16, *hashes]) == 0  # stops at the first chunk with a miss
        assert sends["n"] - before == 1


def test_bad_values_are_misses_counted_and_deleted(redis_server):
    hashes, data = make_blocks(7)
    r = raw(redis_server)
    with open_store(redis_server.url) as store, open_store(redis_server.url, identity="model-b") as other:
        store.write_blocks(list(zip(hashes, data)))
        other.write_blocks(list(zip(hashes, data)))
        keys = [store.key(h) for h in hashes]
        good = r.get(keys[2])
        r.set(keys[0], b"not a kvbm value")
        r.set(keys[1], good[: HEADER_SIZE + 100])  # truncated
        flipped = bytearray(r.get(keys[2]))
        flipped[HEADER_SIZE + BLOCK // 2] ^= 0x01  # one bit of payload
        r.set(keys[2], bytes(flipped))
        r.set(keys[3], r.get(other.key(hashes[3])))  # another identity's value under our key
        r.set(keys[4], r.get(keys[5]))  # another block's value under this key
        dests = empty(7)
        ok = store.read_blocks(list(zip(hashes, dests)))
        assert ok == [False, False, False, False, False, True, True]
        assert all(not d.any() for d in dests[:5])  # never copied into the destination
        assert same(dests, data, ok)
        s = store.stats()
        assert s["bad_values"] == {"foreign": 4, "corrupt": 1, "forged": 0}
        assert s["deleted_bad"] == 5 and r.exists(*keys[:5]) == 0
        # a wrong-size destination (another layout under the same identity) is a miss too
        assert store.read_blocks([(hashes[5], np.zeros(BLOCK // 2, np.uint8))]) == [False]
        assert r.exists(other.key(hashes[3])) == 1  # the other identity's keys are untouched


def test_identities_namespaces_and_ranks_never_share(redis_server):
    hashes, data = make_blocks(4)
    url = redis_server.url
    with open_store(url) as a, open_store(url) as a_again, open_store(url, identity="model-b") as b, \
            open_store(url, namespace="other") as a_elsewhere:
        assert a.write_blocks(list(zip(hashes, data))) == [True] * 4
        # a second server with the same model and namespace reuses the blocks
        assert a_again.contains_prefix(hashes) == 4
        dests = empty(4)
        assert a_again.read_blocks(list(zip(hashes, dests))) == [True] * 4 and same(dests, data, [True] * 4)
        for store in (b, a_elsewhere):
            assert store.contains_prefix(hashes) == 0
            assert store.read_blocks(list(zip(hashes, empty(4)))) == [False] * 4
    # tensor parallel: a block is there only when every rank's shard is
    r0 = open_store(url, rank=0, world_size=2)
    r1 = open_store(url, rank=1, world_size=2)
    single = open_store(url)
    try:
        assert r0.write_blocks(list(zip(hashes, data))) == [True] * 4
        assert r0.contains_prefix(hashes) == 0 and r1.contains_prefix(hashes) == 0
        assert r1.write_blocks(list(zip(hashes[:2], data[2:]))) == [True] * 2
        assert r0.contains_prefix(hashes) == 2
        dests = empty(2)
        assert r1.read_blocks(list(zip(hashes[:2], dests))) == [True] * 2 and same(dests, data[2:], [True] * 2)
        assert single.contains_prefix(hashes) == 4  # world size 1 is another layout: the earlier blocks
    finally:
        for store in (r0, r1, single):
            store.close()


def test_expired_key_is_a_miss(redis_server):
    hashes, data = make_blocks(3)
    r = raw(redis_server)
    with open_store(redis_server.url, ttl_secs=100) as store:
        store.write_blocks(list(zip(hashes, data)))
        assert all(0 < r.pttl(store.key(h)) <= 100_000 for h in hashes)
        r.pexpire(store.key(hashes[1]), 1)
        wait_until(lambda: not r.exists(store.key(hashes[1])), "the key expired")
        assert store.contains_prefix(hashes) == 1
        assert store.read_blocks(list(zip(hashes, empty(3)))) == [True, False, True]
        assert not any(store.stats()["errors"].values())


def test_lru_eviction_is_a_miss(redis_factory):
    server = redis_factory(extra=["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"])
    n, size = 160, 32 << 10  # 5 MB through a 2 MB Redis
    hashes, data = make_blocks(n, size)
    # small read batches: a reply waiting in Redis's output buffer counts as used memory and evicts too
    with open_store(server.url, batch_bytes=256 << 10) as store:
        for i in range(0, n, 20):
            assert store.write_blocks(list(zip(hashes[i:i + 20], data[i:i + 20]))) == [True] * 20
        dests = empty(n, size)
        ok = store.read_blocks(list(zip(hashes, dests)))
        assert 0 < sum(ok) < n and ok[-1]
        assert same(dests, data, ok)
        assert raw(server).info("stats")["evicted_keys"] > 0
        s = store.stats()
        assert s["read_misses"] == n - sum(ok) and not any(s["errors"].values()) and s["up"]


def test_full_redis_without_eviction_fails_stores_not_the_store(redis_factory):
    server = redis_factory(extra=["--maxmemory", "3mb", "--maxmemory-policy", "noeviction"])
    hashes, data = make_blocks(100, 32 << 10)
    with open_store(server.url) as store:
        ok = store.write_blocks(list(zip(hashes, data)))
        assert ok[0] and not ok[-1]
        s = store.stats()
        assert s["errors"]["oom"] == ok.count(False) and s["write_failures"] == ok.count(False)
        assert s["up"] and s["down_episodes"] == 0  # a refusal is per block, not an outage
        assert store.read_blocks(list(zip(hashes[:1], empty(1, 32 << 10)))) == [True]


def test_budget_stops_writes(redis_server):
    hashes, data = make_blocks(8)
    with open_store(redis_server.url, budget_bytes=5 * (BLOCK + HEADER_SIZE)) as store:
        assert store.write_blocks(list(zip(hashes[:6], data[:6]))) == [True] * 5 + [False]
        assert store.write_blocks(list(zip(hashes[6:], data[6:]))) == [False, False]
        s = store.stats()
        assert s["skipped_budget"] == 3 and s["written_blocks"] == 5 and s["budget_used_bytes"] == 5 * (
            BLOCK + HEADER_SIZE)
        assert s["write_failures"] == 0


# ---- set-up errors -------------------------------------------------------------------


def test_wrong_or_missing_password(redis_factory):
    server = redis_factory(password="right-password")
    for url, needle in ((f"redis://:wrong-password@127.0.0.1:{server.port}", "refused the credentials"),
                        (f"redis://127.0.0.1:{server.port}", "refused the credentials")):
        with pytest.raises(RemoteSetupError, match=needle) as err:
            open_store(url, optional=True)  # credentials never heal: optional does not apply
        assert "DYN_KVBM_REMOTE_URL" in str(err.value) and "wrong-password" not in str(err.value)
        assert not err.value.unreachable
    with open_store(server.url) as store:
        assert store.is_up


def test_unreachable_at_startup(redis_factory):
    port = free_port()
    url = f"redis://127.0.0.1:{port}"
    with pytest.raises(RemoteSetupError, match="cannot reach Redis") as err:
        open_store(url, timeout_s=0.5)
    assert "DYN_KVBM_REMOTE_URL" in str(err.value) and "DYN_KVBM_REMOTE_OPTIONAL" in str(err.value)
    assert err.value.unreachable and isinstance(err.value, ConfigError)
    # optional: start without G4, join once Redis answers
    hashes, data = make_blocks(3)
    with open_store(url, timeout_s=0.5, optional=True) as store:
        assert not store.is_up
        assert store.write_blocks(list(zip(hashes, data))) == [False] * 3
        assert store.contains_prefix(hashes) == 0
        redis_factory(port=port)
        wait_until(lambda: store.is_up, "G4 came back")
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 3
        assert store.stats()["down_episodes"] == 1


def test_tls(redis_factory, tmp_path):
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    server = redis_factory(tls=(cert, key), password="tls-password")
    hashes, data = make_blocks(3)
    with open_store(server.url) as store:
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 3
        dests = empty(3)
        assert store.read_blocks(list(zip(hashes, dests))) == [True] * 3 and same(dests, data, [True] * 3)
    with pytest.raises(RemoteSetupError, match="DYN_KVBM_REMOTE_URL.*not trusted.*ssl_ca_certs") as err:
        open_store(server.url.split("?")[0], optional=True)  # the system CAs do not know this certificate
    assert not err.value.unreachable and "tls-password" not in str(err.value)
    with pytest.raises(RemoteSetupError, match="DYN_KVBM_REMOTE_URL"):
        open_store(server.url.replace("rediss://", "redis://").split("?")[0], timeout_s=0.5)  # plain TCP to TLS


def test_wrong_database_and_wrong_mode(redis_server):
    with pytest.raises(RemoteSetupError, match="DYN_KVBM_REMOTE_URL.*DB index"):
        open_store(redis_server.url + "/99")
    with pytest.raises(RemoteSetupError, match="DYN_KVBM_REMOTE_URL.*cluster"):
        open_store(redis_server.url + "?cluster=1")


# ---- faults mid-run ------------------------------------------------------------------


def test_killed_mid_run_then_back(redis_server):
    hashes, data = make_blocks(10)
    with open_store(redis_server.url) as store:
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 10
        redis_server.kill()
        dests = empty(10)
        assert store.read_blocks(list(zip(hashes, dests))) == [False] * 10
        assert not any(d.any() for d in dests)
        assert store.contains_prefix(hashes) == 0
        assert store.write_blocks(list(zip(hashes, data))) == [False] * 10
        s = store.stats()
        assert s["down_episodes"] == 1 and not s["up"] and s["errors"]["connection"] >= 1
        assert s["skipped_down"] >= 20  # answered at once while down, not retried per call
        redis_server.start()
        wait_until(lambda: store.is_up, "G4 came back")
        assert store.read_blocks(list(zip(hashes, empty(10)))) == [False] * 10  # a fresh, empty Redis
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 10
        dests = empty(10)
        assert store.read_blocks(list(zip(hashes, dests))) == [True] * 10 and same(dests, data, [True] * 10)
        assert store.stats()["down_episodes"] == 1


def test_concurrent_callers_never_see_an_exception(redis_server):
    hashes, data = make_blocks(16)
    failures: list[BaseException] = []
    stop = threading.Event()
    with open_store(redis_server.url) as store:

        def hammer(seed: int) -> None:
            try:
                while not stop.is_set():
                    store.write_blocks(list(zip(hashes, data)))
                    dests = empty(16)
                    ok = store.read_blocks(list(zip(hashes, dests)))
                    assert same(dests, data, ok)
                    store.contains_prefix(hashes)
            except BaseException as e:  # noqa: BLE001 - the test is that nothing gets here
                failures.append(e)

        threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: store.stats()["read_hits"] > 50, "traffic")
        redis_server.kill()
        wait_until(lambda: not store.is_up, "the outage was noticed")
        redis_server.start()
        wait_until(lambda: store.is_up and store.stats()["written_blocks"] > 0, "G4 came back")
        hits = store.stats()["read_hits"]
        wait_until(lambda: store.stats()["read_hits"] > hits + 50, "hits after the restart")
        stop.set()
        for t in threads:
            t.join(timeout=60)
    assert not failures, failures


def test_slow_redis_is_bounded_by_the_timeout(redis_server):
    hashes, data = make_blocks(4)
    with open_store(redis_server.url, timeout_s=0.3) as store:
        assert store.write_blocks(list(zip(hashes, data))) == [True] * 4
        sleeper = threading.Thread(target=lambda: raw(redis_server).execute_command("DEBUG", "SLEEP", "1"))
        sleeper.start()
        time.sleep(0.2)  # let DEBUG SLEEP reach the server first
        dests = empty(4)
        assert store.read_blocks(list(zip(hashes, dests))) == [False] * 4
        assert store.stats()["errors"]["timeout"] >= 1 and not store.is_up
        sleeper.join()
        wait_until(lambda: store.is_up, "G4 came back after the stall")
        dests = empty(4)
        ok = store.read_blocks(list(zip(hashes, dests)))
        assert ok == [True] * 4 and same(dests, data, ok)  # no reply of the stalled batch leaks in


# ---- Redis Cluster ---------------------------------------------------------------------


def test_cluster_round_trip_spread_over_nodes(redis_cluster, sends):
    n = 120
    hashes, data = make_blocks(n)
    with open_store(redis_cluster.url) as store:
        assert store.stats()["nodes"] == 3
        store.contains_prefix(hashes[:3])
        before = sends["n"]
        assert store.write_blocks(list(zip(hashes, data))) == [True] * n
        assert store.contains_prefix(hashes) == n
        dests = empty(n)
        ok = store.read_blocks(list(zip(hashes, dests)))
        assert ok == [True] * n and same(dests, data, ok)
        assert sends["n"] - before == 9  # one round trip per node and call
        assert all(int(node.cli("DBSIZE")) > 0 for node in redis_cluster.nodes)
    # one seed and ?cluster=1 finds the others
    with open_store(redis_cluster.nodes[1].url + "?cluster=1") as store:
        assert store.contains_prefix(hashes) == n
    with pytest.raises(RemoteSetupError, match="DYN_KVBM_REMOTE_URL.*Cluster node"):
        open_store(redis_cluster.nodes[0].url)


def owned_by(node, key: bytes) -> bool:
    try:
        return raw(node).exists(key) == 1
    except redis.exceptions.ResponseError:  # MOVED: another node's slot
        return False


def test_cluster_node_killed(fresh_redis_cluster):
    redis_cluster = fresh_redis_cluster
    n = 60
    hashes, data = make_blocks(n)
    with open_store(redis_cluster.url, timeout_s=0.5) as store:
        assert store.write_blocks(list(zip(hashes, data))) == [True] * n
        victim = redis_cluster.nodes[1]
        on_victim = [owned_by(victim, store.key(h)) for h in hashes]
        assert 0 < sum(on_victim) < n
        victim.kill()
        for _ in range(2):  # the first call finds the node dead, the second skips it at once
            dests = empty(n)
            ok = store.read_blocks(list(zip(hashes, dests)))
            assert ok == [not lost for lost in on_victim] and same(dests, data, ok)
            assert store.contains_prefix(hashes) == on_victim.index(True)
        s = store.stats()
        assert s["down_nodes"] == [f"127.0.0.1:{victim.port}"] and s["down_episodes"] == 1
        # stores to the live nodes still work; the lost keys are simply absent
        ok = store.write_blocks(list(zip(hashes, data)))
        assert ok == [not lost for lost in on_victim]
    # a server starting now comes up with the dead primary marked down, not with an error
    with open_store(redis_cluster.url, timeout_s=0.5) as late:
        assert late.stats()["down_nodes"] == [f"127.0.0.1:{victim.port}"]
        assert late.read_blocks(list(zip(hashes, empty(n)))) == [not lost for lost in on_victim]


def test_cluster_failover_to_a_replica(replicated_redis_cluster):
    cluster = replicated_redis_cluster
    n = 60
    hashes, data = make_blocks(n)
    with open_store(cluster.url, timeout_s=0.5) as store:
        assert store.stats()["nodes"] == 3  # primaries only
        assert store.write_blocks(list(zip(hashes, data))) == [True] * n
        primaries = cluster.primaries
        for node in primaries:  # replication is asynchronous: let the replicas catch up first
            assert raw(node).execute_command("WAIT", 1, 10_000) == 1
        victim = primaries[0]
        on_victim = [owned_by(victim, store.key(h)) for h in hashes]
        victim.kill()
        ok = store.read_blocks(list(zip(hashes, empty(n))))
        assert ok == [not lost for lost in on_victim]  # misses until a replica takes over

        def all_served() -> bool:
            dests = empty(n)
            ok = store.read_blocks(list(zip(hashes, dests)))
            assert same(dests, data, ok)
            return all(ok)

        wait_until(all_served, "the replica took over the dead primary's slots")
        wait_until(lambda: store.is_up, "the dead primary dropped out of the topology")
        assert store.contains_prefix(hashes) == n
        assert store.write_blocks(list(zip(hashes, data))) == [True] * n


# ---- doctor ------------------------------------------------------------------------------


def remote_config(url: str, **kwargs) -> KvbmConfig:
    return KvbmConfig(cpu_cache_gb=1, remote_url=parse_remote_url("DYN_KVBM_REMOTE_URL", url), **kwargs)


def test_doctor_remote_checks(redis_server, redis_factory):
    checks = {c.name: c for c in check_remote(remote_config(redis_server.url))}
    assert checks["G4 remote store"].status == PASS and "single node" in checks["G4 remote store"].detail
    assert checks["G4 eviction"].status == WARN and "maxmemory is 0" in checks["G4 eviction"].detail
    assert checks["G4 latency"].status == PASS
    bounded = redis_factory(extra=["--maxmemory", "10mb", "--maxmemory-policy", "allkeys-lru"])
    checks = {c.name: c for c in check_remote(remote_config(bounded.url))}
    assert checks["G4 eviction"].status == PASS
    noevict = redis_factory(extra=["--maxmemory", "10mb"])
    checks = {c.name: c for c in check_remote(remote_config(noevict.url))}
    assert checks["G4 eviction"].status == WARN and "noeviction" in checks["G4 eviction"].detail

    down = f"redis://127.0.0.1:{free_port()}"
    check, values = check_remote(remote_config(down, remote_timeout_secs=0.5))  # values: signed or not
    assert check.status == FAIL and "DYN_KVBM_REMOTE_URL" in check.detail and values.name == "G4 values"
    check, _ = check_remote(remote_config(down, remote_timeout_secs=0.5, remote_optional=True))
    assert check.status == WARN and "DYN_KVBM_REMOTE_OPTIONAL" in check.detail
    (check,) = check_remote(KvbmConfig(cpu_cache_gb=1))
    assert check.status == SKIP


def test_probe_reports_cluster(redis_cluster):
    report = probe_remote(redis_cluster.url)
    assert report["error"] is None and report["mode"] == "cluster" and report["nodes"] == 3
    assert report["version"] and report["latency_ms"] is not None
