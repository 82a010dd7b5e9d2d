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
Commands are framed and replies parsed here, straight on the socket, so a
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
"""

from __future__ import annotations

import binascii
import hmac
import logging
import os
import socket
import statistics
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

import blake3
import numpy as np
import redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException, RedisError
from redis.retry import Retry

from kvbm.config import (
    ConfigError,
    KvbmConfig,
    RemoteTarget,
    env_var,
    parse_remote_namespace,
    parse_remote_url,
    read_secret_file,
)
from kvbm.core.hashing import HASH_BYTES, BlockHash
from kvbm.storage.buffers import as_u8
from kvbm.storage.kinds import BAD_VALUE_KINDS, ERROR_KINDS, LATENCY_BUCKETS_S

try:  # ISA-L's CRC-32: the same checksum as zlib's, ~5-10x faster (PCLMUL), so writes keep up with the network
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover - isal is a dependency; zlib gives identical values, only slower
    _crc32 = zlib.crc32

logger = logging.getLogger(__name__)

__all__ = [
    "ERROR_KINDS", "HEADER_SIZE", "LATENCY_BUCKETS_S", "RemoteSetupError", "RemoteStore", "identity_digest",
    "probe_remote", "remote_secret",
]

MAGIC = b"KVBMG4\x00\x01"
#: 2: a 16-byte tag (MAC or CRC-32) and the key id in the identity digest; version 1 values are misses.
FORMAT_VERSION = 2
#: Header flag: the tag is a MAC (keyed BLAKE3) under the fleet secret.
FLAG_KEYED = 1
#: magic, version, flags, block hash, identity digest, payload length
_HDR = struct.Struct(f"<8sHH{HASH_BYTES}s{HASH_BYTES}sQ")
_CRC = struct.Struct("<I")
TAG_SIZE = 16
HEADER_SIZE = _HDR.size + TAG_SIZE
_DIGEST_TAG = b"kvbm-g4-v2|"
#: Payloads at least this large are MAC'd on the tag threads (hashlib releases the GIL), smaller ones inline.
_MAC_THREAD_BYTES = 64 << 10

OPS = ("lookup", "read", "write", "delete")


class RemoteSetupError(ConfigError):
    """G4 cannot be used as configured; the message names the setting and the fix.

    ``unreachable`` tells "no answer" (which may heal, so ``remote_optional``
    may start without G4) from wrong credentials or a wrong kind of server (which never heal).
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def identity_digest(identity: str, rank: int = 0, world_size: int = 1, key_id: str = "") -> bytes:
    """The 16-byte digest in a rank's keys and values: model identity, value format, shard, and the
    fleet secret's key id ("" without a secret), so fleets with different secrets never share keys."""
    keyed = f"|key {key_id}" if key_id else "|unkeyed"
    return blake2b(_DIGEST_TAG + f"{identity}|rank {rank}/{world_size}{keyed}".encode(), digest_size=16).digest()


def _mac_key(secret: bytes) -> tuple[bytes, str]:
    """The value MAC key derived from the fleet secret (not the secret itself: the same string
    used elsewhere, e.g. as the handshake secret, then signs nothing here), and its public key id."""
    key = blake3.blake3(secret, derive_key_context="kvbm 2026 G4 value MAC key v2").digest()
    return key, blake3.blake3(b"kvbm-g4-key-id", key=key).hexdigest(8)


def remote_secret(config: KvbmConfig) -> bytes | None:
    """The fleet secret that signs G4 values: ``remote_secret`` (environment only) or the file
    ``remote_secret_file`` (mode 0600, the handshake secret's rules); None without either."""
    if config.remote_secret is not None:
        return config.remote_secret.encode()
    if config.remote_secret_file is not None:
        return read_secret_file(config.remote_secret_file, env_var("remote_secret_file"), what="the G4 secret",
                                misuse="have forged KV served to every server of the fleet")
    return None


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
    """A block's value: header and payload, sent without joining them. The header may still be
    being computed (its MAC, on a tag thread): the send waits for it when it gets there."""

    head: bytes | Future[bytes]
    payload: np.ndarray

    @property
    def header(self) -> bytes:
        return self.head if isinstance(self.head, bytes) else self.head.result()


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


#: Longest reply line (status, error, integer, bulk length) a Redis sends for kvbm's commands.
_MAX_LINE = 64 << 10
_CHUNK = 64 << 10


