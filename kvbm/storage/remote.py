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

Values: a 56-byte header, then the payload. Header, little-endian: magic
``KVBMG4\\0\\1`` (8), format version (u16), flags (u16, 0), block hash (16),
identity digest (16), payload length (u64), CRC-32 of the preceding 52 header
bytes continued over the payload (u32). A value that fails any check (absent
header, other format, other block or identity, wrong length, checksum) is a
miss: counted, logged once per kind, deleted best-effort, never returned. SET
is atomic per key, so a block is visible only once its whole value is stored.

Round trips: every call is pipelined, one round trip per node and batch
(``EXISTS`` per key for lookups, ``GET`` for loads, ``SET [EX ttl]`` for
stores), never one per block. Batches are bounded in keys and bytes so a huge
call cannot hit the socket timeout as a whole (Python's ``sendall`` timeout
covers the whole send).

Redis Cluster: redis-py's :class:`~redis.cluster.RedisCluster` supplies the
topology (slot of a key, node of a slot, refreshes); the commands then go out
as one plain pipeline per node, in parallel. Not redis-py's cluster pipeline:
one unreachable node fails that pipeline as a whole, and its fallback resends
failed commands one at a time (a round trip per block). Per-node pipelines
keep the other nodes' keys served while one node is down: its keys are misses.

Faults never raise into the caller: connect and socket timeouts are bounded,
and a node that errors or times out is marked down (a circuit breaker: one
log line per episode, counted); while it is down every operation on its keys
answers at once (misses, dropped stores). A background thread pings it with
exponential backoff and puts it back when it answers, refreshing the cluster
topology meanwhile (a failover moves slots to a replica). Set-up problems at
start (bad URL, wrong password, unreachable) raise :class:`RemoteSetupError`
naming the ``remote_url`` setting (see config) from :meth:`RemoteStore.open`.
"""

from __future__ import annotations

import binascii
import logging
import statistics
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from kvbm.config import ConfigError, KvbmConfig, RemoteTarget, env_var, parse_remote_namespace, parse_remote_url
from kvbm.core.hashing import HASH_BYTES, BlockHash
from kvbm.storage.buffers import as_u8
from kvbm.storage.remote_index import BAD_VALUE_KINDS, ERROR_KINDS, LATENCY_BUCKETS_S

try:  # ISA-L's CRC-32: the same checksum as zlib's, ~5-10x faster (PCLMUL), so writes keep up with the network
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives identical values, only slower
    _crc32 = zlib.crc32

logger = logging.getLogger(__name__)

__all__ = [
    "ERROR_KINDS", "HEADER_SIZE", "LATENCY_BUCKETS_S", "RemoteSetupError", "RemoteStore", "identity_digest",
    "probe_remote",
]

MAGIC = b"KVBMG4\x00\x01"
FORMAT_VERSION = 1
#: magic, version, flags, block hash, identity digest, payload length
_HDR = struct.Struct(f"<8sHH{HASH_BYTES}s{HASH_BYTES}sQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _HDR.size + _CRC.size
_DIGEST_TAG = b"kvbm-g4-v1|"

OPS = ("lookup", "read", "write", "delete")


class RemoteSetupError(ConfigError):
    """G4 cannot be used as configured; the message names the setting and the fix.

    ``unreachable`` tells "no answer" (which may heal, so ``remote_optional``
    may start without G4) from wrong credentials or a wrong kind of server (which never heal).
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def identity_digest(identity: str, rank: int = 0, world_size: int = 1) -> bytes:
    """The 16-byte digest in a rank's keys and values: model identity, value format and shard."""
    return blake2b(_DIGEST_TAG + f"{identity}|rank {rank}/{world_size}".encode(), digest_size=16).digest()


