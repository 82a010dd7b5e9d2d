"""G4: KV blocks in Redis or Redis Cluster, shared by every server that points at it.

Several vLLM servers (replicas behind a load balancer, prefill workers) serve
the same users; without a shared tier each recomputes prefixes another one
already holds. G4 keeps blocks in an existing store, Redis, instead of a
home-made server: Redis already does memory bounds (``maxmemory`` with
``maxmemory-policy allkeys-lru``: an evicted key is simply a miss), TTLs,
replication and sharding (Redis Cluster).

Keys: ``<namespace>:<identity digest>:<block hash hex>``. The identity digest
(BLAKE2b-128) covers the caller's model identity string, this value format and
the tensor-parallel rank and world size (each rank holds its own shard of a
block), so different models, dtypes or layouts never share a key; cache salts
and LoRA adapters are already folded into the block hash.

Values: a 68-byte header, then the payload. Header, little-endian: magic
``KVBMG4\\0\\1`` (8), format version (u16, 2), flags (u16: 1 = keyed), block
hash (16), identity digest (16), payload length (u64), then a 16-byte tag over
the preceding 52 header bytes and the payload: with a fleet secret
(``remote_secret``, see config), keyed BLAKE3 (its MAC mode) truncated to 128
bits under a key derived from it; without one, a CRC-32 (u32) and 12 zero bytes. A value that
fails any check (absent header, other format, other block or identity, wrong
length, checksum, tag) is a miss: counted, logged once per kind, deleted
best-effort, never copied into the destination. SET is atomic per key, so a
block is visible only once its whole value is stored.

Trust (docs/g4.md): without a secret, values are protected against accidents
only: anyone who can write to the namespace and knows the model can compute a
valid header and CRC and have any KV served. With one, only holders of the
secret can make a value that verifies: a forged one is a miss (``forged``).
The secret's key id is folded into the identity digest, so servers with
different secrets (or none) use different keys and never delete each other's
values as forged; a changed secret starts from an empty G4.

Round trips: every call is pipelined, one round trip per node and batch
(``EXISTS`` per key for lookups, ``GETRANGE key 0 <value size>`` for loads,
``SET [EX ttl]`` for stores), never one per block. ``GETRANGE`` rather than
``GET``: Redis sends at most one byte more than a block's value, so a huge
hostile or stale value costs that, not its size (it is then too long: a miss).
Commands are framed and replies parsed by kvbm, straight on the socket, so a
value's payload is received into one buffer and never copied by the client
library, and one deadline (``timeout_s``) covers the whole round trip: a slow
link that trickles bytes cannot stretch it as a per-read socket timeout would.
Batches are bounded in keys and bytes so a round trip stays well inside it.

Redis Cluster: redis-py's :class:`~redis.cluster.RedisCluster` supplies the
topology (slot of a key, node of a slot, refreshes); the commands then go out
as one plain pipeline per node, in parallel. Not redis-py's cluster pipeline:
one unreachable node fails that pipeline as a whole, and its fallback resends
failed commands one at a time (a round trip per block). Per-node pipelines
keep the other nodes' keys served while one node is down: its keys are misses.

Faults never raise into the caller: connecting and each round trip as a whole
are bounded by ``timeout_s`` (see Round trips), and a node that errors or
times out is marked down (a circuit breaker: one log line per episode,
counted); while it is down every operation on its keys
answers at once (misses, dropped stores). A background thread pings it with
exponential backoff and puts it back when it answers, refreshing the cluster
topology meanwhile (a failover moves slots to a replica). Set-up problems at
start (bad URL, wrong password, unreachable) raise :class:`RemoteSetupError`
naming the ``remote_url`` setting (see config) from :meth:`RemoteStore.open`.

This module is the store: keys, what each operation sends and what its replies
mean, counters. Its parts: :mod:`~kvbm.storage.remote_codec` (the value
format: header, tag, checks), :mod:`~kvbm.storage.remote_nodes` (routing,
pipelines, circuit breakers, the prober), :mod:`~kvbm.storage.remote_wire`
(RESP framing on the socket), :mod:`~kvbm.storage.remote_budget` (the byte
budget and TTL accounting) and :mod:`~kvbm.storage.remote_errors` (fault kinds
and set-up errors).
"""