class _Wire:
    """RESP2 on a connection's socket, every send and receive under one deadline.

    A socket timeout bounds each ``recv``: a link that delivers a few bytes a second never
    trips it while one 512 KiB reply takes minutes. Here each call gets the time left until
    the deadline instead. Replies: bytes (a bulk, received into one buffer of its size; status
    replies as bytes too), int, None (nil), or the ResponseError of a refused command (the
    connection is still in step). A bulk longer than ``max_bulk`` or anything unexpected is a
    protocol error: the caller drops the connection.
    """

    def __init__(self, sock: socket.socket, deadline: float, max_bulk: int) -> None:
        self._sock, self._deadline, self._max_bulk = sock, deadline, max_bulk
        self._buf = bytearray()
        self._pos = 0
        self._chunk = bytearray(_CHUNK)

    def _left(self) -> float:
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise redis.exceptions.TimeoutError(f"the round trip took longer than {env_var('remote_timeout_secs')}")
        return left

    def send(self, frames: Iterator[Any]) -> None:
        for frame in frames:
            view = memoryview(frame).cast("B")
            while view.nbytes:
                self._sock.settimeout(self._left())
                view = view[self._sock.send(view):]

    def _recv_into(self, view: memoryview) -> int:
        self._sock.settimeout(self._left())
        n = self._sock.recv_into(view)
        if not n:
            raise redis.exceptions.ConnectionError("Redis closed the connection")
        return n

    def _line(self) -> bytes:
        while True:
            end = self._buf.find(b"\r\n", self._pos)
            if end >= 0:
                line = bytes(self._buf[self._pos:end])
                self._pos = end + 2
                return line
            if len(self._buf) - self._pos > _MAX_LINE:
                raise redis.exceptions.InvalidResponse("a reply line of over 64 KiB")
            self._fill()

    def _fill(self) -> None:
        """Receive one more chunk into the line buffer."""
        del self._buf[:self._pos]
        self._pos = 0
        chunk = memoryview(self._chunk)
        n = self._recv_into(chunk)
        self._buf += chunk[:n]

    def _bulk(self, n: int) -> bytearray:
        """``n`` bytes and their CRLF; beyond what is buffered, received straight into the result."""
        out = bytearray(n)
        have = min(n, len(self._buf) - self._pos)
        out[:have] = memoryview(self._buf)[self._pos:self._pos + have]
        self._pos += have
        with memoryview(out) as view:
            while have < n:
                have += self._recv_into(view[have:])
        while len(self._buf) - self._pos < 2:
            self._fill()
        if self._buf[self._pos:self._pos + 2] != b"\r\n":
            raise redis.exceptions.InvalidResponse("a bulk reply not followed by CRLF")
        self._pos += 2
        return out

    def reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        try:
            if kind == b"$":
                n = int(rest)
                if n < 0:
                    return None
                if n > self._max_bulk:
                    raise redis.exceptions.InvalidResponse(f"a {n}-byte reply where at most {self._max_bulk} fit")
                return self._bulk(n)
            if kind == b":":
                return int(rest)
        except ValueError:
            raise redis.exceptions.InvalidResponse(f"unparsable reply {line[:64]!r}") from None
        if kind == b"+":
            return rest
        if kind == b"-":
            return redis.exceptions.ResponseError(rest.decode("utf-8", "replace"))
        raise redis.exceptions.InvalidResponse(f"unexpected reply {line[:64]!r}")


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
        self._backoff_s, self._max_backoff_s = backoff_s, max(backoff_s, max_backoff_s)
        self._batch_keys, self._batch_bytes, self._lookup_batch_keys = batch_keys, batch_bytes, lookup_batch_keys
        self._mac, key_id = (None, "") if secret is None else _mac_key(secret)
        self._flags = FLAG_KEYED if secret is not None else 0
        self._digest = identity_digest(identity, rank, world_size, key_id)
        self._prefixes = [
            f"{namespace}:{identity_digest(identity, r, world_size, key_id).hex()}:".encode()
            for r in range(world_size)
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
        self._tag_pool: ThreadPoolExecutor | None = None
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
        logger.info("kvbm: shared G4 tier ready: %s (%s), namespace %r, rank %d/%d, ttl %s, budget %s, values %s",
                    store.target, f"cluster of {len(store._nodes)} primaries" if store.target.cluster else
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
        return self._mac is not None

    def check(self) -> None:
        """Connect and PING every node now; raise :class:`RemoteSetupError` saying what to fix.

        A cluster with some primaries unreachable starts with those marked
        down (their keys are misses until they answer); none reachable, wrong
        credentials or the wrong kind of server raise.
        """
        _check_ca_file(self.target)
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
        sizes = [d.size + HEADER_SIZE for d in dests]
        # At most one byte past the value's size: a longer value is refused without receiving it.
        commands = [("GETRANGE", k, 0, n) for k, n in zip(keys, sizes)]
        checks: list[Any] = [None] * len(items)

        def arrived(i: int, reply: Any) -> None:
            """Verify (MAC) a large value on a tag thread while the next one is received."""
            if self._mac is not None and isinstance(reply, bytearray) and len(reply) >= _MAC_THREAD_BYTES:
                checks[i] = self._tag_threads().submit(self._verify, items[i][0], reply, dests[i])

        replies = self._execute("read", commands, sizes=sizes, max_bulk=max(sizes, default=0) + 1,
                                on_reply=arrived)
        ok, bad_keys, nbytes = [], [], 0
        for (block_hash, _), key, dst, reply, check in zip(items, keys, dests, replies, checks):
            if check is not None:  # verified as it arrived (even if a later reply of its batch failed)
                problem = check.result()
            elif reply is _DOWN or isinstance(reply, Exception):
                problem = "down"
            else:
                problem = self._verify(block_hash, reply, dst)
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
        pairs = [(h, s) for (h, _), s in zip(items[:admitted], srcs[:admitted])]
        if self._mac is not None and len(pairs) > 1 and sum(s.size for _, s in pairs) >= 2 * _MAC_THREAD_BYTES:
            # MACs on the tag threads, in order, while the values before them are being sent
            pool = self._tag_threads()
            values = [_Value(pool.submit(self._header, h, s), s) for h, s in pairs]
        else:
            values = [_Value(self._header(h, s), s) for h, s in pairs]
        commands = [("SET", self._prefix + binascii.hexlify(h), value, *ex) for (h, _), value in zip(pairs, values)]
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
        for pool in (self._pool, self._tag_pool):
            if pool is not None:
                pool.shutdown(wait=True)
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
        return _Value(self._header(block_hash, src), src)

    def _header(self, block_hash: BlockHash, src: np.ndarray) -> bytes:
        head = _HDR.pack(MAGIC, FORMAT_VERSION, self._flags, block_hash, self._digest, src.size)
        return head + self._tag(head, src)

    def _tag(self, head: Any, payload: Any) -> bytes:
        """The 16-byte tag of a header (52 bytes) and payload: keyed BLAKE3 (a MAC: BLAKE3's
        keyed_hash mode) under the fleet key, truncated to 128 bits; else CRC-32 and zeros.
        BLAKE3 rather than HMAC-SHA256 or keyed BLAKE2b: about 2x and 3x their speed per core
        here (SIMD; bench/g4.py prints all three), and it releases the GIL on large inputs, so
        the tag threads MAC beside the socket I/O. blake3 is a dependency of vLLM's anyway."""
        if self._mac is None:
            return _CRC.pack(_crc32(payload, _crc32(head))) + bytes(TAG_SIZE - _CRC.size)
        return blake3.blake3(head, key=self._mac).update(payload).digest(TAG_SIZE)

    def _verify(self, block_hash: BlockHash, value: Any, dst: np.ndarray) -> str | None:
        """None after copying a verified payload into ``dst``; else why it is a miss. Nothing
        reaches ``dst`` (and so the GPU) before the tag is checked."""
        if value is None or not value:  # GETRANGE of a missing key: empty
            return "absent"
        if not isinstance(value, (bytes, bytearray)) or len(value) != HEADER_SIZE + dst.size:
            return "foreign"  # truncated, or longer than a block (only its first bytes were sent)
        magic, version, flags, h, digest, length = _HDR.unpack_from(value, 0)
        if (magic != MAGIC or version != FORMAT_VERSION or h != block_hash or digest != self._digest
                or length != dst.size):
            return "foreign"
        view = memoryview(value)
        if self._mac is None and flags != self._flags:
            return "foreign"  # a keyed value (another fleet's key space: only a copied value gets here)
        if flags != self._flags or not hmac.compare_digest(self._tag(view[:_HDR.size], view[HEADER_SIZE:]),
                                                           view[_HDR.size:HEADER_SIZE]):
            return "forged" if self._mac is not None else "corrupt"
        np.copyto(dst, np.frombuffer(value, dtype=np.uint8, offset=HEADER_SIZE))
        return None

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
                 max_keys: int | None = None, max_bulk: int = 0,
                 on_reply: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run ``commands`` (key second) as pipelines: per node, in batches, nodes in parallel.

        Returns the replies in order; a reply is an exception for a command
        Redis refused, or ``_DOWN`` where the node was down or failed.
        ``max_bulk``: the longest bulk reply expected (loads); ``on_reply(i, reply)`` sees
        each reply as it arrives, so loads verify one value while the next is received.
        """
        results: list[Any] = [_DOWN] * len(commands)
        if not commands:
            return results
        groups = self._route(commands)
        max_keys = max_keys or self._batch_keys

        def run(breaker: _Breaker, indices: list[int]) -> None:
            for batch in _batches(indices, sizes, max_keys, self._batch_bytes):
                seen = None if on_reply is None else (lambda j, reply, batch=batch: on_reply(batch[j], reply))
                replies = self._pipeline(breaker, op, [commands[i] for i in batch], max_bulk, seen)
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

    def _pipeline(self, breaker: _Breaker, op: str, commands: list[tuple[Any, ...]], max_bulk: int = 0,
                  on_reply: Callable[[int, Any], None] | None = None) -> list[Any] | None:
        """One round trip on a pooled connection, within ``timeout_s`` as a whole; None (and the
        node marked down) if it failed or ran out of time.

        Commands are framed here (RESP) rather than by redis-py's pipeline so
        that a value's header and payload go out as they are; replies come
        back raw (see :class:`_Wire`): ``b"OK"``, ints, bytes or None, or the
        ResponseError of a refused command.
        """
        if breaker.down_since is not None:
            with self._lock:
                breaker.skipped += len(commands)
                self._counters["skipped_down"] += len(commands)
            return None
        pool = breaker.client.connection_pool
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        try:
            conn = _get_connection(pool)
        except _FAULTS as e:
            self._trip(breaker, e)
            return None
        try:
            wire = _Wire(conn._sock, deadline, max(max_bulk, _MAX_LINE))
            wire.send(_frames(commands))
            replies = []
            for j in range(len(commands)):
                replies.append(wire.reply())
                if on_reply is not None:
                    on_reply(j, replies[-1])
            conn._sock.settimeout(self.timeout_s)  # what redis-py's own commands (PING, CONFIG) expect
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

    def _tag_threads(self) -> ThreadPoolExecutor:
        """Threads for MACs of large values: hashlib releases the GIL, so they run beside the
        socket I/O and each other. Not the fan-out pool, whose tasks wait for these."""
        with self._lock:
            if self._tag_pool is None:
                self._tag_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                                    thread_name_prefix="kvbm-g4-mac")
            return self._tag_pool

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


def _check_ca_file(target: RemoteTarget) -> None:
    """A missing CA bundle is a setting to fix, not an unreachable Redis (which may heal)."""
    path = target.ca_certs
    if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        why = "is not a readable file" if os.path.exists(path) else "does not exist"
        raise RemoteSetupError(
            f"{env_var('remote_url')}={target}: the CA bundle ssl_ca_certs={path} {why}; give the path of the "
            "PEM file of the CA that signed the Redis server's certificate, or drop ?ssl_ca_certs= to trust "
            "the system's CAs")


def _setup_error(target: RemoteTarget, e: BaseException) -> RemoteSetupError:
    """What a set-up failure means for the user, naming the setting to fix."""
    var, optional = env_var("remote_url"), env_var("remote_optional")
    cause: BaseException = e
    if isinstance(e, redis.exceptions.RedisClusterException):  # "cannot be connected": the reason is inside
        while cause.__cause__ is not None:
            cause = cause.__cause__
    kind = _error_kind(cause)
    text = str(cause) or type(cause).__name__
    if target.ca_certs and (target.ca_certs in text or any(
            isinstance(c, (FileNotFoundError, PermissionError, IsADirectoryError)) for c in _causes(e))):
        return RemoteSetupError(
            f"{var}={target}: cannot load the CA bundle ssl_ca_certs={target.ca_certs} ({text}); give a readable "
            "PEM file of the CA that signed the Redis server's certificate")
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


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


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
