"""Leader/worker startup handshake: agree on the tier chain before traffic starts.

Why a handshake: the tiers are sized from the bytes one block takes on *every*
rank together (GB settings are totals across ranks), which only the workers
know once vLLM has allocated their KV caches; and the leader must not plan a
single copy before every worker owns its slice of host/disk memory. The
sizing policy itself is in :mod:`kvbm.runtime.sizing`, the message format and
its checks in :mod:`kvbm.runtime.wire`; this module moves messages.

Order inside vLLM (v1 ``EngineCore.__init__``): workers build their KV caches
and call ``register_kv_caches`` and vLLM warms the model up *before* the
scheduler, and so the leader, exists. So neither side may block where the
other cannot progress:

* worker: :meth:`WorkerHandshake.start` in ``register_kv_caches`` returns at
  once; a background thread waits for the leader, reports the layout,
  allocates when told, and acks. The first real step calls
  :meth:`WorkerHandshake.wait` (instant by then: the leader only finishes its
  constructor after every rank acked).
* leader: ``LeaderHandshake(...).start().wait()`` in the leader's constructor.
  Every worker is already past ``register_kv_caches`` and waiting, so blocking
  there delays only the engine's readiness, by the allocation time.

Both sides give up after ``leader_worker_init_timeout_secs``, counted from
their own ``start()``.

Protocol (signed JSON, soft state, resent every heartbeat so message loss,
late joiners and ordering never matter): the leader PUBlishes a *beacon*
(:class:`~kvbm.runtime.wire.Beacon`) on the pub endpoint; each worker PUSHes
its *status* (:class:`~kvbm.runtime.wire.Status`) to the ack endpoint. States:
leader ``waiting → allocate → done`` (or ``failed``), worker ``joined →
allocating → ready`` (or ``failed``). A worker answers any leader's beacon
with its status and a random nonce; it *joins* a session (and from then on
obeys it: allocate, done, failed) only once that session's beacons echo its
nonce. So a replayed beacon of an old session, which the MAC cannot tell
from a fresh one, never makes a worker allocate or fail. A peer silent for
``dead_after_s`` is dead; once a socket saw a peer disconnect (a killed
process closes its sockets), silence longer than a few heartbeats is enough.
A new leader session during the handshake (the scheduler restarted) makes
workers drop their allocation and join again. Every message that does not
verify is logged (rate-limited) and dropped; a flood is bounded per loop.

Transport (see :func:`handshake_endpoints`): TCP on the configured
``leader_zmq_host``/``_pub_port``/``_ack_port`` when any of them is set;
otherwise Unix sockets in a private (0700) per-user directory, named by vLLM's
``kv_transfer_config.engine_id`` (a fresh UUID per vLLM instance that the
scheduler and every worker share), so two instances on one host never
collide. Prefer the default: it needs no ports and no secret.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import stat
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeoutError  # not the builtin before 3.11
from dataclasses import dataclass, replace
from functools import partial
from typing import Any, Generic, TypeVar

import zmq
from zmq.utils.monitor import recv_monitor_message

from kvbm.config import ConfigError, KvbmConfig, env_var
from kvbm.core.tiers import DISK, HOST, REMOTE, Tier
from kvbm.runtime import wire
from kvbm.runtime.sizing import (
    SizingError,
    TierPlan,
    TierSizes,
    WorkerLayout,
    check_fits,
    configured_chain,
    local_bytes_per_block,
    machine_resources,
    plan_tiers,
)
from kvbm.runtime.wire import Beacon, DropLog, Malformed, Status
from kvbm.storage.remote_index import remote_key

logger = logging.getLogger(__name__)

HEARTBEAT_S = 0.25
#: Silence after which a peer counts as dead (generous: a busy process may stall).
DEAD_AFTER_S = 30.0
#: Silence that suffices once its connection was seen closing.
GONE_AFTER_DISCONNECT_HEARTBEATS = 8
PROGRESS_LOG_S = 10.0
#: Messages read per loop turn at most, so a flood cannot starve timeouts and liveness checks.
DRAIN_LIMIT = 256
_ZMQ_KEYS = ("leader_zmq_host", "leader_zmq_pub_port", "leader_zmq_ack_port")
TIMEOUT_VAR = env_var("leader_worker_init_timeout_secs")
_PORT_VARS = f"{env_var('leader_zmq_pub_port')}/{env_var('leader_zmq_ack_port')}"

T = TypeVar("T")
#: ``allocate(plan, progress)``: builds this rank's tiers, reporting ``progress(0..1)`` as it goes.
Allocate = Callable[[TierPlan, Callable[[float], None]], T]
#: ``chain_of(sizes)``: the leader's chain for the sized settings (default: :func:`configured_chain`).
ChainOf = Callable[[TierSizes], tuple[Tier, ...]]

__all__ = [
    "HandshakeError", "HandshakeResult", "LeaderHandshake", "WorkerHandshake", "Endpoints", "handshake_endpoints",
    "TierPlan", "TierSizes", "WorkerLayout", "TIMEOUT_VAR",
]


class HandshakeError(RuntimeError):
    """The handshake failed; the message says which rank, why, and what to change."""


@dataclass(frozen=True)
class HandshakeResult:
    plan: TierPlan
    workers: tuple[WorkerLayout, ...]


@dataclass(frozen=True)
class Endpoints:
    pub: str
    ack: str
    #: Default (ipc) transport only: the leader holds this flock for its lifetime,
    #: so a second leader with the same engine id fails instead of stealing the sockets.
    lock: str | None = None

    @property
    def tcp(self) -> bool:
        return self.lock is None


def handshake_endpoints(config: KvbmConfig, engine_id: str | None) -> Endpoints:
    """Where the leader binds and the workers connect.

    Any of the leader ZMQ host/port settings given (env or extra config), or
    no engine id: TCP, needed when workers run on other hosts. Otherwise Unix
    sockets named by the engine id: both sides know it without any
    coordination, and two vLLM instances (distinct UUIDs; data-parallel
    engines get a ``_dp<rank>`` suffix) cannot collide.
    """
    if not engine_id or any(key in config.sources for key in _ZMQ_KEYS):
        host = config.leader_zmq_host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"  # IPv6 literal
        return Endpoints(f"tcp://{host}:{config.leader_zmq_pub_port}", f"tcp://{host}:{config.leader_zmq_ack_port}")
    base = os.path.join(private_dir(), hashlib.blake2b(engine_id.encode(), digest_size=8).hexdigest())
    return Endpoints(f"ipc://{base}.pub", f"ipc://{base}.ack", f"{base}.lock")


def private_dir() -> str:
    """``$TMPDIR/kvbm-<uid>``, mode 0700 and ours: no other user can reach the
    sockets or read the generated TCP secret in it."""
    path = os.path.join(tempfile.gettempdir(), f"kvbm-{os.getuid()}")
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise HandshakeError(
            f"kvbm: {path} must be a directory owned by this user with mode 0700 (it holds the "
            f"leader/worker sockets); remove it, or set {_PORT_VARS} to use TCP instead"
        )
    return path


class _Peer:
    """Liveness of the other side: silence is death, sooner once its socket closed."""

    def __init__(self, sock: zmq.Socket, heartbeat_s: float, dead_after_s: float) -> None:
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.dead_after_s = dead_after_s
        self.gone_after_s = min(dead_after_s, GONE_AFTER_DISCONNECT_HEARTBEATS * heartbeat_s)
        self.last_disconnect = float("-inf")

    def poll_events(self) -> None:
        while self.monitor.poll(0):
            recv_monitor_message(self.monitor)
            self.last_disconnect = time.monotonic()

    def silent_too_long(self, last_seen: float, now: float) -> bool:
        limit = self.gone_after_s if self.last_disconnect > last_seen else self.dead_after_s
        return now - last_seen > limit

    def close(self) -> None:
        self.monitor.close(linger=0)


class _Handshake(Generic[T]):
    """A background thread running ``_run``, a future for its outcome, and signed messaging."""

    def __init__(self, config: KvbmConfig, engine_id: str | None, heartbeat_s: float, dead_after_s: float) -> None:
        self.config = config
        self.timeout_s = config.leader_worker_init_timeout_secs
        self.endpoints = handshake_endpoints(config, engine_id)
        # A bad secret setting fails here, in the caller, before any socket exists.
        self._key = wire.handshake_key(config, self.endpoints.tcp, private_dir() if self.endpoints.tcp else "")
        self.heartbeat_s = heartbeat_s
        self.dead_after_s = dead_after_s
        self._future: Future[T] = Future()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._context = zmq.Context()
        self.drops = DropLog("kvbm handshake")

    def _start(self, name: str) -> None:
        self._deadline = time.monotonic() + self.timeout_s
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self._future.set_result(self._run())
        except BaseException as exc:  # handed to wait(); never lost in a thread
            self._future.set_exception(exc)
        finally:
            self._context.term()  # after every socket is closed; flushes lingering messages

    def _run(self) -> T:
        raise NotImplementedError

    def _send(self, sock: zmq.Socket, message: dict[str, Any]) -> None:
        """Fire and forget: state is resent every heartbeat, so a dropped message costs nothing."""
        try:
            sock.send(wire.seal(self._key, message), zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _receive(self, sock: zmq.Socket, parse: Callable[[dict[str, Any]], Any]) -> Iterator[Any]:
        """Verified, parsed messages waiting on ``sock`` (at most :data:`DRAIN_LIMIT`); the rest are dropped."""
        for _ in range(DRAIN_LIMIT):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                yield parse(wire.unseal(self._key, frame))
            except Malformed as exc:
                self.drops.drop(str(exc))

    def wait(self, timeout: float | None = None) -> T:
        """Block until the handshake is done; raises :class:`HandshakeError` on failure.

        Bounded by the configured timeout (plus a little for the thread to
        report) even if ``timeout`` is None.
        """
        assert self._thread is not None, "call start() first"
        limit = max(0.0, self._deadline - time.monotonic()) + 5.0
        try:
            return self._future.result(limit if timeout is None else min(limit, timeout))
        except FutureTimeoutError:
            raise HandshakeError(
                f"kvbm: the leader/worker handshake did not finish within {TIMEOUT_VAR}="
                f"{self.timeout_s:g}s; raise {TIMEOUT_VAR} if allocating the tiers is slow"
            ) from None

    def close(self) -> None:
        """Stop the thread (if running) and release the sockets."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _timeout_error(self, what: str) -> HandshakeError:
        return HandshakeError(
            f"kvbm: the leader/worker handshake timed out after {self.timeout_s:g}s "
            f"({TIMEOUT_VAR}={self.timeout_s:g}): {what}{self.drops.summary()}. Raise {TIMEOUT_VAR} if "
            "startup or allocating the tiers is just slow."
        )