from __future__ import annotations

import binascii
import logging
import os
import statistics
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.backoff import NoBackoff
from redis.retry import Retry

from kvbm.config import (
    ConfigError,
    KvbmConfig,
    RemoteTarget,
    env_var,
    parse_remote_namespace,
    parse_remote_url,
)
from kvbm.core.hashing import HASH_BYTES, BlockHash
from kvbm.storage.buffers import as_u8
from kvbm.storage.kinds import BAD_VALUE_KINDS, ERROR_KINDS, LATENCY_BUCKETS_S
from kvbm.storage.remote_budget import RemoteBudget
from kvbm.storage.remote_codec import (
    FLAG_KEYED,
    FORMAT_VERSION,
    HEADER_SIZE,
    MAC_THREAD_BYTES,
    MAGIC,
    ValueCodec,
    identity_digest,
    mac_key,
    remote_secret,
)
from kvbm.storage.remote_errors import FAULTS, RemoteSetupError, config_value, setup_error
from kvbm.storage.remote_nodes import DOWN, RemoteNodes
from kvbm.storage.remote_wire import Value

logger = logging.getLogger(__name__)

__all__ = [
    "ERROR_KINDS", "FLAG_KEYED", "FORMAT_VERSION", "HEADER_SIZE", "LATENCY_BUCKETS_S", "MAGIC", "RemoteSetupError",
    "RemoteStore", "identity_digest", "probe_remote", "remote_secret",
]

#: The counters of :meth:`RemoteStore.stats`, in their order there (some are counted by the nodes).
_COUNTERS = (
    "lookups", "lookup_blocks", "lookup_hits", "read_blocks", "read_hits", "read_misses", "read_bytes",
    "write_blocks", "written_blocks", "written_bytes", "write_failures", "skipped_down",
    "skipped_budget", "deleted_bad", "round_trips", "down_episodes",
)


