"""A Dynamo deployment on one host, from Python: ``dynamo.frontend`` + ``dynamo.vllm`` workers with kvbm.

The tests and ``bench/dynamo_routing.py`` start fleets with this; the launch scripts
(launch/*.sh with Dynamo installed) run the same commands from bash. Everything stays
on this host and on loopback: file discovery (``--discovery-backend file``, no etcd),
the TCP request plane and the ZMQ event plane (no NATS) bound to 127.0.0.1, and each
worker's vLLM KV events on an ``ipc://`` socket in the fleet's directory (vLLM binds
``ipc://`` endpoints; a ``tcp://127.0.0.1`` one it would *connect* to, and nobody binds).

Dynamo's processes start slowly on a small CPU host (vLLM's import alone takes tens of
seconds): :meth:`DynamoFleet.wait_ready` waits until every worker registered and the
frontend answers a request.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: kvbm as the worker's connector (the seed's aggregated config).
KVBM_TRANSFER_CONFIG: dict[str, Any] = {
    "kv_connector": "DynamoConnector",
    "kv_role": "kv_both",
    "kv_connector_module_path": "kvbm.vllm_integration.connector",
}

#: Keeps Dynamo's own sockets on loopback (its defaults pick the host's first address).
LOOPBACK_ENV: dict[str, str] = {
    "DYN_TCP_RPC_HOST": "127.0.0.1",
    "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    "DYN_SYSTEM_HOST": "127.0.0.1",
    "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
}
PLANES = ["--discovery-backend", "file", "--request-plane", "tcp", "--event-plane", "zmq"]
#: A worker is up once it registered its generate endpoint (component "backend", or "prefill" for prefill workers).
_REGISTERED = re.compile(r"Registered endpoint 'dynamo\.\w+\.generate'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post_json(url: str, body: Mapping[str, Any], timeout: float = 300) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Worker:
    """One ``dynamo.vllm`` worker: extra vLLM/Dynamo arguments, environment, and whether kvbm is its connector."""

    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    kv_transfer_config: Mapping[str, Any] | None = field(default_factory=lambda: dict(KVBM_TRANSFER_CONFIG))
    kv_events: bool = True


class DynamoFleet:
    """Frontend + workers as process groups; ``stop()`` (or the context manager) ends them all."""

    def __init__(self, python: str, model: str, directory: Path, workers: Sequence[Worker], *,
                 router_mode: str = "kv", frontend_args: Sequence[str] = (), env: Mapping[str, str] | None = None,
                 block_size: int = 128) -> None:
        self.python = python
        self.model = model
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.workers = list(workers)
        self.router_mode = router_mode
        self.frontend_args = list(frontend_args)
        self.block_size = block_size
        self.http_port = free_port()
        self.env = {**os.environ, **LOOPBACK_ENV, "DYN_FILE_KV": str(self.dir / "discovery"),
                    "HF_HUB_OFFLINE": "1", **(env or {})}
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def _start(self, name: str, argv: list[str], env: Mapping[str, str]) -> None:
        with open(self.log(name), "wb") as out:
            self.procs[name] = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=dict(env),
                                                start_new_session=True)
        logger.info("started %s (pid %d): %s", name, self.procs[name].pid, " ".join(argv))

    def worker_argv(self, i: int, worker: Worker) -> list[str]:
        argv = [self.python, "-m", "dynamo.vllm", "--model", self.model, "--block-size", str(self.block_size),
                "--enforce-eager", *PLANES]
        if worker.kv_transfer_config is not None:
            argv += ["--kv-transfer-config", json.dumps(worker.kv_transfer_config)]
        if worker.kv_events:
            events = {"enable_kv_cache_events": True, "publisher": "zmq",
                      "endpoint": f"ipc://{self.dir / f'kv-events-{i}'}"}
            argv += ["--kv-events-config", json.dumps(events)]
        return argv + list(worker.args)

    def start(self) -> DynamoFleet:
        self._start("frontend", [self.python, "-m", "dynamo.frontend", "--http-host", "127.0.0.1",
                                 "--http-port", str(self.http_port), "--router-mode", self.router_mode, *PLANES,
                                 *self.frontend_args], self.env)
        for i, worker in enumerate(self.workers):
            env = {**self.env, "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port()), **worker.env}
            self._start(f"worker{i}", self.worker_argv(i, worker), env)
        return self

    def wait_ready(self, timeout: float = 900) -> None:
        """Every worker registered its generate endpoint and the frontend served one request."""
        deadline = time.monotonic() + timeout
        pending = {f"worker{i}" for i in range(len(self.workers))}
        while time.monotonic() < deadline:
            self.check_alive()
            pending = {name for name in pending if not _REGISTERED.search(self.log(name).read_text(errors="replace"))}
            if not pending:
                try:
                    self.chat([{"role": "user", "content": "ready?"}], max_tokens=1, timeout=60)
                    return
                except (urllib.error.URLError, OSError, KeyError, ValueError):
                    pass
            time.sleep(2)
        raise TimeoutError(f"Dynamo fleet not ready after {timeout:.0f}s (waiting for {sorted(pending)}):\n"
                           + self.tails())

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.tails()}")

    def chat(self, messages: Sequence[Mapping[str, str]], max_tokens: int = 8, timeout: float = 300,
             **extra: Any) -> dict[str, Any]:
        """A greedy chat completion; the answer carries ``nvext.worker_id`` (which worker served it)."""
        body = {"model": self.model, "messages": list(messages), "max_tokens": max_tokens, "temperature": 0.0,
                "stream": False, "nvext": {"extra_fields": ["worker_id"]}, **extra}
        return post_json(f"{self.url}/v1/chat/completions", body, timeout)

    def metrics(self) -> dict[str, float]:
        """The frontend's Prometheus samples, summed over label sets by metric name."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=30) as response:
            text = response.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out

    def tails(self, lines: int = 25) -> str:
        out = []
        for name in self.procs:
            text = self.log(name).read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {name} ({self.log(name)}) ---\n" + "\n".join(text))
        return "\n".join(out)

    def stop(self, timeout: float = 20) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group: vLLM's engine and worker processes too
            except ProcessLookupError:
                pass
            proc.wait()

    def __enter__(self) -> DynamoFleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