class LeaderHandshake(_Handshake[HandshakeResult]):
    """Scheduler side: wait for ``world_size`` workers, size the tiers, wait for their acks."""

    def __init__(
        self,
        config: KvbmConfig,
        world_size: int,
        engine_id: str | None,
        *,
        heartbeat_s: float = HEARTBEAT_S,
        dead_after_s: float = DEAD_AFTER_S,
        progress_log_s: float = PROGRESS_LOG_S,
        identity: Callable[[Sequence[WorkerLayout]], str] | None = None,
        chain_of: ChainOf | None = None,
    ) -> None:
        """``identity``: the model identity from the ranks' layouts; with G4 its key
        (:func:`remote_key`) goes to every rank with the chain: each stores its shard under it.
        ``chain_of``: builds the chain from the sized settings (tests add tiers of their own)."""
        super().__init__(config, engine_id, heartbeat_s, dead_after_s)
        self.world_size = world_size
        self.identity = identity
        self.chain_of: ChainOf = chain_of or partial(configured_chain, config)
        self.drops = DropLog("kvbm leader")
        self.session = wire.new_id()
        self.progress_log_s = progress_log_s
        self._lock_fd: int | None = None
        #: Nonces of the workers heard in this session, echoed in every beacon (bounded).
        self._nonces: OrderedDict[str, None] = OrderedDict()

    def start(self) -> LeaderHandshake:
        """Bind now (a port in use fails here, in the caller) and run the handshake in the background."""
        ep = self.endpoints
        if ep.lock is not None:
            self._lock_fd = os.open(ep.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(self._lock_fd)
                self._lock_fd = None
                self._context.term()
                raise HandshakeError(
                    f"kvbm: another vLLM instance on this host runs a kvbm leader for the same "
                    f"kv_transfer_config.engine_id ({ep.lock} is locked). Give each instance its own "
                    f"engine_id (or leave it unset), or set {_PORT_VARS}"
                ) from None
        self._pub = self._context.socket(zmq.PUB)
        self._ack = self._context.socket(zmq.PULL)
        self._ack.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)  # libzmq drops a peer that sends more
        for sock, address, var in ((self._pub, ep.pub, "PUB"), (self._ack, ep.ack, "ACK")):
            sock.linger = 1000  # let the final beacon reach the workers
            try:
                sock.bind(address)
            except zmq.ZMQError as exc:
                self._close_sockets()
                self._context.term()
                raise HandshakeError(
                    f"kvbm leader cannot listen on {address}: {exc}. Another process (a second vLLM "
                    f"instance?) uses it: give this instance other ports with {_PORT_VARS} (now {var} is "
                    "taken), or unset the leader ZMQ host/port settings to use collision-free local sockets"
                ) from None
        self._peers = _Peer(self._ack, self.heartbeat_s, self.dead_after_s)
        logger.info(
            "kvbm leader: waiting for %d worker(s) on %s (timeout %gs, %s%s)",
            self.world_size, ep.ack, self.timeout_s, TIMEOUT_VAR,
            ", messages signed with the deployment secret" if ep.tcp else "",
        )
        self._start("kvbm-leader-handshake")
        return self

    def _close_sockets(self) -> None:
        for name in ("_peers", "_pub", "_ack"):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        if self._lock_fd is not None:
            # libzmq leaves socket files behind; remove them (and the lock) while
            # still holding the lock, so a waiting leader starts from a clean slate.
            ep = self.endpoints
            for path in (ep.pub[len("ipc://"):], ep.ack[len("ipc://"):], ep.lock):
                try:
                    os.unlink(path)
                except OSError:
                    pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _beacon(self, state: str, plan: TierPlan | None = None, error: str | None = None) -> None:
        beacon = Beacon(self.session, self.world_size, state, plan, error and wire.clip(error), tuple(self._nonces))
        self._send(self._pub, wire.beacon_message(beacon))

    def _remember(self, nonce: str) -> None:
        self._nonces[nonce] = None
        self._nonces.move_to_end(nonce)
        while len(self._nonces) > min(wire.MAX_PEERS, 4 * self.world_size + 16):
            self._nonces.popitem(last=False)

    def _run(self) -> HandshakeResult:
        try:
            result = self._handshake()
        except HandshakeError as exc:
            self._beacon("failed", error=str(exc))  # workers stop waiting and report it too
            raise
        finally:
            self._close_sockets()
        return result

    def _handshake(self) -> HandshakeResult:
        status: dict[int, Status] = {}
        seen: dict[int, float] = {}
        plan: TierPlan | None = None
        next_beacon = next_log = 0.0
        started = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beacon:
                self._beacon("allocate" if plan else "waiting", plan)
                next_beacon = now + self.heartbeat_s
            if self._ack.poll(self.heartbeat_s * 1000):
                for message in self._receive(self._ack, wire.parse_status):
                    if message.session != self.session:
                        continue  # addressed to a previous leader (or replayed); the worker re-joins on our beacon
                    self._remember(message.nonce)
                    rank = self._check_worker(message, status)
                    status[rank], seen[rank] = message, time.monotonic()
            self._peers.poll_events()
            now = time.monotonic()
            for rank, last in seen.items():
                if self._peers.silent_too_long(last, now):
                    raise HandshakeError(
                        f"kvbm worker rank {rank} ({_who(status[rank].layout)}) stopped responding during the "
                        f"leader/worker handshake ({now - last:.1f}s silent, state {status[rank].state!r}): "
                        "the process probably died; see its log"
                    )
            if plan is None and len(status) == self.world_size:
                plan = self._plan([status[r].layout for r in range(self.world_size)])
                next_beacon = now  # tell them at once
                continue
            if plan is not None and all(status[r].state == "ready" for r in range(self.world_size)):
                self._beacon("done", plan)
                logger.info("kvbm leader: all %d worker(s) allocated in %.1fs", self.world_size, now - started)
                return HandshakeResult(plan, tuple(status[r].layout for r in range(self.world_size)))
            if now >= next_log + self.progress_log_s:
                next_log = now
                if now - started >= self.progress_log_s:
                    logger.info("kvbm leader: handshake after %.0fs: %s", now - started, self._progress(status))
            if now >= self._deadline:
                raise self._timeout_error(self._progress(status))
        raise HandshakeError("kvbm leader handshake was closed before it finished")

    def _plan(self, layouts: list[WorkerLayout]) -> TierPlan:
        """Size the tiers, check that this host holds its workers' share, build the chain (once)."""
        here = socket.gethostname()
        try:
            sizes = plan_tiers(self.config, layouts)
            local = local_bytes_per_block(layouts, here)
            if local:
                machine = machine_resources(self.config.disk_cache_dir, need_disk=sizes.disk_slots > 0)
                check_fits(self.config, sizes, local, machine, f"host {here}")
        except SizingError as exc:
            raise HandshakeError(str(exc)) from None
        if self.identity is not None and self.config.has_remote_tier:
            sizes = replace(sizes, remote_key=remote_key(self.identity(layouts)))
        try:
            plan = TierPlan(self.chain_of(sizes), sizes.bytes_per_block_all_ranks, sizes.remote_key)
        except ValueError as exc:
            raise HandshakeError(f"kvbm leader: {exc}") from None
        logger.info("kvbm leader: %d worker(s) joined (%s B per block in all); %s: workers allocating",
                    self.world_size, plan.bytes_per_block_all_ranks, _describe(plan))
        return plan

    def _check_worker(self, message: Status, status: dict[int, Status]) -> int:
        """Conflicts among authentic workers end the handshake with the reason."""
        layout = message.layout
        rank, world = layout.rank, layout.world_size
        if world != self.world_size:
            raise HandshakeError(
                f"kvbm worker rank {rank} ({_who(layout)}) reports world_size {world}, the leader expects "
                f"{self.world_size}: a worker of another vLLM instance reached this leader. Give each instance "
                f"its own {_PORT_VARS} (or unset them)"
            )
        if message.state == "failed":
            raise HandshakeError(f"kvbm worker rank {rank} ({_who(layout)}) failed: {message.error}")
        known = status.get(rank)
        if known is not None and (known.layout.pid, known.layout.host) != (layout.pid, layout.host):
            raise HandshakeError(
                f"kvbm: two processes claim worker rank {rank} ({_who(known.layout)} and {_who(layout)}): two vLLM "
                f"instances share this leader's endpoints. Give each its own {_PORT_VARS}"
            )
        if known is None:
            logger.info("kvbm leader: worker rank %d joined (%s)", rank, _who(layout))
        return rank

    def _progress(self, status: dict[int, Status]) -> str:
        missing = [r for r in range(self.world_size) if r not in status]
        if missing:
            return (
                f"rank(s) {', '.join(map(str, missing))} of world_size {self.world_size} never joined "
                f"(the leader listens on {self.endpoints.ack}; check that those workers started and use "
                "the same leader ZMQ settings, secret and engine_id)"
            )
        parts = []
        for rank in range(self.world_size):
            state, progress = status[rank].state, status[rank].progress
            parts.append(f"rank {rank} {state}" + (f" {100 * progress:.0f}%" if progress is not None else ""))
        return "workers are still allocating: " + ", ".join(parts)