class RemoteStore:
    """Blocks of one model identity and tensor-parallel rank in Redis; see the module docstring.

    ``read_blocks``/``write_blocks`` use this rank's keys; ``contains_prefix``
    checks the keys of every rank (a block counts only if all its shards are
    there), so the scheduler-side leader can hold a store of any rank.
    Thread-safe. Network, server and data faults never raise: they are
    misses and failed stores, counted in :meth:`stats`.
    """

    def __init__(
        self,
        target: RemoteTarget | str,
        identity: str,
        *,
        namespace: str = "kvbm",
        rank: int = 0,
        world_size: int = 1,
        ttl_secs: int | None = None,
        budget_bytes: int | None = None,
        timeout_s: float = 2.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        batch_keys: int = 1024,
        batch_bytes: int = 16 << 20,
        lookup_batch_keys: int = 16384,
        secret: bytes | None = None,
    ) -> None:
        """``secret``: the fleet secret (see :func:`remote_secret`); values are then signed and
        only values signed with it are served. None: CRC-32 only (no protection against writers)."""
        if isinstance(target, str):
            target = parse_remote_url(env_var("remote_url"), target)
        namespace = parse_remote_namespace(env_var("remote_namespace"), namespace)
        if not 0 <= rank < world_size:
            raise ValueError(f"RemoteStore: rank {rank} is not in [0, {world_size})")
        if not identity:
            raise ValueError("RemoteStore: identity is empty; pass the model identity (never share across models)")
        for name, value in (("timeout_s", timeout_s), ("backoff_s", backoff_s), ("batch_keys", batch_keys),
                            ("batch_bytes", batch_bytes), ("lookup_batch_keys", lookup_batch_keys)):
            if value <= 0:
                raise ValueError(f"RemoteStore: {name} must be > 0, got {value}")
        self.target = target
        self.namespace = namespace
        self.rank, self.world_size = rank, world_size
        self.ttl_secs = ttl_secs or None
        self.budget_bytes = budget_bytes or None
        self.timeout_s = timeout_s
        self._batch_keys, self._batch_bytes, self._lookup_batch_keys = batch_keys, batch_bytes, lookup_batch_keys
        mac, key_id = (None, "") if secret is None else mac_key(secret)
        self._codec = ValueCodec(mac, identity_digest(identity, rank, world_size, key_id))
        self._prefixes = [
            f"{namespace}:{identity_digest(identity, r, world_size, key_id).hex()}:".encode()
            for r in range(world_size)
        ]
        self._prefix = self._prefixes[rank]
        client_kwargs: dict[str, Any] = dict(
            username=target.username, password=target.password, ssl=target.tls,
            **({"ssl_ca_certs": target.ca_certs} if target.ca_certs else {}),
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            client_name="kvbm-g4",
        )
        self._lock = threading.Lock()
        self._closed = False
        self._tag_pool: ThreadPoolExecutor | None = None
        self._logged: set[str] = set()
        self._budget = RemoteBudget(self.budget_bytes, self.ttl_secs, lock=self._lock)
        self._counters: dict[str, int] = dict.fromkeys((
            "lookups", "lookup_blocks", "lookup_hits", "read_blocks", "read_hits", "read_misses", "read_bytes",
            "write_blocks", "written_blocks", "written_bytes", "write_failures", "skipped_budget", "deleted_bad",
        ), 0)
        self._bad = dict.fromkeys(BAD_VALUE_KINDS, 0)
        self._net = RemoteNodes(target, client_kwargs, lock=self._lock, timeout_s=timeout_s, backoff_s=backoff_s,
                                max_backoff_s=max(backoff_s, max_backoff_s), batch_keys=batch_keys,
                                batch_bytes=batch_bytes)

    # ---- construction ------------------------------------------------------
    @classmethod
    def open(cls, target: RemoteTarget | str, identity: str, *, optional: bool = False,
             **kwargs: Any) -> RemoteStore:
        """A store that has answered a PING on every node, or a clear :class:`RemoteSetupError`.

        With ``optional``, an unreachable Redis is logged and the store
        starts down: operations are misses until Redis answers, then G4 joins
        by itself. Wrong credentials or a wrong kind of server raise anyway.
        """
        store = cls(target, identity, **kwargs)
        try:
            store.check()
        except RemoteSetupError as e:
            if not (optional and e.unreachable):
                store.close()
                raise
            logger.warning("kvbm: starting WITHOUT the shared G4 tier for now (%s is set): %s. kvbm keeps "
                           "trying in the background and uses G4 as soon as Redis answers.",
                           env_var("remote_optional"), e)
            store._net.trip_all(e.__cause__ or e)
            return store
        logger.info("kvbm: shared G4 tier ready: %s (%s), namespace %r, rank %d/%d, ttl %s, budget %s, values %s",
                    store.target, f"cluster of {len(store._net.nodes)} primaries" if store.target.cluster else
                    "single node", store.namespace, store.rank, store.world_size,
                    f"{store.ttl_secs} s" if store.ttl_secs else "none",
                    f"{store.budget_bytes / 1e9:g} GB" if store.budget_bytes else "none",
                    "signed with the fleet secret (keyed BLAKE3)" if store.keyed else "checksummed only (no secret)")
        store._advise_eviction_policy()
        return store

    @classmethod
    def from_config(cls, config: KvbmConfig, identity: str, *, rank: int = 0, world_size: int = 1,
                    announce: bool = False) -> RemoteStore:
        """:meth:`open` with the ``remote_*`` settings (see config); the budget is shared by the ranks.

        ``announce``: this process speaks for the server (the leader), so it logs the one
        startup WARNING that, without ``remote_secret``, G4 trusts everyone who can write to Redis.
        """
        if config.remote_url is None:
            raise ValueError("from_config: no remote store configured (remote_url is None)")
        secret = remote_secret(config)  # a bad secret file fails here, before any connection
        budget = int(config.remote_budget_gb * 1e9 / world_size) if config.remote_budget_gb else None
        store = cls.open(config.remote_url, identity, optional=config.remote_optional,
                         namespace=config.remote_namespace, rank=rank, world_size=world_size,
                         ttl_secs=config.remote_ttl_secs, budget_bytes=budget, timeout_s=config.remote_timeout_secs,
                         secret=secret)
        if announce and secret is None:
            logger.warning(
                "kvbm: G4 values are NOT authenticated: %s is not set, so every client that can write to this "
                "Redis (namespace %r) can have any KV served to every server of the fleet. Set %s or %s "
                "(the same secret on every server; docs/g4.md, trust model).",
                env_var("remote_secret"), store.namespace, env_var("remote_secret"), env_var("remote_secret_file"))
        return store

    @property
    def keyed(self) -> bool:
        """Values are signed with a fleet secret (and only signed ones are served)."""
        return self._codec.mac is not None

    def check(self) -> None:
        """Connect and PING every node now; raise :class:`RemoteSetupError` saying what to fix.

        A cluster with some primaries unreachable starts with those marked
        down (their keys are misses until they answer); none reachable, wrong
        credentials or the wrong kind of server raise.
        """
        self._net.check()

    def _advise_eviction_policy(self) -> None:
        for breaker in list(self._net.nodes.values()):
            policy = config_value(breaker.client, "maxmemory-policy")
            if policy and not policy.startswith("allkeys-") and not (self.ttl_secs and policy != "noeviction"):
                logger.warning("kvbm: Redis %s has maxmemory-policy %s: once full, G4 stores fail (counted) "
                               "instead of evicting old blocks; set `maxmemory-policy allkeys-lru`",
                               breaker.name, policy)
                return

    # ---- public API ----------------------------------------------------------
    def key(self, block_hash: BlockHash, rank: int | None = None) -> bytes:
        """The Redis key of a block's shard of ``rank`` (default: this store's rank)."""
        return self._prefixes[self.rank if rank is None else rank] + binascii.hexlify(block_hash)

    def contains_prefix(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of ``hashes`` G4 holds (all ranks' shards): one round trip
        per node for the whole list (per ``lookup_batch_keys`` keys, stopping at a miss).

        A hint, not a promise: a key may be evicted or expire before it is
        read, and values are verified only when read (a miss then).
        """
        self._ensure_open()
        _check_hashes(hashes)
        found = 0
        per_chunk = max(1, self._lookup_batch_keys // self.world_size)
        width = self.world_size
        for start in range(0, len(hashes), per_chunk):
            chunk = hashes[start:start + per_chunk]
            commands = [("EXISTS", prefix + binascii.hexlify(h)) for h in chunk for prefix in self._prefixes]
            replies = self._net.execute("lookup", commands, max_keys=len(commands))
            present = [r == 1 for r in replies]
            run = next((j for j in range(len(chunk)) if not all(present[j * width:(j + 1) * width])), len(chunk))
            found += run
            if run < len(chunk):
                break
        self._count(lookups=1, lookup_blocks=len(hashes), lookup_hits=found)
        return found

    def read_blocks(self, items: Sequence[tuple[BlockHash, Any]]) -> list[bool]:
        """Load ``(block_hash, dest)`` items; per item True only if a verified value was copied in.

        ``dest``: any writable C-contiguous buffer (numpy array, CPU tensor,
        bytearray) of the block's size. False is a miss (absent, evicted,
        expired, node down, bad value): recompute; a failed item's ``dest`` is
        untouched. Raises ValueError only for caller bugs (bad hash or buffer).
        """
        self._ensure_open()
        items = list(items)
        _check_hashes([h for h, _ in items])
        dests = [as_u8(d, writable=True, what=f"destination of block {h.hex()}") for h, d in items]
        keys = [self._prefix + binascii.hexlify(h) for h, _ in items]
        sizes = [d.size + HEADER_SIZE for d in dests]
        # At most one byte past the value's size: a longer value is refused without receiving it.
        commands = [("GETRANGE", k, 0, n) for k, n in zip(keys, sizes)]
        checks: list[Any] = [None] * len(items)

        def arrived(i: int, reply: Any) -> None:
            """Verify (MAC) a large value on a tag thread while the next one is received."""
            if self._codec.mac is not None and isinstance(reply, bytearray) and len(reply) >= MAC_THREAD_BYTES:
                checks[i] = self._tag_threads().submit(self._codec.verify, items[i][0], reply, dests[i])

        replies = self._net.execute("read", commands, sizes=sizes, max_bulk=max(sizes, default=0) + 1,
                                on_reply=arrived)
        ok, bad_keys, nbytes = [], [], 0
        for (block_hash, _), key, dst, reply, check in zip(items, keys, dests, replies, checks):
            if check is not None:  # verified as it arrived (even if a later reply of its batch failed)
                problem = check.result()
            elif reply is DOWN or isinstance(reply, Exception):
                problem = "down"
            else:
                problem = self._codec.verify(block_hash, reply, dst)
            ok.append(problem is None)
            if problem is None:
                nbytes += dst.size
            elif problem in BAD_VALUE_KINDS:
                bad_keys.append(key)
                self._bad_value(problem, block_hash)
        hits = sum(ok)
        self._count(read_blocks=len(items), read_hits=hits, read_misses=len(items) - hits, read_bytes=nbytes)
        if bad_keys:  # best effort: the next writer replaces them anyway
            deleted = self._net.execute("delete", [("DEL", k) for k in bad_keys])
            self._count(deleted_bad=sum(r == 1 for r in deleted))
        return ok

    def write_blocks(self, items: Sequence[tuple[BlockHash, Any]]) -> list[bool]:
        """Store ``(block_hash, src)`` items; per item True once Redis acknowledged the whole value.

        ``src``: any C-contiguous buffer. False: node down, Redis refused
        (e.g. out of memory with ``noeviction``), or over ``budget_bytes``;
        the block then simply stays absent. Raises ValueError only for caller bugs.
        """
        self._ensure_open()
        items = list(items)
        _check_hashes([h for h, _ in items])
        srcs = [as_u8(s, writable=False, what=f"data of block {h.hex()}") for h, s in items]
        admitted = self._budget.admit([s.size + HEADER_SIZE for s in srcs])
        ex = ("EX", self.ttl_secs) if self.ttl_secs else ()
        pairs = [(h, s) for (h, _), s in zip(items[:admitted], srcs[:admitted])]
        if self._codec.mac is not None and len(pairs) > 1 and sum(s.size for _, s in pairs) >= 2 * MAC_THREAD_BYTES:
            # MACs on the tag threads, in order, while the values before them are being sent
            pool = self._tag_threads()
            values = [Value(pool.submit(self._codec.header, h, s), s) for h, s in pairs]
        else:
            values = [Value(self._codec.header(h, s), s) for h, s in pairs]
        commands = [("SET", self._prefix + binascii.hexlify(h), value, *ex) for (h, _), value in zip(pairs, values)]
        replies = self._net.execute("write", commands, sizes=[s.size + HEADER_SIZE for s in srcs[:admitted]])
        ok = [r == b"OK" for r in replies] + [False] * (len(items) - admitted)
        stored = sum(s.size + HEADER_SIZE for s, good in zip(srcs, ok) if good)
        self._budget.charge(stored)
        good = sum(ok)
        self._count(write_blocks=len(items), written_blocks=good,
                    written_bytes=sum(s.size for s, g in zip(srcs, ok) if g),
                    write_failures=admitted - good, skipped_budget=len(items) - admitted)
        return ok

    @property
    def is_up(self) -> bool:
        """No node (and not the cluster topology) is marked down."""
        with self._lock:
            return all(b.down_since is None for b in self._net.breakers())

    def stats(self) -> dict[str, Any]:
        """Counters for metrics (monotonic except the gauges ``up``, ``down_nodes``, ``budget_used_bytes``)."""
        with self._lock:
            down = sorted(b.name for b in self._net.breakers() if b.down_since is not None)
            counters = {**self._counters, **self._net.counters}
            return {
                **{name: counters[name] for name in _COUNTERS},
                "errors": dict(self._net.errors),
                "bad_values": dict(self._bad),
                "latency": {op: h.snapshot() for op, h in self._net.latency.items()},
                "up": not down,
                "down_nodes": down,
                "nodes": len(self._net.nodes),
                "budget_used_bytes": self._budget.used,
            }

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RemoteStore {self.target} is closed")

    def close(self) -> None:
        """Stop the prober and close the connections (the store holds a thread until then)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._net.closed = True
        self._net.stop()
        if self._tag_pool is not None:
            self._tag_pool.shutdown(wait=True)
        self._net.close_clients()

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- values ----------------------------------------------------------------
    def _bad_value(self, kind: str, block_hash: BlockHash) -> None:
        with self._lock:
            self._bad[kind] += 1
            first = f"bad:{kind}" not in self._logged
            self._logged.add(f"bad:{kind}")
        if first:
            what = {
                "corrupt": "failed its checksum",
                "forged": f"failed its authentication tag: written by a client without this fleet's "
                          f"{env_var('remote_secret')} (or with another one), or altered in Redis",
            }.get(kind, "is not this block's value (other block, identity, format or size)")
            logger.warning("kvbm: G4 value of block %s %s; treated as a miss and deleted. Further ones are only "
                           "counted.", block_hash.hex(), what)

    def _tag_threads(self) -> ThreadPoolExecutor:
        """Threads for MACs of large values: hashlib releases the GIL, so they run beside the
        socket I/O and each other. Not the fan-out pool, whose tasks wait for these."""
        with self._lock:
            if self._tag_pool is None:
                self._tag_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                    thread_name_prefix="kvbm-g4-mac")
            return self._tag_pool

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, n in deltas.items():
                self._counters[key] += n


