"""``kvbm router``: one OpenAI-compatible endpoint in front of prefill and decode workers.

Each generation request goes through two workers, as in vLLM's own P/D proxy:

1. a **prefill** worker gets the request with ``max_tokens=1``, no streaming,
   and ``kv_transfer_params={"do_remote_decode": true, ...}``: it computes the
   prompt's KV (reusing what its kvbm holds) and answers with the
   ``kv_transfer_params`` that locate those blocks;
2. a **decode** worker gets the original request plus those
   ``kv_transfer_params``: it pulls the prompt's KV over NIXL instead of
   computing it, generates, and its answer (streamed or not) goes back to the
   client unchanged.

Routing. Prefill workers are chosen by *expected prefix-cache overlap*: the
router keeps, per prefill worker, the chained hashes of fixed-size character
chunks of the prompts it sent there (a bounded LRU), so the next turn of a
conversation — whose prompt extends the previous one — goes where its prefix
already is, and kvbm there onboards it instead of recomputing. A prompt no
worker has seen goes to the least loaded worker, ties broken by rendezvous
hashing of its first chunk (stable per conversation, minimal reshuffling when
workers come and go). An overlapping worker that is busier than the least
loaded one by more than ``load_slack`` requests loses to the least loaded one.
Decode workers hold no reusable state between requests, so they are chosen
least loaded, round robin on ties.

Failures. A background task checks every worker's ``/health``. A worker that
refuses connections (or resets them mid-request) is *down* at once: out of
rotation, its in-flight calls aborted. One that answers health checks slowly
or with errors is first *suspect* — no new requests while another worker of
its role is up, because a busy worker on a loaded host is slow, not dead — and
*down* once it has failed for ``abort_after_s``, which bounds how long a hung
worker can hold a request. A worker comes back when ``/health`` answers again.
A request whose prefill or decode failed before anything reached the client
is retried on other workers (a failed decode also re-runs the prefill: the
old KV lease belongs to the failed attempt); after ``retries`` it gets a clear
OpenAI-style error naming the workers. A stream that breaks after it started
ends with an error event and ``[DONE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import logging
import signal
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: What vLLM's P/D proxy sends a prefill worker: "compute the prompt, keep the
#: blocks for a remote decoder and tell me where they are".
PREFILL_KV_TRANSFER_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}

ENDPOINTS = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}

#: Client connections at once; when full, the oldest one not in a request makes room.
MAX_CONNECTIONS = 1024
#: Seconds a client has to send a request's headers after connecting, and then its body.
HEADER_TIMEOUT_S = 30.0
BODY_TIMEOUT_S = 60.0
#: Deeper JSON is refused: no OpenAI request nests this far, and forwarding a deeper
#: body would exhaust the stack (RecursionError) in the JSON encoder.
MAX_JSON_DEPTH = 64


# ---------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------
class RouterError(Exception):
    """A request-level error the client sees as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, kind: str = "router_error") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind


class WorkerFailure(Exception):
    """One upstream call failed in a way another worker may not (retryable)."""

    def __init__(self, worker: Worker, reason: str) -> None:
        super().__init__(f"{worker.role} worker {worker.name} ({worker.url}): {reason}")
        self.worker = worker
        self.reason = reason


class UpstreamResponse(Exception):
    """A worker answered with an error that is the client's (4xx): pass it on as is."""

    def __init__(self, status: int, body: bytes, content_type: str) -> None:
        super().__init__(f"upstream answered {status}")
        self.status = status
        self.body = body
        self.content_type = content_type


def error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}, "object": "error"}


# ---------------------------------------------------------------------------
# workers and the prefix index
# ---------------------------------------------------------------------------
@dataclass(eq=False)
class Worker:
    """One vLLM server as the router sees it."""

    name: str
    url: str
    role: str  # "prefill" or "decode"
    #: "up": in rotation; "suspect": failing health checks, used only when no
    #: worker of its role is up; "down": unreachable (or failing too long), unused.
    state: str = "down"
    #: When the current run of failed health checks started.
    failing_since: float | None = None
    in_flight: int = 0
    #: Upstream calls finished (any outcome).
    calls_done: int = 0
    consecutive_failures: int = 0
    last_error: str = ""
    #: Upstream calls now running on this worker; cancelled when it goes down.
    calls: set[asyncio.Task] = field(default_factory=set)
    #: The subset of ``calls`` cancelled because the worker went down.
    aborted: set[asyncio.Task] = field(default_factory=set)
    #: An out-of-round health check in progress (after a broken connection).
    recheck: asyncio.Task | None = None

    @property
    def healthy(self) -> bool:
        return self.state == "up"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "url": self.url, "role": self.role, "state": self.state,
                "healthy": self.healthy,
                "in_flight": self.in_flight, "calls_done": self.calls_done, "last_error": self.last_error}


