"""Start and stop a vLLM OpenAI server (through ``kvbm serve``) for benchmarks and tests."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

KVBM_TRANSFER_CONFIG = {
    "kv_connector": "DynamoConnector",
    "kv_role": "kv_both",
    "kv_connector_module_path": "kvbm.vllm_integration.connector",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class VllmServer:
    """A ``kvbm serve`` subprocess; a context manager that always stops it."""

    def __init__(self, model: str, args: Sequence[str] = (), env: dict[str, str] | None = None,
                 log_path: Path | None = None, port: int | None = None,
                 kvbm_extra_config: dict | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model = model
        argv = [sys.executable, "-m", "kvbm", "serve", model, "--port", str(self.port),
                "--host", "127.0.0.1", *args]
        if kvbm_extra_config is not None:
            config = {**KVBM_TRANSFER_CONFIG, "kv_connector_extra_config": kvbm_extra_config}
            argv += ["--kv-transfer-config", json.dumps(config)]
        self.argv = argv
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> VllmServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 600.0, on_poll: Callable[[float], None] | None = None) -> None:
        """Start the server and wait until ``/health`` answers.

        ``on_poll(seconds_waited)`` is called about twice a second, for progress
        displays: loading a model and allocating KV tiers can take minutes.
        """
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        started = time.monotonic()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if on_poll is not None:
                on_poll(time.monotonic() - started)
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"vLLM server not healthy after {timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)

    def metrics(self) -> dict[str, float]:
        """vLLM's Prometheus counters, summed over label sets."""
        return parse_prometheus(self.metrics_text())

    def metrics_text(self) -> str:
        """vLLM's ``/metrics`` page as text (labels kept, for :func:`parse_samples`)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            return response.read().decode()

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        if self.log_path is None or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-lines:])


def scrape(url: str, timeout: float = 5.0) -> str | None:
    """A Prometheus page's text, or None if nothing answers there (an exporter that is off)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.read().decode()
    except OSError:
        return None


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a Prometheus text page as (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def parse_prometheus(text: str) -> dict[str, float]:
    """Sample values by metric name, summed over label sets (engines, models, ...)."""
    values: dict[str, float] = {}
    for name, _, value in parse_samples(text):
        values[name] = values.get(name, 0.0) + value
    return values
