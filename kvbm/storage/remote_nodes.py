"""G4's Redis nodes: routing keys to nodes, one pipeline per node and batch, circuit breakers.

Single node: every key goes to it. Redis Cluster: redis-py's
:class:`~redis.cluster.RedisCluster` supplies the topology (slot of a key,
node of a slot, refreshes); the commands then go out as one plain pipeline
per node, in parallel. Not redis-py's cluster pipeline: one unreachable node
fails that pipeline as a whole, and its fallback resends failed commands one
at a time (a round trip per block). Per-node pipelines keep the other nodes'
keys served while one node is down: its keys are misses.

A node that errors or times out is marked down (a circuit breaker: one log
line per episode, counted); while it is down every operation on its keys
answers at once (misses, dropped stores). A background thread pings it with
exponential backoff and puts it back when it answers, refreshing the cluster
topology meanwhile (a failover moves slots to a replica).

Apart from :mod:`kvbm.storage.remote` (which decides what to send and what a
reply means) because this is where the network's failures are handled; the
store shares its lock with this class so that :meth:`RemoteStore.stats` reads
one consistent snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from kvbm.config import RemoteTarget, env_var
from kvbm.storage.kinds import ERROR_KINDS, LATENCY_BUCKETS_S
from kvbm.storage.remote_errors import (
    FAULTS,
    RemoteSetupError,
    advice,
    check_ca_file,
    cluster_enabled,
    error_kind,
    quietly,
    setup_error,
)
from kvbm.storage.remote_wire import MAX_LINE, Wire, frames, get_connection

logger = logging.getLogger(__name__)

__all__ = ["DOWN", "OPS", "RemoteNodes"]

OPS = ("lookup", "read", "write", "delete")

#: A command's place in a result list when its node was down or failed: a miss.
DOWN = object()


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


class RemoteNodes:
    """The nodes of one G4 target, their breakers and the prober that brings them back.

    ``lock`` is the owning store's: it guards this class's state and counters
    too. ``counters`` (``skipped_down``, ``round_trips``, ``down_episodes``),
    ``errors`` (by kind) and ``latency`` (per op) are read under it.
    """

    def __init__(self, target: RemoteTarget, client_kwargs: dict[str, Any], *, lock: threading.Lock,
                 timeout_s: float, backoff_s: float, max_backoff_s: float, batch_keys: int,
                 batch_bytes: int) -> None:
        self.target = target
        self.timeout_s = timeout_s
        self._client_kwargs = client_kwargs
        self._lock = lock
        self._backoff_s, self._max_backoff_s = backoff_s, max_backoff_s
        self._batch_keys, self._batch_bytes = batch_keys, batch_bytes
        self._wake = threading.Event()
        self.closed = False
        self._prober: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._logged: set[str] = set()
        self._refresh_due = False
        self.counters: dict[str, int] = dict.fromkeys(("skipped_down", "round_trips", "down_episodes"), 0)
        self.errors = dict.fromkeys(ERROR_KINDS, 0)
        self.latency = {op: _Histogram() for op in OPS}
        self.nodes: dict[str, _Breaker] = {}
        self._cluster: RedisCluster | None = None
        self._topology: _Breaker | None = None
        if target.cluster:
            self._topology = _Breaker("cluster topology", self._connect_cluster)
        else:
            host, port = target.nodes[0]
            self._node(host, port, db=target.db)

    # ---- set-up --------------------------------------------------------------------------
    def check(self) -> None:
        """Connect and PING every node now; raise :class:`RemoteSetupError` saying what to fix.

        A cluster with some primaries unreachable starts with those marked
        down (their keys are misses until they answer); none reachable, wrong
        credentials or the wrong kind of server raise.
        """
        check_ca_file(self.target)
        try:
            if self._topology is not None:
                self._connect_cluster()
        except FAULTS as e:
            raise setup_error(self.target, e) from e
        answered, unreachable = 0, []
        for breaker in list(self.nodes.values()):
            try:
                breaker.probe()
            except FAULTS as e:
                error = setup_error(self.target, e)
                if not error.unreachable:
                    raise error from e
                unreachable.append((breaker, error, e))
                continue
            answered += 1
            if not self.target.cluster and cluster_enabled(breaker.client):
                raise RemoteSetupError(
                    f"{env_var('remote_url')}={self.target}: this Redis is a Redis Cluster node; list "
                    "several seed nodes (redis://h1:p1,redis://h2:p2) or add ?cluster=1 to the URL")
        if unreachable and not answered:
            _, error, cause = unreachable[0]
            raise error from cause
        for breaker, _, cause in unreachable:
            self.trip(breaker, cause)

    def _node(self, host: str, port: int, db: int = 0) -> _Breaker:
        name = f"{host}:{port}"
        breaker = self.nodes.get(name)
        if breaker is None:
            client = redis.Redis(host=host, port=port, db=db, **self._client_kwargs)
            with self._lock:
                breaker = self.nodes.setdefault(name, _Breaker(name, client.ping, client=client))
            if breaker.client is not client:  # another thread was first
                quietly(client.close)
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
            gone = [self.nodes.pop(name) for name in list(self.nodes) if name not in primaries]
        for breaker in gone:
            logger.info("kvbm: G4 Redis %s left the cluster's primaries; its slots are served elsewhere", breaker.name)
            quietly(breaker.client.close)

    # ---- pipelines -------------------------------------------------------------------
    def execute(self, op: str, commands: list[tuple[Any, ...]], *, sizes: list[int] | None = None,
                max_keys: int | None = None, max_bulk: int = 0,
                on_reply: Callable[[int, Any], None] | None = None) -> list[Any]:
        """Run ``commands`` (key second) as pipelines: per node, in batches, nodes in parallel.

        Returns the replies in order; a reply is an exception for a command
        Redis refused, or ``DOWN`` where the node was down or failed.
        ``max_bulk``: the longest bulk reply expected (loads); ``on_reply(i, reply)`` sees
        each reply as it arrives, so loads verify one value while the next is received.
        """
        results: list[Any] = [DOWN] * len(commands)
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
            return {next(iter(self.nodes.values())): list(range(len(commands)))}
        if self._cluster is None or self._topology.down_since is not None:
            with self._lock:
                self.counters["skipped_down"] += len(commands)
            return {}
        groups: dict[_Breaker, list[int]] = {}
        unroutable = 0
        for i, command in enumerate(commands):
            try:
                node = self._cluster.get_node_from_key(command[1])
            except FAULTS:  # slot not covered (its node left the cluster): a miss
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
        back raw (see :class:`~kvbm.storage.remote_wire.Wire`): ``b"OK"``, ints, bytes or None, or the
        ResponseError of a refused command.
        """
        if breaker.down_since is not None:
            with self._lock:
                breaker.skipped += len(commands)
                self.counters["skipped_down"] += len(commands)
            return None
        pool = breaker.client.connection_pool
        start = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        try:
            conn = get_connection(pool)
        except FAULTS as e:
            self.trip(breaker, e)
            return None
        try:
            wire = Wire(conn._sock, deadline, max(max_bulk, MAX_LINE))
            wire.send(frames(commands))
            replies = []
            for j in range(len(commands)):
                replies.append(wire.reply())
                if on_reply is not None:
                    on_reply(j, replies[-1])
            conn._sock.settimeout(self.timeout_s)  # what redis-py's own commands (PING, CONFIG) expect
        except BaseException as e:
            conn.disconnect()  # replies may still be in flight: never reuse this connection
            if not isinstance(e, FAULTS):
                raise
            self.trip(breaker, e)
            return None
        finally:
            pool.release(conn)
        elapsed = time.perf_counter() - start
        with self._lock:
            self.latency[op].observe(elapsed)
            self.counters["round_trips"] += 1
        for reply in replies:
            if isinstance(reply, Exception):
                kind = error_kind(reply)
                self._error(kind, f"{breaker.name} refused a command: {reply}" + advice(kind))
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
    def breakers(self) -> list[_Breaker]:
        """Every node's breaker and the cluster topology's (call under the lock for a snapshot)."""
        return [*self.nodes.values(), *([self._topology] if self._topology else [])]

    def trip(self, breaker: _Breaker, e: BaseException) -> None:
        """Mark ``breaker`` down (one log line per episode); the prober brings it back."""
        kind = error_kind(e)
        now = time.monotonic()
        with self._lock:
            self.errors[kind] += 1
            first = breaker.down_since is None
            if first:
                breaker.down_since, breaker.backoff, breaker.skipped = now, self._backoff_s, 0
                breaker.retry_at = now + breaker.backoff
                self.counters["down_episodes"] += 1
        if first:
            logger.warning("kvbm: G4 Redis %s is down (%s: %s); its blocks are misses and stores to it are dropped "
                           "until it answers again (retrying in the background).", breaker.name, kind, e)
            if self._topology is not None:
                self._refresh_due = True  # a failover may have moved its slots
            self._ensure_prober()

    def trip_all(self, e: BaseException) -> None:
        for breaker in self.breakers():
            self.trip(breaker, e)

    def _error(self, kind: str, message: str, count: int = 1) -> None:
        with self._lock:
            self.errors[kind] += count
            first = f"error:{kind}" not in self._logged
            self._logged.add(f"error:{kind}")
        if first:
            logger.warning("kvbm: G4 %s error: %s. Further ones are only counted.", kind, message)

    def _ensure_prober(self) -> None:
        with self._lock:
            if self._prober is None and not self.closed:
                self._prober = threading.Thread(target=self._probe_loop, name="kvbm-g4-probe", daemon=True)
                self._prober.start()
        self._wake.set()

    def _probe_loop(self) -> None:
        """Bring down nodes back (PING with backoff) and refresh the cluster topology when asked."""
        while not self.closed:
            now = time.monotonic()
            with self._lock:
                down = [b for b in self.breakers() if b.down_since is not None]
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
        except FAULTS as e:
            if breaker.down_since is None:
                self.trip(breaker, e)
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

    # ---- shutdown --------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the prober and the fan-out threads; the owner set :attr:`closed` (under the lock) first."""
        self._wake.set()
        if self._prober is not None and self._prober is not threading.current_thread():
            self._prober.join(timeout=self.timeout_s * 4)
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def close_clients(self) -> None:
        """Close every node's connections and the cluster client."""
        for breaker in list(self.nodes.values()):
            quietly(breaker.client.close)
        if self._cluster is not None:
            quietly(self._cluster.close)


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