class PrefixIndex:
    """Which prompt prefixes each worker has seen, as chained chunk hashes.

    A worker that prefilled a prompt holds its KV (in vLLM's cache or kvbm's
    tiers); the longest chain a new prompt shares with a worker's entries is
    the router's estimate of how much of the prompt that worker will not have
    to compute. Bounded per worker (LRU), since the workers' caches are too.
    """

    def __init__(self, chunk_chars: int = 256, capacity: int = 262_144) -> None:
        if chunk_chars < 1 or capacity < 1:
            raise ValueError("chunk_chars and capacity must be >= 1")
        self.chunk_chars = chunk_chars
        self.capacity = capacity
        self._entries: dict[str, OrderedDict[bytes, None]] = {}

    def hashes(self, root: str, text: str) -> list[bytes]:
        """Chained hashes of the full chunks of ``text`` (a partial tail chunk is not cached anywhere)."""
        out: list[bytes] = []
        prev = hashlib.blake2b(root.encode(), digest_size=16).digest()
        for start in range(0, len(text) - self.chunk_chars + 1, self.chunk_chars):
            chunk = text[start:start + self.chunk_chars].encode("utf-8", "surrogatepass")
            prev = hashlib.blake2b(prev + chunk, digest_size=16).digest()
            out.append(prev)
        return out

    def match(self, worker: str, hashes: Sequence[bytes]) -> int:
        """Number of leading chunks of the prompt the worker has seen.

        Hashes are chained, so the last present one vouches for all before it;
        walking from the end also survives LRU eviction of early entries.
        """
        entries = self._entries.get(worker)
        if not entries:
            return 0
        for i in range(len(hashes) - 1, -1, -1):
            if hashes[i] in entries:
                return i + 1
        return 0

    def record(self, worker: str, hashes: Iterable[bytes]) -> None:
        entries = self._entries.setdefault(worker, OrderedDict())
        for h in hashes:
            entries[h] = None
            entries.move_to_end(h)
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def forget(self, worker: str) -> None:
        """A worker that went down lost (or may have lost) its cache."""
        self._entries.pop(worker, None)

    def size(self, worker: str) -> int:
        return len(self._entries.get(worker, ()))


def rendezvous_rank(key: bytes, worker: Worker) -> bytes:
    """Highest-random-weight hashing: each key prefers a stable worker order."""
    return hashlib.blake2b(key + worker.name.encode(), digest_size=8).digest()


