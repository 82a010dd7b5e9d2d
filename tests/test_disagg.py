"""Disaggregated serving end to end: real vLLM workers, real NIXL, kvbm's router.

Everything runs through the launch scripts in CPU mode, as a user would:
``launch/disagg_kvbm.sh`` (1P1D) and ``launch/disagg_kvbm_2p2d.sh`` (2P2D).
Multi-turn conversations go through the router and every answer is compared
with a single plain vLLM server's (same engine settings, greedy). The prefill
worker of 1P1D runs without vLLM's own prefix cache, so every repeated prefix
it uses must have come from kvbm — and the decode worker must have computed
no prompt token itself: all of them arrive over NIXL.

Servers are shared per module and started as early as possible (the plain
server beside the 1P1D deployment) because starting vLLM dominates the time
on a 2-core machine.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvbm.tools.bench.server import VllmServer
from kvbm.tools.demo.tiny_model import generate_text

pytest.importorskip(
    "nixl._api",
    reason="nixl is not installed: run scripts/setup_nixl.sh (pip install --no-deps nixl==1.5.1 nixl-cu13==1.5.1)",
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

ROOT = Path(__file__).resolve().parent.parent
ENGINE = ["--block-size", "128", "--max-model-len", "2048", "--enforce-eager", "--seed", "0"]
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
MAX_TOKENS = 8
TURNS = 3


def conversation(seed: int) -> list[str]:
    """User messages of one conversation: each turn ~300 tokens, so later turns span several blocks."""
    return [f"Conversation {seed}, turn {t}. " + generate_text(110, seed=seed * 10 + t) for t in range(TURNS)]


CONVERSATIONS = {"1p1d": [conversation(s) for s in (1, 2, 3)], "2p2d": [conversation(s) for s in (11, 12, 13, 14)]}


# ---------------------------------------------------------------------------
# HTTP helpers
# ---------------------------------------------------------------------------
def http(url: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"},
                                     method="POST" if body is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def chat_body(model: str, messages: list[dict], stream: bool) -> dict:
    return {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def answer_text(raw: bytes, stream: bool, chat: bool) -> str:
    """The generated text of a (streamed or not) completion; raises on an error event."""
    if not stream:
        choice = json.loads(raw)["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]
    text = ""
    for line in raw.decode().splitlines():
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            raise RuntimeError(f"error event: {event['error']}")
        for choice in event.get("choices", []):
            text += (choice.get("delta", {}).get("content") or "") if chat else choice.get("text", "")
    return text


@dataclass
class Turn:
    text: str
    prefill: str = ""
    decode: str = ""


def run_conversations(url: str, model: str, conversations: list[list[str]],
                      history: list[list[str]] | None = None) -> list[list[Turn]]:
    """Play each conversation turn by turn (sequentially: same batches as the plain run).

    Assistant turns in the history are ``history``'s answers when given (the
    plain server's), so a divergence at one turn does not cascade.
    """
    results: list[list[Turn]] = []
    for c, user_turns in enumerate(conversations):
        messages: list[dict] = []
        turns: list[Turn] = []
        for t, user in enumerate(user_turns):
            messages.append({"role": "user", "content": user})
            stream = t % 2 == 1
            status, headers, raw = http(f"{url}/v1/chat/completions", chat_body(model, messages, stream))
            assert status == 200, raw[:500]
            turn = Turn(answer_text(raw, stream, chat=True), headers.get("x-kvbm-prefill-worker", ""),
                        headers.get("x-kvbm-decode-worker", ""))
            turns.append(turn)
            previous = history[c][t] if history is not None else turn.text
            messages.append({"role": "assistant", "content": previous})
        results.append(turns)
    return results


COMPLETION_PROMPT = generate_text(200, seed=99)


def run_completions(url: str, model: str) -> list[str]:
    """The same prompt twice, non-streamed then streamed (the second is a repeated prefix)."""
    out = []
    for stream in (False, True):
        body = {"model": model, "prompt": COMPLETION_PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0,
                "ignore_eos": True, "stream": stream}
        status, _, raw = http(f"{url}/v1/completions", body)
        assert status == 200, raw[:500]
        out.append(answer_text(raw, stream, chat=False))
    return out


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{([^}]*)\})?\s+(\S+)")


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of a Prometheus metric's samples whose labels include ``labels``."""
    _, _, raw = http(f"{url}/metrics", timeout=30)
    total = 0.0
    for line in raw.decode().splitlines():
        match = _SAMPLE.match(line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(match.group(3))
    return total


# ---------------------------------------------------------------------------
# deployments (the launch scripts)
# ---------------------------------------------------------------------------
def free_port_block(count: int, stride: int = 1) -> int:
    """A base port such that base + stride*i is free for i < count."""
    rng = random.Random(os.getpid() ^ time.monotonic_ns())
    for _ in range(200):
        base = rng.randrange(20000, 45000)
        try:
            for i in range(count):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", base + stride * i))
        except OSError:
            continue
        return base
    raise RuntimeError("no free port block")


@dataclass
class Deployment:
    """One launch script run in CPU mode, with its own ports and logs."""

    script: str
    model: str
    log_dir: Path
    n_prefill: int
    n_decode: int
    extra_env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    def __post_init__(self) -> None:
        n = self.n_prefill + self.n_decode
        self.http_port = free_port_block(1)
        self.prefill_base = free_port_block(self.n_prefill)
        self.decode_base = free_port_block(self.n_decode)
        self.env = {
            **os.environ, **ENV,
            "CPU_ONLY": "1", "PYTHON": sys.executable, "MODEL": self.model,
            "HTTP_HOST": "127.0.0.1", "HTTP_PORT": str(self.http_port),
            "PREFILL_PORT_BASE": str(self.prefill_base), "DECODE_PORT_BASE": str(self.decode_base),
            "NIXL_PORT_BASE": str(free_port_block(n, 8)), "KVBM_PORT_BASE": str(free_port_block(10 * n + 3)),
            "KVBM_METRICS_PORT_BASE": str(free_port_block(n)),
            "WORKER_ARGS": " ".join(ENGINE), "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "64",
            # The hit counts below need every match loaded: the load-or-recompute rule decides from
            # timings, which a loaded 2-core host makes anything (tests/test_cost.py covers it).
            "DYN_KVBM_ONBOARD_POLICY": "always",
            "LOG_DIR": str(self.log_dir), "STOP_TIMEOUT": "15",
            # Only a refused connection takes a worker down here: on a loaded 2-core host a busy
            # worker can miss health checks for a long time (hangs are covered by test_disagg_router).
            "ROUTER_ARGS": "--health-interval 0.5 --health-timeout 10 --abort-after 900",
            **self.extra_env,
        }
        self.url = f"http://127.0.0.1:{self.http_port}"

    def worker_url(self, role: str, i: int) -> str:
        base = self.prefill_base if role == "prefill" else self.decode_base
        return f"http://127.0.0.1:{base + i}"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(["bash", str(ROOT / "launch" / self.script)], cwd=ROOT, env=self.env,
                                     stdout=open(self.log_dir / "launch.log", "w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 900) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.script} exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                status, _, raw = http(f"{self.url}/health", timeout=5)
                if status == 200 and all(w["healthy"] for w in json.loads(raw)["workers"]):
                    return
            except OSError:
                pass
            time.sleep(1)
        raise AssertionError(f"{self.script} not ready after {timeout:.0f}s:\n{self.tail()}")

    def pid(self, name: str) -> int:
        return int((self.log_dir / f"{name}.pid").read_text())

    def pids(self) -> dict[str, int]:
        return {p.stem: int(p.read_text()) for p in self.log_dir.glob("*.pid")}

    def tail(self, lines: int = 40) -> str:
        out = []
        for log in sorted(self.log_dir.glob("*.log")):
            out.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    @contextmanager
    def logs_on_failure(self, what: str) -> Iterator[None]:
        """A failure inside (a timeout, a bad status) also shows every process's log tail."""
        try:
            yield
        except Exception as exc:
            raise AssertionError(f"{what} failed ({exc!r}); logs:\n{self.tail(80)}") from exc

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for pid in self.pids().values():  # a safety net; the script stops its process groups itself
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------
@dataclass
class Stack:
    model: str
    tmp: Path
    reference: dict[str, list[list[str]]]
    reference_completions: list[str]
    one: Deployment
    timings: dict[str, float] = field(default_factory=dict)


@pytest.fixture(scope="module")
def stack(model_path, tmp_path_factory):
    """The plain server's answers (server started beside the 1P1D deployment, then stopped)."""
    tmp = tmp_path_factory.mktemp("disagg")
    t0 = time.monotonic()
    one = Deployment("disagg_kvbm.sh", model_path, tmp / "1p1d", 1, 1,
                     {"PREFILL_ARGS": "--no-enable-prefix-caching"})
    one.start()
    plain = VllmServer(model_path, ENGINE, env=ENV, log_path=tmp / "plain.log")
    try:
        plain.start()
        reference = {name: [[t.text for t in turns] for turns in run_conversations(plain.url, model_path, convs)]
                     for name, convs in CONVERSATIONS.items()}
        reference_completions = run_completions(plain.url, model_path)
    except BaseException:
        one.stop()
        raise
    finally:
        plain.stop()
    stack = Stack(model_path, tmp, reference, reference_completions, one, {"plain": time.monotonic() - t0})
    try:
        one.wait_ready()
    except BaseException:
        one.stop()
        raise
    stack.timings["1p1d_ready"] = time.monotonic() - t0
    yield stack
    one.stop()
    print(f"\ndisagg timings (s): {stack.timings}")


@pytest.fixture(scope="module")
def one_p_one_d(stack):
    """All conversations through the 1P1D router, then the workers' metrics."""
    one = stack.one
    t0 = time.monotonic()
    with one.logs_on_failure("1P1D requests"):
        turns = run_conversations(one.url, stack.model, CONVERSATIONS["1p1d"], stack.reference["1p1d"])
        completions = run_completions(one.url, stack.model)
    stack.timings["1p1d_requests"] = time.monotonic() - t0
    p, d = one.worker_url("prefill", 0), one.worker_url("decode", 0)
    return {
        "turns": turns, "completions": completions,
        "p_external_hits": metric(p, "vllm:external_prefix_cache_hits_total"),
        "p_local_hits": metric(p, "vllm:prefix_cache_hits_total"),
        "d_computed": metric(d, "vllm:prompt_tokens_by_source_total", source="local_compute"),
        "d_external": metric(d, "vllm:prompt_tokens_by_source_total", source="external_kv_transfer"),
        "d_prompt": metric(d, "vllm:prompt_tokens_total"),
        "router_ok": metric(one.url, "kvbm_router_requests_total", status="200"),
    }


@pytest.fixture(scope="module")
def two_p_two_d(stack):
    """The 2P2D deployment (1P1D stopped first: memory). A dead worker does not stop it."""
    stack.one.stop()
    t0 = time.monotonic()
    two = Deployment("disagg_kvbm_2p2d.sh", stack.model, stack.tmp / "2p2d", 2, 2, {"STOP_ON_WORKER_EXIT": "0"})
    two.start()
    try:
        two.wait_ready()
        stack.timings["2p2d_ready"] = time.monotonic() - t0
        t1 = time.monotonic()
        with two.logs_on_failure("2P2D requests"):
            turns = run_conversations(two.url, stack.model, CONVERSATIONS["2p2d"], stack.reference["2p2d"])
        stack.timings["2p2d_requests"] = time.monotonic() - t1
        yield two, turns
    finally:
        two.stop()


# ---------------------------------------------------------------------------
# 1P1D
# ---------------------------------------------------------------------------
def test_1p1d_answers_equal_plain_vllm(stack, one_p_one_d):
    got = [[t.text for t in turns] for turns in one_p_one_d["turns"]]
    assert got == stack.reference["1p1d"]
    assert one_p_one_d["completions"] == stack.reference_completions
    assert one_p_one_d["router_ok"] == TURNS * len(CONVERSATIONS["1p1d"]) + 2


def test_1p1d_prefill_reuses_prefixes_from_kvbm(one_p_one_d):
    """The prefill worker has no prefix cache of its own: every hit is a kvbm onboard.

    Each later turn repeats at least the previous turn's full blocks, and the
    repeated completion prompt all of its full blocks.
    """
    assert one_p_one_d["p_local_hits"] == 0
    later_turns = (TURNS - 1) * len(CONVERSATIONS["1p1d"]) + 1
    assert one_p_one_d["p_external_hits"] >= 128 * later_turns


def test_1p1d_decode_computes_no_prompt_token(one_p_one_d):
    assert one_p_one_d["d_prompt"] > 0
    assert one_p_one_d["d_computed"] == 0
    assert one_p_one_d["d_external"] > 0


def test_1p1d_router_endpoints(stack, one_p_one_d):
    url = stack.one.url
    status, _, raw = http(f"{url}/v1/models")
    assert status == 200 and json.loads(raw)["data"][0]["id"] == stack.model
    status, _, raw = http(f"{url}/health")
    assert status == 200 and {w["role"] for w in json.loads(raw)["workers"]} == {"prefill", "decode"}
    assert metric(url, "kvbm_router_prefill_routes_total") >= TURNS * len(CONVERSATIONS["1p1d"])


def test_1p1d_script_stops_everything_when_a_worker_dies(stack, one_p_one_d):
    """The launch script's contract: one dead child takes the deployment down, leaving nothing behind."""
    one = stack.one
    pids = one.pids()
    assert set(pids) == {"prefill0", "decode0", "router"}
    os.killpg(pids["decode0"], signal.SIGKILL)
    assert one.proc is not None
    one.proc.wait(timeout=90)
    deadline = time.monotonic() + 30
    while any(group_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [name for name, pid in pids.items() if group_alive(pid)]
    assert "decode0" in (one.log_dir / "launch.log").read_text()


# ---------------------------------------------------------------------------
# 2P2D
# ---------------------------------------------------------------------------
def test_2p2d_answers_equal_plain_vllm(stack, two_p_two_d):
    _, turns = two_p_two_d
    assert [[t.text for t in conv] for conv in turns] == stack.reference["2p2d"]


def test_2p2d_conversations_stick_and_requests_spread(two_p_two_d):
    two, turns = two_p_two_d
    homes = [{t.prefill for t in conv} for conv in turns]
    assert all(len(h) == 1 for h in homes), homes
    assert set().union(*homes) == {"p0", "p1"}
    assert {t.decode for conv in turns for t in conv} == {"d0", "d1"}
    for i in range(2):  # both prefill workers really prefilled (vLLM's own counters)
        assert metric(two.worker_url("prefill", i), "vllm:prompt_tokens_total") > 0
        assert metric(two.worker_url("decode", i), "vllm:prompt_tokens_by_source_total",
                      source="local_compute") == 0


def test_2p2d_decode_worker_killed_mid_run(stack, two_p_two_d):
    """Kill d1 while requests are in flight: no hang, clear outcomes, service goes on with d0."""
    two, _ = two_p_two_d
    body = {"model": stack.model, "prompt": generate_text(150, seed=5), "max_tokens": 48, "temperature": 0,
            "ignore_eos": True}

    def one_request(i: int) -> tuple[int, str]:
        status, headers, raw = http(f"{two.url}/v1/completions", {**body, "stream": i % 2 == 0}, timeout=240)
        return status, raw.decode(errors="replace")

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(one_request, i) for i in range(6)]
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # kill once d1 really has work
            _, _, raw = http(f"{two.url}/health", timeout=10)
            d1 = next(w for w in json.loads(raw)["workers"] if w["name"] == "d1")
            if d1["in_flight"] > 0:
                break
            time.sleep(0.1)
        os.killpg(two.pid("decode1"), signal.SIGKILL)
        # Every request ends (a hang would raise TimeoutError here): no wall-clock bound asserted.
        results = [f.result(timeout=240) for f in futures]
    for status, text in results:
        if status == 200 and '"error"' not in text:
            continue
        assert "d1" in text, f"an error that does not name the failed worker: {status} {text[:300]}"
    assert sum(status == 200 and '"error"' not in text for status, text in results) >= 3

    _, _, raw = http(f"{two.url}/health", timeout=10)
    d1 = next(w for w in json.loads(raw)["workers"] if w["name"] == "d1")
    assert d1["healthy"] is False and d1["last_error"]
    assert metric(two.url, "kvbm_router_worker_down_total", worker="d1") >= 1
    for _ in range(3):  # the deployment keeps serving, on d0
        status, headers, raw = http(f"{two.url}/v1/completions", {**body, "max_tokens": 4}, timeout=120)
        assert status == 200, raw[:300]
        assert headers["x-kvbm-decode-worker"] == "d0"
    assert two.proc is not None and two.proc.poll() is None  # STOP_ON_WORKER_EXIT=0 kept it up