def _check_hashes(hashes: Sequence[BlockHash]) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_BYTES:
            raise ValueError(f"block hash {h!r} is not {HASH_BYTES} bytes")


def probe_remote(target: RemoteTarget | str, timeout_s: float = 2.0, pings: int = 5) -> dict[str, Any]:
    """Connect, PING, and read what matters about a Redis for G4 (for ``kvbm doctor``).

    Returns ``error`` (None or a message naming the setting), ``mode``,
    ``nodes``, ``version``, ``maxmemory``, ``maxmemory_policy`` (None where
    CONFIG is disabled), and ``latency_ms`` (median PING round trip).
    """
    report: dict[str, Any] = {"target": str(target), "error": None, "unreachable": False, "mode": None, "nodes": 0,
                              "version": None, "maxmemory": None, "maxmemory_policy": None, "latency_ms": None}
    try:
        store = RemoteStore(target, "kvbm-doctor", timeout_s=timeout_s)
    except ConfigError as e:
        report["error"] = str(e)
        return report
    try:
        store.check()
        nodes = list(store._net.nodes.values())
        report["mode"] = "cluster" if store.target.cluster else "single node"
        report["nodes"] = len(nodes)
        client = nodes[0].client
        report["version"] = client.info("server").get("redis_version")
        maxmemory = config_value(client, "maxmemory")
        report["maxmemory"] = int(maxmemory) if maxmemory is not None else None
        report["maxmemory_policy"] = config_value(client, "maxmemory-policy")
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            client.ping()
            rtts.append(time.perf_counter() - start)
        report["latency_ms"] = statistics.median(rtts) * 1e3
    except RemoteSetupError as e:
        report["error"], report["unreachable"] = str(e), e.unreachable
    except FAULTS as e:
        err = setup_error(store.target, e)
        report["error"], report["unreachable"] = str(err), err.unreachable
    finally:
        store.close()
    return report