def prompt_text(kind: str, body: dict[str, Any]) -> str:
    """The text whose prefix decides KV reuse, rendered append-only.

    For chat, later turns append messages, so a rendering that concatenates
    messages in order keeps earlier turns as an exact prefix. Tools render
    first because chat templates put them before the conversation.
    """
    if kind == "completions":
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return " ".join(map(str, prompt))
        raise RouterError(400, "the disaggregated router serves one prompt per request: "
                               "'prompt' must be a string or a list of token ids", "invalid_request_error")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RouterError(400, "'messages' must be a non-empty list", "invalid_request_error")
    parts: list[str] = []
    if body.get("tools"):
        parts.append(json.dumps(body["tools"], sort_keys=True))
    for message in messages:
        if not isinstance(message, dict):
            raise RouterError(400, "each message must be an object", "invalid_request_error")
        content = message.get("content")
        text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
        parts.append(f"{message.get('role')}\x1f{text}\x1e")
    return "".join(parts)


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether ``value`` nests deeper than ``limit`` (iterative: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return False


class ConnectionGuard:
    """Bounds what idle or stalled clients can hold.

    aiohttp keeps a connection that sends half a request until its
    keep-alive timeout (75 s by default) and has no connection limit, so a
    client that opens connections faster than that exhausts the router's
    file descriptors. Here a connection must deliver a request's headers
    within ``header_timeout_s``; at ``max_connections``, a new connection
    closes the oldest one that is not in a request (half-sent or idle
    keep-alive), or is itself closed when every connection is busy. Body
    timeouts are the handler's (:data:`BODY_TIMEOUT_S`).
    """

    def __init__(self, max_connections: int = MAX_CONNECTIONS, header_timeout_s: float = HEADER_TIMEOUT_S) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self._in_request: set[Any] = set()
        self._delivered: set[Any] = set()  # connections that sent at least one request's headers

    @web.middleware
    async def middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[Any]]) -> Any:
        protocol = request.protocol
        self._delivered.add(protocol)
        self._in_request.add(protocol)
        try:
            return await handler(request)
        finally:
            self._in_request.discard(protocol)

    def attach(self, server: web.Server) -> None:
        """Hook into the server's connection bookkeeping (after ``AppRunner.setup``)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            asyncio.get_running_loop().call_later(self.header_timeout_s, self._expire, handler)
            open_ = [h for h in server.connections if h.transport is not None]
            if len(open_) > self.max_connections:
                idle = next((h for h in open_ if h is not handler and h not in self._in_request), handler)
                idle.force_close()

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._delivered.discard(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def _expire(self, handler: Any) -> None:
        if handler not in self._delivered and handler.transport is not None:
            handler.force_close()


GUARD_KEY = web.AppKey("kvbm_guard", ConnectionGuard)


async def start_site(app: web.Application, host: str, port: int, guard: ConnectionGuard | None = None,
                     **runner_args: Any) -> web.AppRunner:
    """Serve ``app`` (made by :meth:`Router.make_app`) behind its connection guard; returns the runner."""
    guard = guard or app[GUARD_KEY]
    # lingering_time: after answering a request whose body never finished (408), how long
    # aiohttp keeps reading the rest before closing (10 s by default).
    runner = web.AppRunner(app, shutdown_timeout=5, lingering_time=2.0, **runner_args)
    await runner.setup()
    assert runner.server is not None
    guard.attach(runner.server)
    await web.TCPSite(runner, host, port).start()
    return runner


# ---------------------------------------------------------------------------
# the router
# ---------------------------------------------------------------------------
@dataclass
class RouterConfig:
    prefill_urls: list[str]
    decode_urls: list[str]
    health_interval_s: float = 1.0
    health_timeout_s: float = 5.0
    #: Consecutive failed health checks (timeouts, 5xx) that make a worker
    #: "suspect": no new requests while another worker of its role is up. A
    #: busy worker on a loaded host can be slow to answer; it is not dead.
    health_failures: int = 3
    #: Seconds of failed health checks after which a worker is "down" and its
    #: in-flight calls are aborted (a hung worker); a refused connection is at once.
    abort_after_s: float = 30.0
    connect_timeout_s: float = 5.0
    #: Longest wait for the next byte from a worker before the call fails.
    read_timeout_s: float = 600.0
    retries: int = 2
    chunk_chars: int = 256
    index_capacity: int = 262_144
    load_slack: int = 4


class Router:
    """Routes OpenAI requests through prefill then decode workers (module docstring)."""

    def __init__(self, config: RouterConfig, registry: CollectorRegistry | None = None) -> None:
        if not config.prefill_urls or not config.decode_urls:
            raise ValueError("the router needs at least one prefill and one decode worker")
        self.config = config
        self.prefill = [Worker(f"p{i}", url.rstrip("/"), "prefill") for i, url in enumerate(config.prefill_urls)]
        self.decode = [Worker(f"d{i}", url.rstrip("/"), "decode") for i, url in enumerate(config.decode_urls)]
        self.index = PrefixIndex(config.chunk_chars, config.index_capacity)
        self._decode_rr = itertools.count()
        self._session: aiohttp.ClientSession | None = None
        self._health_task: asyncio.Task | None = None
        self._ready_logged = False
        self.registry = registry or CollectorRegistry()
        self._init_metrics()

    @property
    def workers(self) -> list[Worker]:
        return [*self.prefill, *self.decode]

    # ---- metrics -----------------------------------------------------------
    def _init_metrics(self) -> None:
        r = self.registry
        self.m_requests = Counter("kvbm_router_requests", "Client requests by endpoint and HTTP status",
                                  ["endpoint", "status"], registry=r)
        self.m_latency = Histogram("kvbm_router_request_seconds", "Client request latency (to last byte)",
                                   ["endpoint"], registry=r,
                                   buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.m_ttfb = Histogram("kvbm_router_first_byte_seconds", "Time to the decode worker's first byte",
                                ["endpoint"], registry=r,
                                buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.m_upstream = Counter("kvbm_router_upstream_requests", "Calls to workers by outcome",
                                  ["role", "worker", "outcome"], registry=r)
        self.m_retries = Counter("kvbm_router_retries", "Requests retried after a worker failure", registry=r)
        self.m_routes = Counter("kvbm_router_prefill_routes", "Prefill routing decisions by reason",
                                ["reason"], registry=r)
        self.m_prompt_chunks = Counter("kvbm_router_prompt_chunks", "Full prompt chunks routed", registry=r)
        self.m_overlap_chunks = Counter("kvbm_router_overlap_chunks",
                                        "Prompt chunks the chosen prefill worker had already seen", registry=r)
        self.m_down = Counter("kvbm_router_worker_down", "Times a worker was taken out of rotation",
                              ["role", "worker"], registry=r)
        self.m_healthy = Gauge("kvbm_router_worker_healthy", "1 while a worker is in rotation",
                               ["role", "worker", "url"], registry=r)
        self.m_in_flight = Gauge("kvbm_router_worker_in_flight", "Requests now on a worker",
                                 ["role", "worker"], registry=r)
        for w in self.workers:
            self.m_healthy.labels(w.role, w.name, w.url).set(0)
            self.m_in_flight.labels(w.role, w.name).set(0)

    # ---- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        """Open the HTTP client and start health checks (first round before serving)."""
        self._session = aiohttp.ClientSession(
            # Below vLLM's (uvicorn's) 5 s keep-alive, so the router never reuses a
            # connection the worker is just closing (which would look like a failure).
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3),
            timeout=aiohttp.ClientTimeout(total=None, connect=self.config.connect_timeout_s,
                                          sock_read=self.config.read_timeout_s),
            auto_decompress=False,
        )
        await self._check_all()
        self._health_task = asyncio.create_task(self._health_loop(), name="kvbm-router-health")

    async def close(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            await asyncio.gather(self._health_task, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def make_app(self, guard: ConnectionGuard | None = None) -> web.Application:
        """The application; serve it with :func:`start_site`, which attaches ``guard``."""
        guard = guard or ConnectionGuard()
        app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[guard.middleware])
        app[GUARD_KEY] = guard
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)

        async def on_startup(_: web.Application) -> None:
            await self.start()

        async def on_cleanup(_: web.Application) -> None:
            await self.close()

        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app

    # ---- health ---------------------------------------------------------------
    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._check_all()
            except Exception:  # the loop must outlive any one bad check
                logger.exception("kvbm router: health check round failed")

    async def _check_all(self) -> None:
        await asyncio.gather(*(self._check(w) for w in self.workers))
        ready = any(w.healthy for w in self.prefill) and any(w.healthy for w in self.decode)
        if ready and not self._ready_logged:
            logger.info("kvbm router: ready (%d/%d prefill, %d/%d decode workers healthy)",
                        sum(w.healthy for w in self.prefill), len(self.prefill),
                        sum(w.healthy for w in self.decode), len(self.decode))
        self._ready_logged = ready

    async def _check(self, worker: Worker) -> None:
        assert self._session is not None
        timeout = aiohttp.ClientTimeout(total=self.config.health_timeout_s)
        try:
            async with self._session.get(f"{worker.url}/health", timeout=timeout) as resp:
                await resp.read()
                ok, reason, fatal = resp.status == 200, f"/health answered {resp.status}", False
        except aiohttp.ClientConnectorError as exc:
            ok, reason, fatal = False, f"cannot connect: {exc.os_error or exc}", True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            ok, reason, fatal = False, f"/health failed: {type(exc).__name__} {exc}".strip(), False
        if ok:
            worker.consecutive_failures = 0
            worker.failing_since = None
            if worker.state != "up":
                worker.state = "up"
                worker.last_error = ""
                self.m_healthy.labels(worker.role, worker.name, worker.url).set(1)
                logger.info("kvbm router: %s worker %s (%s) is in rotation", worker.role, worker.name, worker.url)
            return
        now = time.monotonic()
        worker.consecutive_failures += 1
        worker.last_error = reason
        if worker.failing_since is None:
            worker.failing_since = now
        if worker.state == "down":
            return
        if fatal or now - worker.failing_since >= self.config.abort_after_s:
            self.mark_down(worker, reason)
        elif worker.state == "up" and worker.consecutive_failures >= self.config.health_failures:
            worker.state = "suspect"
            self.m_healthy.labels(worker.role, worker.name, worker.url).set(0)
            logger.warning("kvbm router: %s worker %s (%s) is suspect: %s; no new requests while another "
                           "%s worker is up, in-flight ones aborted after %.0fs of this", worker.role, worker.name,
                           worker.url, reason, worker.role, self.config.abort_after_s)

    def _recheck(self, worker: Worker) -> None:
        """Health-check one worker right away (coalesced: one check at a time per worker)."""
        if worker.recheck is None or worker.recheck.done():
            worker.recheck = asyncio.create_task(self._check(worker), name=f"kvbm-router-recheck-{worker.name}")

    def mark_down(self, worker: Worker, reason: str) -> None:
        """Take a worker out of rotation and abort its in-flight calls (they retry elsewhere)."""
        worker.last_error = reason
        if worker.state == "down":
            return
        worker.state = "down"
        self.m_healthy.labels(worker.role, worker.name, worker.url).set(0)
        self.m_down.labels(worker.role, worker.name).inc()
        if worker.role == "prefill":
            self.index.forget(worker.name)
        logger.warning("kvbm router: %s worker %s (%s) out of rotation: %s; %d in-flight call(s) aborted",
                       worker.role, worker.name, worker.url, reason, len(worker.calls))
        for task in list(worker.calls):
            worker.aborted.add(task)
            task.cancel()

    # ---- picking workers --------------------------------------------------------
    def pick_prefill(self, hashes: Sequence[bytes], key: bytes, exclude: set[Worker]) -> tuple[Worker, int, str]:
        """Return (worker, chunks it already has, reason) — module docstring explains the policy."""
        healthy = self._candidates(self.prefill, exclude)
        if not healthy:
            raise RouterError(503, self._none_healthy("prefill", exclude), "service_unavailable")
        min_load = min(w.in_flight for w in healthy)
        seen = {w: self.index.match(w.name, hashes) for w in healthy}
        best = max(seen.values())
        if best > 0:
            near = [w for w in healthy if seen[w] == best and w.in_flight <= min_load + self.config.load_slack]
            if near:
                chosen = min(near, key=lambda w: (w.in_flight, rendezvous_rank(key, w)))
                return chosen, best, "overlap"
        least = [w for w in healthy if w.in_flight == min_load]
        chosen = max(least, key=lambda w: rendezvous_rank(key, w))
        return chosen, seen[chosen], "overloaded" if best > 0 else "least_loaded"

    def pick_decode(self, exclude: set[Worker]) -> Worker:
        healthy = self._candidates(self.decode, exclude)
        if not healthy:
            raise RouterError(503, self._none_healthy("decode", exclude), "service_unavailable")
        min_load = min(w.in_flight for w in healthy)
        least = [w for w in healthy if w.in_flight == min_load]
        return least[next(self._decode_rr) % len(least)]

    @staticmethod
    def _candidates(pool: list[Worker], exclude: set[Worker]) -> list[Worker]:
        """Workers that are up; if none, suspect ones (better a slow worker than an error)."""
        for state in ("up", "suspect"):
            found = [w for w in pool if w.state == state and w not in exclude]
            if found:
                return found
        return []

    def _none_healthy(self, role: str, tried: set[Worker]) -> str:
        pool = self.prefill if role == "prefill" else self.decode
        states = ", ".join(
            f"{w.name} {w.url}: " + ("failed for this request" if w in tried else
                                       "up" if w.healthy else f"{w.state} ({w.last_error or 'not yet healthy'})")
            for w in pool)
        return f"no {role} worker available ({states})"

    # ---- upstream calls -----------------------------------------------------------
    async def _on_worker(self, worker: Worker, make: Callable[[], Awaitable[T]]) -> T:
        """Run one upstream call, counted on the worker and aborted if it goes down."""
        task = asyncio.ensure_future(make())
        worker.calls.add(task)
        worker.in_flight += 1
        self.m_in_flight.labels(worker.role, worker.name).set(worker.in_flight)
        try:
            return await task
        except asyncio.CancelledError:
            if task in worker.aborted:  # the worker went down; our own caller is fine
                raise WorkerFailure(worker, f"taken out of rotation ({worker.last_error})") from None
            task.cancel()
            raise
        except aiohttp.ClientConnectorError as exc:
            # Nothing listens there any more: out of rotation now.
            self.mark_down(worker, f"connection refused: {exc.os_error or exc}")
            raise WorkerFailure(worker, f"connection refused: {exc.os_error or exc}") from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
            # The connection broke mid-call: a dead process, or a one-off. Check
            # now instead of at the next round; a refused connect takes it down.
            self._recheck(worker)
            raise WorkerFailure(worker, f"connection lost: {exc}") from exc
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            raise WorkerFailure(worker, f"{type(exc).__name__}: {exc}".rstrip(": ")) from exc
        finally:
            worker.calls.discard(task)
            worker.aborted.discard(task)
            worker.in_flight -= 1
            worker.calls_done += 1
            self.m_in_flight.labels(worker.role, worker.name).set(worker.in_flight)

    async def _prefill(self, worker: Worker, path: str, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        """Run the prompt on a prefill worker; return the decoder's kv_transfer_params."""
        assert self._session is not None
        session = self._session
        prefill_body = dict(body)
        prefill_body["kv_transfer_params"] = dict(PREFILL_KV_TRANSFER_PARAMS)
        prefill_body["stream"] = False
        prefill_body["max_tokens"] = 1
        if "max_completion_tokens" in prefill_body:
            prefill_body["max_completion_tokens"] = 1
        for key in ("stream_options", "min_tokens"):  # min_tokens > 1 would be rejected with max_tokens=1
            prefill_body.pop(key, None)
        prefill_body["n"] = 1

        async def call() -> tuple[int, bytes, str]:
            async with session.post(worker.url + path, json=prefill_body,
                                    headers={"X-Request-Id": request_id}) as resp:
                return resp.status, await resp.read(), resp.content_type

        status, raw, content_type = await self._on_worker(worker, call)
        if 400 <= status < 500:
            self.m_upstream.labels(worker.role, worker.name, "client_error").inc()
            raise UpstreamResponse(status, raw, content_type)
        if status != 200:
            self.m_upstream.labels(worker.role, worker.name, "error").inc()
            raise WorkerFailure(worker, f"answered {status}: {raw[:300].decode(errors='replace')}")
        try:
            params = json.loads(raw).get("kv_transfer_params")
        except (ValueError, AttributeError):
            params = None
        if not isinstance(params, dict) or not params.get("remote_engine_id"):
            self.m_upstream.labels(worker.role, worker.name, "error").inc()
            raise WorkerFailure(worker, "answered without kv_transfer_params: is it running kvbm's prefill "
                                        "connector with NIXL (docs/disaggregated.md)?")
        self.m_upstream.labels(worker.role, worker.name, "ok").inc()
        return params

    # ---- handlers ------------------------------------------------------------------
    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "completions")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        start = time.monotonic()
        endpoint = ENDPOINTS[kind]
        status = 500
        try:
            response = await self._serve(request, kind)
            status = response.status
            return response
        except RouterError as exc:
            status = exc.status
            logger.warning("kvbm router: %s -> %d: %s", endpoint, exc.status, exc.message)
            response = web.json_response(error_body(exc.status, exc.message, exc.kind), status=exc.status)
            if exc.status == 408:
                response.force_close()  # the rest of the body must not be read as a next request
            return response
        finally:
            self.m_requests.labels(endpoint, str(status)).inc()
            self.m_latency.labels(endpoint).observe(time.monotonic() - start)

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        try:
            raw = await asyncio.wait_for(request.read(), BODY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RouterError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s",
                              "invalid_request_error") from None
        too_deep = False
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise RouterError(400, "request body is not valid JSON", "invalid_request_error") from None
        except RecursionError:
            too_deep = True
        if too_deep or json_depth_exceeds(body, MAX_JSON_DEPTH):
            raise RouterError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels",
                              "invalid_request_error")
        if not isinstance(body, dict):
            raise RouterError(400, "request body must be a JSON object", "invalid_request_error")
        if body.get("kv_transfer_params") is not None:
            raise RouterError(400, "kv_transfer_params is set by the router; remove it from the request",
                              "invalid_request_error")
        path = ENDPOINTS[kind]
        text = prompt_text(kind, body)
        root = f"{kind}\x00{body.get('model', '')}"
        hashes = self.index.hashes(root, text)
        key = hashlib.blake2b((root + text[: self.config.chunk_chars]).encode(), digest_size=16).digest()
        request_id = request.headers.get("X-Request-Id") or f"kvbm-{uuid.uuid4().hex}"
        stream = bool(body.get("stream"))
        failed_prefill: set[Worker] = set()
        failed_decode: set[Worker] = set()
        errors: list[str] = []
        for attempt in range(self.config.retries + 1):
            if attempt:
                self.m_retries.inc()
            attempt_id = request_id if attempt == 0 else f"{request_id}-retry{attempt}"
            try:
                prefill, overlap, reason = self.pick_prefill(hashes, key, failed_prefill)
                decode = self.pick_decode(failed_decode)
            except RouterError as exc:
                if errors:
                    exc.message += "; earlier attempts: " + " | ".join(errors)
                raise
            self.m_routes.labels(reason).inc()
            self.m_prompt_chunks.inc(len(hashes))
            self.m_overlap_chunks.inc(overlap)
            logger.debug("kvbm router: %s %s -> prefill %s (%s, %d/%d chunks seen), decode %s",
                         attempt_id, path, prefill.name, reason, overlap, len(hashes), decode.name)
            try:
                params = await self._prefill(prefill, path, body, attempt_id)
            except UpstreamResponse as exc:
                return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
            except WorkerFailure as exc:
                failed_prefill.add(prefill)
                errors.append(str(exc))
                logger.warning("kvbm router: %s: prefill failed: %s", attempt_id, exc)
                continue
            self.index.record(prefill.name, hashes)
            decode_body = dict(body)
            decode_body["kv_transfer_params"] = params
            headers = {"x-kvbm-prefill-worker": prefill.name, "x-kvbm-decode-worker": decode.name,
                       "x-kvbm-attempts": str(attempt + 1), "x-kvbm-request-id": attempt_id}
            try:
                return await self._decode(request, decode, path, decode_body, attempt_id, stream, headers)
            except UpstreamResponse as exc:
                return web.Response(status=exc.status, body=exc.body, content_type=exc.content_type)
            except WorkerFailure as exc:
                failed_decode.add(decode)
                errors.append(str(exc))
                logger.warning("kvbm router: %s: decode failed before any output: %s", attempt_id, exc)
                continue
        raise RouterError(502, f"request failed after {self.config.retries + 1} attempt(s): " + " | ".join(errors),
                          "upstream_failure")

    async def _decode(self, request: web.Request, worker: Worker, path: str, body: dict[str, Any],
                      request_id: str, stream: bool, headers: dict[str, str]) -> web.StreamResponse:
        """Run the request on a decode worker and relay its answer.

        Raises WorkerFailure only while nothing has been sent to the client;
        after that a failure ends the stream with an error event.
        """
        assert self._session is not None
        session = self._session
        endpoint = path
        started = time.monotonic()
        state: dict[str, Any] = {"response": None}

        async def call() -> web.StreamResponse:
            async with session.post(worker.url + path, json=body, headers={"X-Request-Id": request_id}) as resp:
                if resp.status != 200:
                    raw = await resp.read()
                    if 400 <= resp.status < 500:
                        self.m_upstream.labels(worker.role, worker.name, "client_error").inc()
                        raise UpstreamResponse(resp.status, raw, resp.content_type)
                    self.m_upstream.labels(worker.role, worker.name, "error").inc()
                    raise WorkerFailure(worker, f"answered {resp.status}: {raw[:300].decode(errors='replace')}")
                if not stream:
                    raw = await resp.read()
                    self.m_ttfb.labels(endpoint).observe(time.monotonic() - started)
                    self.m_upstream.labels(worker.role, worker.name, "ok").inc()
                    return web.Response(status=200, body=raw, content_type=resp.content_type, headers=headers)
                out = web.StreamResponse(status=200, headers={**headers, "Cache-Control": "no-cache"})
                out.content_type = resp.content_type
                first = True
                async for chunk in resp.content.iter_any():
                    if first:
                        self.m_ttfb.labels(endpoint).observe(time.monotonic() - started)
                        await out.prepare(request)
                        state["response"] = out
                        first = False
                    await out.write(chunk)
                if first:  # an empty stream: still answer
                    await out.prepare(request)
                    state["response"] = out
                await out.write_eof()
                self.m_upstream.labels(worker.role, worker.name, "ok").inc()
                return out

        try:
            return await self._on_worker(worker, call)
        except WorkerFailure as exc:
            out = state["response"]
            if out is None:
                raise
            # The client already has part of the answer: end it with an error event.
            self.m_upstream.labels(worker.role, worker.name, "error").inc()
            logger.warning("kvbm router: %s: decode stream broke after output started: %s", request_id, exc)
            event = error_body(502, f"decode failed mid-stream: {exc}", "upstream_failure")
            try:
                await out.write(f"data: {json.dumps(event)}\n\ndata: [DONE]\n\n".encode())
                await out.write_eof()
            except (ConnectionError, RuntimeError):
                pass  # the client is gone too
            return out

    async def _models(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        for worker in [*self.decode, *self.prefill]:
            if worker.state == "down":
                continue
            try:
                async with self._session.get(f"{worker.url}/v1/models",
                                             timeout=aiohttp.ClientTimeout(total=10)) as resp:
                    raw = await resp.read()
                    if resp.status == 200:
                        return web.Response(body=raw, content_type=resp.content_type)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                continue
        return web.json_response(error_body(503, self._none_healthy("decode", set()), "service_unavailable"),
                                 status=503)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        usable = all(any(w.state != "down" for w in pool) for pool in (self.prefill, self.decode))
        up = all(any(w.healthy for w in pool) for pool in (self.prefill, self.decode))
        status = "ok" if up else "degraded" if usable else "unavailable"
        payload = {"status": status, "workers": [w.describe() for w in self.workers]}
        return web.json_response(payload, status=200 if usable else 503)

    async def _metrics(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------
def _urls(values: Sequence[str] | None) -> list[str]:
    urls: list[str] = []
    for value in values or ():
        for url in value.split(","):
            url = url.strip()
            if url:
                urls.append(url if "://" in url else f"http://{url}")
    return urls


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = RouterConfig([], [])
    parser.add_argument("--prefill", action="append", metavar="URL", required=True,
                        help="a prefill worker's base URL (repeat, or comma-separate, for several)")
    parser.add_argument("--decode", action="append", metavar="URL", required=True,
                        help="a decode worker's base URL (repeat, or comma-separate, for several)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    parser.add_argument("--health-interval", type=float, default=defaults.health_interval_s,
                        help="seconds between worker health checks (default: %(default)s)")
    parser.add_argument("--health-timeout", type=float, default=defaults.health_timeout_s,
                        help="seconds a /health check may take (default: %(default)s)")
    parser.add_argument("--health-failures", type=int, default=defaults.health_failures,
                        help="failed checks in a row after which a worker gets no new requests while another "
                             "is up (default: %(default)s)")
    parser.add_argument("--abort-after", type=float, default=defaults.abort_after_s,
                        help="seconds of failed health checks after which a worker is down and its in-flight "
                             "requests are retried elsewhere; a refused connection does this at once "
                             "(default: %(default)s)")
    parser.add_argument("--connect-timeout", type=float, default=defaults.connect_timeout_s,
                        help="seconds to connect to a worker (default: %(default)s)")
    parser.add_argument("--read-timeout", type=float, default=defaults.read_timeout_s,
                        help="longest silence from a worker mid-request, in seconds (default: %(default)s)")
    parser.add_argument("--retries", type=int, default=defaults.retries,
                        help="extra attempts on other workers after a worker failure (default: %(default)s)")
    parser.add_argument("--prefix-chunk-chars", type=int, default=defaults.chunk_chars,
                        help="granularity, in characters, of the prefix-overlap estimate (default: %(default)s)")
    parser.add_argument("--prefix-index-chunks", type=int, default=defaults.index_capacity,
                        help="prefix chunks remembered per prefill worker (default: %(default)s)")
    parser.add_argument("--load-slack", type=int, default=defaults.load_slack,
                        help="extra in-flight requests a prefill worker with prefix overlap may have over the "
                             "least loaded one and still be chosen (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        prefill_urls=_urls(args.prefill), decode_urls=_urls(args.decode),
        health_interval_s=args.health_interval, health_timeout_s=args.health_timeout,
        health_failures=max(1, args.health_failures), abort_after_s=args.abort_after,
        connect_timeout_s=args.connect_timeout,
        read_timeout_s=args.read_timeout, retries=max(0, args.retries), chunk_chars=args.prefix_chunk_chars,
        index_capacity=args.prefix_index_chunks, load_slack=max(0, args.load_slack),
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; returns the exit code."""
    config = config_from_args(args)
    router = Router(config)
    logger.info("kvbm router: listening on %s:%d; prefill %s; decode %s", args.host, args.port,
                ", ".join(f"{w.name}={w.url}" for w in router.prefill),
                ", ".join(f"{w.name}={w.url}" for w in router.decode))
    asyncio.run(_serve_until_signalled(router.make_app(), args.host, args.port))
    return 0


async def _serve_until_signalled(app: web.Application, host: str, port: int) -> None:
    """``web.run_app`` with the connection guard attached: serve until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runner = await start_site(app, host, port, access_log=None)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