def _error_kind(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
                      redis.exceptions.NoPermissionError)) or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return "auth"
    if isinstance(e, redis.exceptions.BusyLoadingError) or text.startswith(("LOADING", "BUSY", "MASTERDOWN",
                                                                              "TRYAGAIN", "CLUSTERDOWN")):
        return "busy"
    if isinstance(e, (redis.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (redis.exceptions.ConnectionError, OSError)):
        return "connection"
    if isinstance(e, redis.exceptions.AskError) or text.startswith(("MOVED", "ASK")):
        return "moved"
    if isinstance(e, getattr(redis.exceptions, "OutOfMemoryError", ())) or text.startswith("OOM") \
            or "maxmemory" in text:
        return "oom"
    if isinstance(e, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return "readonly"
    if isinstance(e, redis.exceptions.ResponseError):
        return "response"
    return "other"


#: What a Redis call may raise on network, server or cluster trouble (never a kvbm bug).
_FAULTS = (RedisError, RedisClusterException, OSError)

#: Payloads at least this large go to the socket as they are; smaller ones are gathered into one write.
_SEND_DIRECT_BYTES = 32 << 10
_FLUSH_BYTES = 64 << 10


@dataclass(frozen=True)
class _Value:
    """A block's value: header and payload, sent without joining them."""

    header: bytes
    payload: np.ndarray


def _frames(commands: list[tuple[Any, ...]]) -> Iterator[Any]:
    """RESP for ``commands``, lazily: small pieces gathered into one write, large payloads
    passed to the socket as they are."""
    buf = bytearray()
    for args in commands:
        buf += b"*%d\r\n" % len(args)
        for arg in args:
            if isinstance(arg, _Value):
                buf += b"$%d\r\n" % (HEADER_SIZE + arg.payload.size)
                buf += arg.header
                if arg.payload.size >= _SEND_DIRECT_BYTES:
                    yield buf
                    yield arg.payload
                    buf = bytearray(b"\r\n")
                else:
                    buf += arg.payload.data
                    buf += b"\r\n"
                continue
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            buf += b"$%d\r\n" % len(data)
            buf += data
            buf += b"\r\n"
        if len(buf) >= _FLUSH_BYTES:
            yield buf
            buf = bytearray()
    if buf:
        yield buf


def _read_reply(conn: Any) -> Any:
    try:
        return conn.read_response()
    except redis.exceptions.ResponseError as e:  # a refused command; the connection is still in step
        return e


def _get_connection(pool: Any) -> Any:
    try:
        return pool.get_connection()
    except TypeError:  # redis-py < 5.3 wants a command name
        return pool.get_connection("_")


#: A command's place in a result list when its node was down or failed: a miss.
_DOWN = object()


@dataclass(eq=False)
class _Breaker:
    """Circuit breaker of one Redis node (or of the cluster topology): down for a
    backoff period after an error; a background thread probes it back up."""

    name: str
    probe: Callable[[], None]
    down_since: float | None = None
    retry_at: float = 0.0
    backoff: float = 0.0
    skipped: int = 0
    client: Any = field(default=None, repr=False)


class _Histogram:
    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        i = 0
        while i < len(LATENCY_BUCKETS_S) and seconds > LATENCY_BUCKETS_S[i]:
            i += 1
        self.counts[i] += 1
        self.sum += seconds

    def snapshot(self) -> dict[str, Any]:
        cumulative, total = [], 0
        for le, n in zip((*LATENCY_BUCKETS_S, float("inf")), self.counts):
            total += n
            cumulative.append((le, total))
        return {"buckets": cumulative, "sum": self.sum, "count": total}


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
    ) -> None:
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
        self._backoff_s, self._max_backoff_s = backoff_s, max(backoff_s, max_backoff_s)
        self._batch_keys, self._batch_bytes, self._lookup_batch_keys = batch_keys, batch_bytes, lookup_batch_keys
        self._digest = identity_digest(identity, rank, world_size)
        self._prefixes = [
            f"{namespace}:{identity_digest(identity, r, world_size).hex()}:".encode() for r in range(world_size)
        ]
        self._prefix = self._prefixes[rank]
        self._client_kwargs: dict[str, Any] = dict(
            username=target.username, password=target.password, ssl=target.tls,
            **({"ssl_ca_certs": target.ca_certs} if target.ca_certs else {}),
            socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0),
            client_name="kvbm-g4",
        )
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._prober: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._logged: set[str] = set()
        self._refresh_due = False
        self._budget_used = 0
        self._budget_expiry: deque[tuple[float, int]] = deque()
        self._counters: dict[str, int] = dict.fromkeys((
            "lookups", "lookup_blocks", "lookup_hits", "read_blocks", "read_hits", "read_misses", "read_bytes",
            "write_blocks", "written_blocks", "written_bytes", "write_failures", "skipped_down",
            "skipped_budget", "deleted_bad", "round_trips", "down_episodes",
        ), 0)
        self._errors = dict.fromkeys(ERROR_KINDS, 0)
        self._bad = dict.fromkeys(BAD_VALUE_KINDS, 0)
        self._latency = {op: _Histogram() for op in OPS}
        self._nodes: dict[str, _Breaker] = {}
        self._cluster: RedisCluster | None = None
        self._topology: _Breaker | None = None
        if target.cluster:
            self._topology = _Breaker("cluster topology", self._connect_cluster)
        else:
            host, port = target.nodes[0]
            self._node(host, port, db=target.db)

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
            store._trip_all(e.__cause__ or e)
            return store
        logger.info("kvbm: shared G4 tier ready: %s (%s), namespace %r, rank %d/%d, ttl %s, budget %s",
                    store.target, f"cluster of {len(store._nodes)} primaries" if store.target.cluster else
                    "single node", store.namespace, store.rank, store.world_size,
                    f"{store.ttl_secs} s" if store.ttl_secs else "none",
                    f"{store.budget_bytes / 1e9:g} GB" if store.budget_bytes else "none")
        store._advise_eviction_policy()
        return store

    @classmethod
    def from_config(cls, config: KvbmConfig, identity: str, *, rank: int = 0, world_size: int = 1) -> RemoteStore:
        """:meth:`open` with the ``remote_*`` settings (see config); the budget is shared by the ranks."""
        if config.remote_url is None:
            raise ValueError("from_config: no remote store configured (remote_url is None)")
        budget = int(config.remote_budget_gb * 1e9 / world_size) if config.remote_budget_gb else None
        return cls.open(config.remote_url, identity, optional=config.remote_optional,
                        namespace=config.remote_namespace, rank=rank, world_size=world_size,
                        ttl_secs=config.remote_ttl_secs, budget_bytes=budget, timeout_s=config.remote_timeout_secs)

    def check(self) -> None:
        """Connect and PING every node now; raise :class:`RemoteSetupError` saying what to fix.

        A cluster with some primaries unreachable starts with those marked
        down (their keys are misses until they answer); none reachable, wrong
        credentials or the wrong kind of server raise.
        """
        try:
            if self._topology is not None:
                self._connect_cluster()
        except _FAULTS as e:
            raise _setup_error(self.target, e) from e
        answered, unreachable = 0, []
        for breaker in list(self._nodes.values()):
            try:
                breaker.probe()
            except _FAULTS as e:
                error = _setup_error(self.target, e)
                if not error.unreachable:
                    raise error from e
                unreachable.append((breaker, error, e))
                continue
            answered += 1
            if not self.target.cluster and _cluster_enabled(breaker.client):
                raise RemoteSetupError(
                    f"{env_var('remote_url')}={self.target}: this Redis is a Redis Cluster node; list "
                    "several seed nodes (redis://h1:p1,redis://h2:p2) or add ?cluster=1 to the URL")
        if unreachable and not answered:
            _, error, cause = unreachable[0]
            raise error from cause
        for breaker, _, cause in unreachable:
            self._trip(breaker, cause)

    def _node(self, host: str, port: int, db: int = 0) -> _Breaker:
        name = f"{host}:{port}"
        breaker = self._nodes.get(name)
        if breaker is None:
            client = redis.Redis(host=host, port=port, db=db, **self._client_kwargs)
            with self._lock:
                breaker = self._nodes.setdefault(name, _Breaker(name, client.ping, client=client))
            if breaker.client is not client:  # another thread was first
                _quietly(client.close)
        return breaker

    def _connect_cluster(self) -> None:
        """(Re)read the cluster topology: slots to primaries. Raises if no seed answers."""
        if self._cluster is None:
            kwargs = {k: v for k, v in self._client_kwargs.items() if k != "client_name"}
            self._cluster = RedisCluster(
                startup_nodes=[ClusterNode(h, p) for h, p in self.target.nodes], require_full_coverage=False,
                **kwargs)
        else:
            self._cluster.nodes_manager.initialize()
        primaries = {f"{n.host}:{n.port}": n for n in self._cluster.get_primaries()}
        for node in primaries.values():
            self._node(node.host, node.port)
        with self._lock:  # a node that lost its slots (failed over) no longer counts, even if down
            gone = [self._nodes.pop(name) for name in list(self._nodes) if name not in primaries]
        for breaker in gone:
            logger.info("kvbm: G4 Redis %s left the cluster's primaries; its slots are served elsewhere", breaker.name)
            _quietly(breaker.client.close)

    def _advise_eviction_policy(self) -> None:
        for breaker in list(self._nodes.values()):
            policy = _config_value(breaker.client, "maxmemory-policy")
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
            replies = self._execute("lookup", commands, max_keys=len(commands))
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
        replies = self._execute("read", [("GET", k) for k in keys], sizes=[d.size + HEADER_SIZE for d in dests])
        ok, bad_keys, nbytes = [], [], 0
        for (block_hash, _), key, dst, reply in zip(items, keys, dests, replies):
            problem = "down" if reply is _DOWN or isinstance(reply, Exception) else self._verify(block_hash, reply, dst)
            ok.append(problem is None)
            if problem is None:
                nbytes += dst.size
            elif problem in BAD_VALUE_KINDS:
                bad_keys.append(key)
                self._bad_value(problem, block_hash)
        hits = sum(ok)
        self._count(read_blocks=len(items), read_hits=hits, read_misses=len(items) - hits, read_bytes=nbytes)
        if bad_keys:  # best effort: the next writer replaces them anyway
            deleted = self._execute("delete", [("DEL", k) for k in bad_keys])
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
        admitted = self._admit([s.size + HEADER_SIZE for s in srcs])
        ex = ("EX", self.ttl_secs) if self.ttl_secs else ()
        commands = [("SET", self._prefix + binascii.hexlify(h), self._value(h, s), *ex)
                    for (h, _), s in zip(items[:admitted], srcs[:admitted])]
        replies = self._execute("write", commands, sizes=[s.size + HEADER_SIZE for s in srcs[:admitted]])
        ok = [r == b"OK" for r in replies] + [False] * (len(items) - admitted)
        stored = sum(s.size + HEADER_SIZE for s, good in zip(srcs, ok) if good)
        self._charge(stored)
        good = sum(ok)
        self._count(write_blocks=len(items), written_blocks=good,
                    written_bytes=sum(s.size for s, g in zip(srcs, ok) if g),
                    write_failures=admitted - good, skipped_budget=len(items) - admitted)
        return ok

    @property
    def is_up(self) -> bool:
        """No node (and not the cluster topology) is marked down."""
        with self._lock:
            return all(b.down_since is None for b in self._breakers())

    def stats(self) -> dict[str, Any]:
        """Counters for metrics (monotonic except the gauges ``up``, ``down_nodes``, ``budget_used_bytes``)."""
        with self._lock:
            down = sorted(b.name for b in self._breakers() if b.down_since is not None)
            return {
                **self._counters,
                "errors": dict(self._errors),
                "bad_values": dict(self._bad),
                "latency": {op: h.snapshot() for op, h in self._latency.items()},
                "up": not down,
                "down_nodes": down,
                "nodes": len(self._nodes),
                "budget_used_bytes": self._budget_used,
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
        self._wake.set()
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(timeout=self.timeout_s * 4)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        for breaker in list(self._nodes.values()):
            _quietly(breaker.client.close)
        if self._cluster is not None:
            _quietly(self._cluster.close)

    def __enter__(self) -> RemoteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- values ----------------------------------------------------------------
    def _value(self, block_hash: BlockHash, src: np.ndarray) -> _Value:
        """The value of a block, sent as header + payload straight from ``src``: joining them
        into a fresh buffer per block cost more than the checksum (page faults and a copy)."""
        head = _HDR.pack(MAGIC, FORMAT_VERSION, 0, block_hash, self._digest, src.size)
        return _Value(head + _CRC.pack(_crc32(src, _crc32(head))), src)

    def _verify(self, block_hash: BlockHash, value: Any, dst: np.ndarray) -> str | None:
        """None after copying a verified payload into ``dst``; else why it is a miss."""
        if value is None:
            return "absent"
        if not isinstance(value, bytes) or len(value) < HEADER_SIZE:
            return "foreign"
        magic, version, _flags, h, digest, length = _HDR.unpack_from(value, 0)
        if (magic != MAGIC or version != FORMAT_VERSION or h != block_hash or digest != self._digest
                or length != len(value) - HEADER_SIZE or length != dst.size):
            return "foreign"
        view = memoryview(value)
        (crc,) = _CRC.unpack_from(value, _HDR.size)
        if _crc32(view[HEADER_SIZE:], _crc32(view[:_HDR.size])) != crc:
            return "corrupt"
        np.copyto(dst, np.frombuffer(value, dtype=np.uint8, offset=HEADER_SIZE))
        return None

    def _bad_value(self, kind: str, block_hash: BlockHash) -> None:
        with self._lock:
            self._bad[kind] += 1
            first = f"bad:{kind}" not in self._logged
            self._logged.add(f"bad:{kind}")
        if first:
            what = "failed its checksum" if kind == "corrupt" else "is not this block's value (other block, " \
                "identity or format)"
            logger.warning("kvbm: G4 value of block %s %s; treated as a miss and deleted. Further ones are only "
                           "counted.", block_hash.hex(), what)

    # ---- budget ------------------------------------------------------------------
    def _admit(self, sizes: list[int]) -> int:
        """How many leading values fit in the budget (best effort; Redis's maxmemory is the hard bound)."""
        if self.budget_bytes is None:
            return len(sizes)
        with self._lock:
            now = time.monotonic()
            while self._budget_expiry and self._budget_expiry[0][0] <= now:
                self._budget_used -= self._budget_expiry.popleft()[1]
            room = self.budget_bytes - self._budget_used
        n = 0
        for size in sizes:
            if size > room:
                break
            room -= size
            n += 1
        if n < len(sizes) and "budget" not in self._logged:
            self._logged.add("budget")
            logger.warning("kvbm: G4 budget of %.3f GB (%s) is used up; further stores are skipped (counted)%s",
                           self.budget_bytes / 1e9, env_var("remote_budget_gb"),
                           " until written blocks expire" if self.ttl_secs else "")
        return n

    def _charge(self, nbytes: int) -> None:
        if self.budget_bytes is None or not nbytes:
            return
        with self._lock:
            self._budget_used += nbytes
            if self.ttl_secs:  # an expired key no longer takes room in Redis
                self._budget_expiry.append((time.monotonic() + self.ttl_secs, nbytes))

    # ---- pipelines -------------------------------------------------------------------
    def _execute(self, op: str, commands: list[tuple[Any, ...]], *, sizes: list[int] | None = None,
                 max_keys: int | None = None) -> list[Any]:
        """Run ``commands`` (key second) as pipelines: per node, in batches, nodes in parallel.

        Returns the replies in order; a reply is an exception for a command
        Redis refused, or ``_DOWN`` where the node was down or failed.
        """
        results: list[Any] = [_DOWN] * len(commands)
        if not commands:
            return results
        groups = self._route(commands)
        max_keys = max_keys or self._batch_keys

        def run(breaker: _Breaker, indices: list[int]) -> None:
            for batch in _batches(indices, sizes, max_keys, self._batch_bytes):
                replies = self._pipeline(breaker, op, [commands[i] for i in batch])
                if replies is None:
                    return
                for i, reply in zip(batch, replies):
                    results[i] = reply

        if len(groups) == 1:
            run(*next(iter(groups.items())))
        elif groups:
            pool = self._fanout_pool()
            for future in [pool.submit(run, b, idx) for b, idx in groups.items()]:
                future.result()
        return results

    def _route(self, commands: list[tuple[Any, ...]]) -> dict[_Breaker, list[int]]:
        if self._topology is None:
            return {next(iter(self._nodes.values())): list(range(len(commands)))}
        if self._cluster is None or self._topology.down_since is not None:
            self._count(skipped_down=len(commands))
            return {}
        groups: dict[_Breaker, list[int]] = {}
        unroutable = 0
        for i, command in enumerate(commands):
            try:
                node = self._cluster.get_node_from_key(command[1])
            except _FAULTS:  # slot not covered (its node left the cluster): a miss
                unroutable += 1
                continue
            groups.setdefault(self._node(node.host, node.port), []).append(i)
        if unroutable:
            self._error("unroutable", "some keys' hash slots are not covered by any reachable cluster node",
                        count=unroutable)
        return groups

    def _pipeline(self, breaker: _Breaker, op: str, commands: list[tuple[Any, ...]]) -> list[Any] | None:
        """One round trip on a pooled connection; None (and the node marked down) if it failed as a whole.

        Commands are framed here (RESP) rather than by redis-py's pipeline so
        that a value's header and payload go out as they are; replies come
        back raw: ``b"OK"``, ints, bytes or None, or the ResponseError of a
        refused command.
        """
        if breaker.down_since is not None:
            with self._lock:
                breaker.skipped += len(commands)
                self._counters["skipped_down"] += len(commands)
            return None
        pool = breaker.client.connection_pool
        start = time.perf_counter()
        try:
            conn = _get_connection(pool)
        except _FAULTS as e:
            self._trip(breaker, e)
            return None
        try:
            conn.send_packed_command(_frames(commands), check_health=False)
            replies = [_read_reply(conn) for _ in commands]
        except BaseException as e:
            conn.disconnect()  # replies may still be in flight: never reuse this connection
            if not isinstance(e, _FAULTS):
                raise
            self._trip(breaker, e)
            return None
        finally:
            pool.release(conn)
        elapsed = time.perf_counter() - start
        with self._lock:
            self._latency[op].observe(elapsed)
            self._counters["round_trips"] += 1
        for reply in replies:
            if isinstance(reply, Exception):
                kind = _error_kind(reply)
                self._error(kind, f"{breaker.name} refused a command: {reply}" + _advice(kind))
                if kind == "moved":
                    self._refresh_due = True
                    self._ensure_prober()
        return replies

    def _fanout_pool(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="kvbm-g4")
            return self._pool

    # ---- faults --------------------------------------------------------------------------
    def _breakers(self) -> list[_Breaker]:
        return [*self._nodes.values(), *([self._topology] if self._topology else [])]

    def _trip(self, breaker: _Breaker, e: BaseException) -> None:
        """Mark ``breaker`` down (one log line per episode); the prober brings it back."""
        kind = _error_kind(e)
        now = time.monotonic()
        with self._lock:
            self._errors[kind] += 1
            first = breaker.down_since is None
            if first:
                breaker.down_since, breaker.backoff, breaker.skipped = now, self._backoff_s, 0
                breaker.retry_at = now + breaker.backoff
                self._counters["down_episodes"] += 1
        if first:
            logger.warning("kvbm: G4 Redis %s is down (%s: %s); its blocks are misses and stores to it are dropped "
                           "until it answers again (retrying in the background).", breaker.name, kind, e)
            if self._topology is not None:
                self._refresh_due = True  # a failover may have moved its slots
            self._ensure_prober()

    def _trip_all(self, e: BaseException) -> None:
        for breaker in self._breakers():
            self._trip(breaker, e)

    def _error(self, kind: str, message: str, count: int = 1) -> None:
        with self._lock:
            self._errors[kind] += count
            first = f"error:{kind}" not in self._logged
            self._logged.add(f"error:{kind}")
        if first:
            logger.warning("kvbm: G4 %s error: %s. Further ones are only counted.", kind, message)

    def _ensure_prober(self) -> None:
        with self._lock:
            if self._prober is None and not self._closed:
                self._prober = threading.Thread(target=self._probe_loop, name="kvbm-g4-probe", daemon=True)
                self._prober.start()
        self._wake.set()

    def _probe_loop(self) -> None:
        """Bring down nodes back (PING with backoff) and refresh the cluster topology when asked."""
        while not self._closed:
            now = time.monotonic()
            with self._lock:
                down = [b for b in self._breakers() if b.down_since is not None]
            if self._refresh_due and self._topology is not None and self._topology.down_since is None:
                self._refresh_due = False
                self._attempt(self._topology)
            due = [b for b in down if b.retry_at <= now]
            for breaker in due:
                self._attempt(breaker)
            waits = [b.retry_at - time.monotonic() for b in down if b not in due]
            self._wake.wait(timeout=max(0.01, min(waits)) if waits else (None if not due else 0.01))
            self._wake.clear()

    def _attempt(self, breaker: _Breaker) -> None:
        try:
            breaker.probe()
        except _FAULTS as e:
            if breaker.down_since is None:
                self._trip(breaker, e)
                return
            with self._lock:
                breaker.backoff = min(breaker.backoff * 2, self._max_backoff_s)
                breaker.retry_at = time.monotonic() + breaker.backoff
            if self._topology is not None and breaker is not self._topology:
                self._refresh_due = True  # still down: maybe a replica took over its slots meanwhile
            return
        with self._lock:
            since, breaker.down_since = breaker.down_since, None
            skipped = breaker.skipped
        if since is not None:
            logger.warning("kvbm: G4 Redis %s is back after %.1f s (%d block operations answered as misses meanwhile)",
                           breaker.name, time.monotonic() - since, skipped)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for key, n in deltas.items():
                self._counters[key] += n


def _check_hashes(hashes: Sequence[BlockHash]) -> None:
    for h in hashes:
        if not isinstance(h, bytes) or len(h) != HASH_BYTES:
            raise ValueError(f"block hash {h!r} is not {HASH_BYTES} bytes")


def _batches(indices: list[int], sizes: list[int] | None, max_keys: int, max_bytes: int) -> list[list[int]]:
    """Split ``indices`` into runs of at most ``max_keys`` commands and (where sizes are
    given) ``max_bytes`` bytes; a single larger command gets a batch of its own."""
    if sizes is None:
        return [indices[i:i + max_keys] for i in range(0, len(indices), max_keys)]
    out: list[list[int]] = []
    batch: list[int] = []
    nbytes = 0
    for i in indices:
        if batch and (len(batch) >= max_keys or nbytes + sizes[i] > max_bytes):
            out.append(batch)
            batch, nbytes = [], 0
        batch.append(i)
        nbytes += sizes[i]
    if batch:
        out.append(batch)
    return out


def _advice(kind: str) -> str:
    return {
        "oom": " (Redis is full and may not evict: set `maxmemory-policy allkeys-lru`)",
        "moved": " (the cluster topology changed; refreshing it)",
        "readonly": " (a replica: point the URL at the primary, or the cluster is failing over)",
    }.get(kind, "")


def _config_value(client: redis.Redis, name: str) -> str | None:
    """A CONFIG GET value, or None where CONFIG is disabled (often so on managed Redis)."""
    try:
        conf = client.config_get(name)
    except _FAULTS:
        return None
    value = conf.get(name.encode(), conf.get(name))
    return value.decode() if isinstance(value, bytes) else value


def _cluster_enabled(client: redis.Redis) -> bool:
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except _FAULTS:
        return False


def _quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # closing a broken connection: nothing left to do
        logger.debug("kvbm: G4 close failed", exc_info=True)


def _setup_error(target: RemoteTarget, e: BaseException) -> RemoteSetupError:
    """What a set-up failure means for the user, naming the setting to fix."""
    var, optional = env_var("remote_url"), env_var("remote_optional")
    cause: BaseException = e
    if isinstance(e, redis.exceptions.RedisClusterException):  # "cannot be connected": the reason is inside
        while cause.__cause__ is not None:
            cause = cause.__cause__
    kind = _error_kind(cause)
    text = str(cause) or type(cause).__name__
    if kind == "auth" or ("AUTH" in text and "password" in text):
        return RemoteSetupError(
            f"{var}={target}: Redis refused the credentials ({text}); put the right password in the URL "
            f"(redis://:PASSWORD@host:port, or redis://USER:PASSWORD@host:port with ACL users), or drop it if "
            "the server has none")
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return RemoteSetupError(
            f"{var}={target}: the server's TLS certificate is not trusted ({text}); give its CA bundle with "
            "?ssl_ca_certs=/path/ca.pem in the URL (or have the certificate name this host)")
    if "wrong version number" in text or "WRONG_VERSION_NUMBER" in text:
        return RemoteSetupError(f"{var}={target}: TLS to a server that speaks plain TCP ({text}); use redis:// "
                                "for a server without TLS")
    if kind in ("connection", "timeout", "busy"):
        return RemoteSetupError(
            f"{var}={target}: cannot reach Redis ({text}). Check the host and port, that redis-server runs "
            f"and listens there (its `bind` and `protected-mode`), and firewalls; or set {optional}=1 to "
            "start without G4 until Redis answers", unreachable=True)
    if "cluster" in text.lower():
        return RemoteSetupError(
            f"{var}={target}: {text}; for a single Redis server give one URL without ?cluster=1")
    return RemoteSetupError(f"{var}={target}: Redis answered with an error: {text}")


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
        nodes = list(store._nodes.values())
        report["mode"] = "cluster" if store.target.cluster else "single node"
        report["nodes"] = len(nodes)
        client = nodes[0].client
        report["version"] = client.info("server").get("redis_version")
        maxmemory = _config_value(client, "maxmemory")
        report["maxmemory"] = int(maxmemory) if maxmemory is not None else None
        report["maxmemory_policy"] = _config_value(client, "maxmemory-policy")
        rtts = []
        for _ in range(pings):
            start = time.perf_counter()
            client.ping()
            rtts.append(time.perf_counter() - start)
        report["latency_ms"] = statistics.median(rtts) * 1e3
    except RemoteSetupError as e:
        report["error"], report["unreachable"] = str(e), e.unreachable
    except _FAULTS as e:
        err = _setup_error(store.target, e)
        report["error"], report["unreachable"] = str(err), err.unreachable
    finally:
        store.close()
    return report