class WorkerHandshake(_Handshake[tuple[TierPlan, T]]):
    """One rank: report the layout, allocate what the leader asks, ack; all in the background."""

    def __init__(
        self,
        config: KvbmConfig,
        engine_id: str | None,
        layout: WorkerLayout,
        allocate: Allocate[T],
        *,
        heartbeat_s: float = HEARTBEAT_S,
        dead_after_s: float = DEAD_AFTER_S,
    ) -> None:
        super().__init__(config, engine_id, heartbeat_s, dead_after_s)
        self.layout = layout
        self.drops = DropLog(f"kvbm worker rank {layout.rank}")
        self.nonce = wire.new_id()
        self._allocate = allocate

    def start(self) -> WorkerHandshake[T]:
        """Connect and return at once; the leader may not exist yet (vLLM builds it after the workers)."""
        self._sub = self._context.socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.MAXMSGSIZE, wire.MAX_MESSAGE_BYTES)
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a leader that is not there
        self._push.linger = 1000  # a final "failed" status should still reach the leader
        self._sub.linger = 0
        self._sub.connect(self.endpoints.pub)
        self._push.connect(self.endpoints.ack)
        self._leader = _Peer(self._sub, self.heartbeat_s, self.dead_after_s)
        self._start(f"kvbm-worker{self.layout.rank}-handshake")
        return self

    def _run(self) -> tuple[TierPlan, T]:
        self._state = "joined"
        self._session: str | None = None
        self._progress: float | None = None
        try:
            return self._handshake()
        except HandshakeError as exc:
            if self._session is not None:
                self._status("failed", error=str(exc))
            raise
        finally:
            for sock in (self._leader, self._sub, self._push):
                sock.close()

    def _status(self, state: str, error: str | None = None, session: str | None = None) -> None:
        if session is None:
            self._state = state
        status = Status(session or self._session or "", self.nonce, self.layout, state, self._progress,
                        error and wire.clip(error))
        self._send(self._push, wire.status_message(status))

    def _handshake(self) -> tuple[TierPlan, T]:
        rank = self.layout.rank
        plan: TierPlan | None = None
        allocation: Future[T] | None = None
        last_leader = next_status = next_hello = 0.0
        while not self._stop.is_set():
            if self._sub.poll(self.heartbeat_s * 1000):
                for beacon in self._receive(self._sub, wire.parse_beacon):
                    now = time.monotonic()
                    if beacon.session != self._session:
                        if self.nonce not in beacon.peers:
                            # A leader that has not heard us (or a replay): introduce ourselves, once a heartbeat.
                            if now >= next_hello:
                                self._status("joined", session=beacon.session)
                                next_hello = now + self.heartbeat_s
                            continue
                        if self._session is not None:
                            logger.warning(
                                "kvbm worker rank %d: the leader restarted during the handshake; joining the "
                                "new one (dropping this rank's allocation)", rank,
                            )
                        else:
                            logger.info("kvbm worker rank %d: joined the leader at %s", rank, self.endpoints.pub)
                        self._session, plan, allocation, self._progress = beacon.session, None, None, None
                        self._state = "joined"
                    last_leader = now
                    if beacon.world_size != self.layout.world_size:
                        raise HandshakeError(
                            f"kvbm worker rank {rank}: the leader at {self.endpoints.pub} expects world_size "
                            f"{beacon.world_size}, this worker {self.layout.world_size}: it belongs to another "
                            f"vLLM instance. Give each instance its own {_PORT_VARS}"
                        )
                    if beacon.state == "failed":
                        raise HandshakeError(f"kvbm leader failed the handshake: {beacon.error}")
                    if beacon.state in ("allocate", "done") and allocation is None:
                        plan = beacon.plan
                        assert plan is not None  # parse_beacon guarantees it in these states
                        allocation = self._start_allocation(plan)
                        self._status("allocating")
                    if beacon.state == "done" and self._state == "ready":
                        assert allocation is not None and plan is not None
                        return plan, allocation.result()
            if allocation is not None and allocation.done() and self._state == "allocating":
                exc = allocation.exception()
                if exc is not None:
                    # A setting to fix (ConfigError: G4 unreachable, a bad secret file) speaks for itself.
                    detail = str(exc) if isinstance(exc, ConfigError) else f"{type(exc).__name__}: {exc}"
                    raise HandshakeError(
                        f"kvbm worker rank {rank} could not allocate its tiers ({_describe(plan)}): {detail}"
                    )
                self._status("ready")
                logger.info("kvbm worker rank %d: tiers allocated, waiting for the other ranks", rank)
            now = time.monotonic()
            if self._session is not None and now >= next_status:
                self._status(self._state)
                next_status = now + self.heartbeat_s
            self._leader.poll_events()
            if self._session is not None and self._leader.silent_too_long(last_leader, now):
                raise HandshakeError(
                    f"kvbm worker rank {rank}: the leader at {self.endpoints.pub} stopped responding during the "
                    f"handshake ({now - last_leader:.1f}s silent): the scheduler process died or restarted; "
                    "see its log"
                )
            if now >= self._deadline:
                raise self._timeout_error(
                    f"worker rank {rank} never joined a leader at {self.endpoints.pub} (is the scheduler "
                    "side configured with the same leader ZMQ settings, secret and engine_id? Workers on "
                    f"another host need {env_var('leader_zmq_host')} set to the leader's address)"
                    if self._session is None else f"worker rank {rank} is still {self._state!r}"
                )
        raise HandshakeError(f"kvbm worker rank {rank} handshake was closed before it finished")

    def _start_allocation(self, plan: TierPlan) -> Future[T]:
        """Check this host has room, then allocate on its own thread, so heartbeats keep
        flowing while pages are faulted in; progress reaches the leader in the statuses."""
        where = f"worker rank {self.layout.rank}'s host {self.layout.host}"
        sizes = plan.settings_sizes()
        try:
            machine = machine_resources(self.config.disk_cache_dir, need_disk=sizes.disk_slots > 0)
            check_fits(self.config, sizes, self.layout.bytes_per_block, machine, where)
        except SizingError as exc:
            raise HandshakeError(str(exc)) from None
        future: Future[T] = Future()

        def progress(fraction: float) -> None:
            self._progress = min(1.0, max(0.0, float(fraction)))

        def run() -> None:
            try:
                future.set_result(self._allocate(plan, progress))
            except BaseException as exc:
                future.set_exception(exc)

        logger.info("kvbm worker rank %d: allocating %s of %d B per block", self.layout.rank, _describe(plan),
                    self.layout.bytes_per_block)
        threading.Thread(target=run, name=f"kvbm-worker{self.layout.rank}-allocate", daemon=True).start()
        return future


def _describe(plan: TierPlan | None) -> str:
    """The tiers of an allocation in words, for messages (not the dataclass repr)."""
    if plan is None:
        return "none"
    words = {HOST: "host memory", DISK: "disk", REMOTE: "Redis"}
    return ", ".join(f"{t.name} {t.capacity} blocks ({words.get(t.medium, t.medium)})" if t.capacity
                     else f"{t.name} ({words.get(t.medium, t.medium)})" for t in plan.chain) or "none"


def _who(layout: WorkerLayout) -> str:
    return f"pid {layout.pid} on {layout.host}"

