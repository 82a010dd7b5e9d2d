"""Real redis-server processes on loopback for the G4 tests: single nodes and a 3-node cluster.

Each server runs in its own temporary directory without persistence
(``--save ''``, no AOF), on a free port, and is killed (SIGKILL) at the end.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
_START_TIMEOUT_S = 20.0


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port (and, for a cluster node, a free bus port at +10000)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not cluster or (port + 10000 < 65536 and _port_free(port + 10000)):
            return port
    raise RuntimeError("no free port pair found")


class RedisServer:
    """One redis-server process; ``kill()`` and ``start()`` again on the same port."""

    def __init__(self, directory: str, *, port: int | None = None, password: str | None = None,
                 cluster: bool = False, tls: tuple[str, str] | None = None, extra: Sequence[str] = ()) -> None:
        self.dir = directory
        os.makedirs(directory, exist_ok=True)
        self.port = port or free_port(cluster)
        self.password = password
        self.cluster = cluster
        self.tls = tls  # (certificate, key); the certificate is its own CA
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def url(self) -> str:
        cred = f":{self.password}@" if self.password else ""
        if self.tls:
            return f"rediss://{cred}127.0.0.1:{self.port}?ssl_ca_certs={self.tls[0]}"
        return f"redis://{cred}127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        args = [REDIS_SERVER or "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--enable-debug-command", "yes",
                "--logfile", os.path.join(self.dir, "redis.log"), "--databases", "16"]
        if self.password:
            args += ["--requirepass", self.password]
        if self.tls:
            cert, key = self.tls
            args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", cert, "--tls-key-file", key,
                     "--tls-ca-cert-file", cert, "--tls-auth-clients", "no"]
        if self.cluster:
            args += ["--cluster-enabled", "yes", "--cluster-config-file", os.path.join(self.dir, "nodes.conf"),
                     "--cluster-node-timeout", "1000", "--cluster-require-full-coverage", "no"]
        return args + self.extra

    def start(self) -> None:
        self.proc = subprocess.Popen(self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while self.cli("PING", check=False) not in ("PONG", "NOAUTH Authentication required."):
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not answer: {self.log_tail()}")
            time.sleep(0.02)

    def cli(self, *args: str, check: bool = True) -> str:
        """Run redis-cli against this server; its stdout, stripped."""
        cmd = [REDIS_CLI or "redis-cli", "-h", "127.0.0.1", "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        if self.tls:
            cmd += ["--tls", "--cacert", self.tls[0]]
        out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30)
        if check and out.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {out.stderr or out.stdout}")
        return out.stdout.strip()

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "redis.log")) as f:
                return "".join(f.readlines()[-5:])
        except OSError:
            return "(no log)"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets (connections are accepted by the kernel) but
        answers nothing, like a Redis stuck in a long command or a frozen VM."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause` (harmless otherwise)."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGCONT)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class RedisCluster3:
    """Three primaries (each with ``replicas`` replicas), ``cluster-require-full-coverage no``:
    without replicas a dead node's slots are lost while the others keep serving theirs; with
    them a replica takes over after ``cluster-node-timeout`` (1 s here)."""

    def __init__(self, directory: str, replicas: int = 0) -> None:
        self.nodes = [RedisServer(os.path.join(directory, f"node{i}"), cluster=True)
                      for i in range(3 * (1 + replicas))]
        addrs = [f"127.0.0.1:{n.port}" for n in self.nodes]
        self.nodes[0].cli("--cluster", "create", *addrs, "--cluster-replicas", str(replicas), "--cluster-yes")
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not all(self._ready(n) for n in self.nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok with replicas in sync")
            time.sleep(0.05)

    @staticmethod
    def _ready(node: RedisServer) -> bool:
        if "cluster_state:ok" not in node.cli("CLUSTER", "INFO"):
            return False
        replication = node.cli("INFO", "replication")
        return "role:master" in replication or "master_link_status:up" in replication

    @property
    def primaries(self) -> list[RedisServer]:
        return [n for n in self.nodes if n.alive and "role:master" in n.cli("INFO", "replication")]

    @property
    def url(self) -> str:
        return ",".join(n.url for n in self.nodes)

    def kill(self) -> None:
        for n in self.nodes:
            n.kill()
