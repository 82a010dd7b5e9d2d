"""The launch scripts' mechanics, with stand-in workers (fast; real vLLM runs in test_disagg.py).

A fake ``vllm serve`` records its arguments and environment and then sleeps
with a child process, like vLLM's API server with its engine. That is enough
to check the topology (one GPU, port, NIXL side channel and kvbm port set per
worker), the kv-transfer configs, and the process contract: everything stops
when the script is told to, or when any child dies.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvbm.disagg.config import (
    agg_transfer_config,
    decode_transfer_config,
    pd_transfer_config,
    prefill_transfer_config,
)

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted((ROOT / "launch").glob("*.sh")) + sorted((ROOT / "scripts").glob("*.sh"))

FAKE_SERVE = """#!/usr/bin/env bash
# a stand-in for `vllm serve`: record how it was started, then run like a server with a child
port=""
prev=""
for arg in "$@"; do [ "$prev" = --port ] && port=$arg; prev=$arg; done
env | grep -E '^(CUDA_VISIBLE_DEVICES|VLLM_NIXL_SIDE_CHANNEL_(PORT|HOST)|DYN_KVBM_[A-Z_]+)=' > "$FAKE_DIR/$port.env"
printf '%s\\n' "$@" > "$FAKE_DIR/$port.args"
sleep 1000 &
wait
"""


@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
def test_scripts_are_shellcheck_clean():
    result = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_module_prints_what_the_helpers_build():
    def printed(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "kvbm.disagg.config", *args], capture_output=True, text=True,
                             check=True)
        return json.loads(out.stdout)

    assert printed("prefill", "--kv-buffer-device", "cpu") == prefill_transfer_config("cpu")
    assert printed("decode") == decode_transfer_config()
    prefill = prefill_transfer_config("cpu")
    assert prefill["kv_connector"] == "MultiConnector"  # vLLM keys checks on this literal name
    children = prefill["kv_connector_extra_config"]["connectors"]
    assert [c["kv_connector"] for c in children] == ["DynamoConnector", "NixlConnector"]


def _launch(tmp_path: Path, script: str, **env: str) -> tuple[subprocess.Popen, Path]:
    fake_dir = tmp_path / "fake"
    fake_dir.mkdir()
    fake = tmp_path / "fake_serve.sh"
    fake.write_text(FAKE_SERVE)
    fake.chmod(0o755)
    log_dir = tmp_path / "logs"
    full_env = {**os.environ, "PYTHON": sys.executable, "VLLM_SERVE": str(fake), "FAKE_DIR": str(fake_dir),
                "LOG_DIR": str(log_dir), "HTTP_HOST": "127.0.0.1", "HTTP_PORT": "0", "STOP_TIMEOUT": "5",
                "PREFILL_PORT_BASE": "18100", "DECODE_PORT_BASE": "18200", **env}
    proc = subprocess.Popen(["bash", str(ROOT / "launch" / script)], cwd=ROOT, env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    return proc, log_dir


def _wait_for(predicate, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError("timed out")


def _alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _pids(log_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in log_dir.glob("*.pid")}


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def test_2p2d_topology_and_a_dead_worker_stops_everything(tmp_path):
    proc, log_dir = _launch(tmp_path, "disagg_kvbm_2p2d.sh")
    try:
        _wait_for(lambda: len(_pids(log_dir)) == 5 and len(list((tmp_path / "fake").glob("*.args"))) == 4)
        pids = _pids(log_dir)
        assert set(pids) == {"prefill0", "prefill1", "decode0", "decode1", "router"}
        envs = {}
        for port in (18100, 18101, 18200, 18201):
            _wait_for(lambda port=port: (tmp_path / "fake" / f"{port}.env").exists())
            envs[port] = dict(line.split("=", 1) for line in (tmp_path / "fake" / f"{port}.env").read_text().split())
        assert [envs[p]["CUDA_VISIBLE_DEVICES"] for p in (18100, 18101, 18200, 18201)] == ["0", "1", "2", "3"]
        assert len({e["VLLM_NIXL_SIDE_CHANNEL_PORT"] for e in envs.values()}) == 4
        assert envs[18100]["DYN_KVBM_CPU_CACHE_GB"] == "20"
        # Every rank of a worker is on this host: the handshake uses private Unix sockets, no TCP, no secret.
        assert not any(k.startswith("DYN_KVBM_LEADER_ZMQ") for e in envs.values() for k in e)
        assert len({envs[p]["DYN_KVBM_METRICS_PORT"] for p in (18100, 18101)}) == 2
        args = (tmp_path / "fake" / "18100.args").read_text().splitlines()
        assert json.loads(args[args.index("--kv-transfer-config") + 1]) == prefill_transfer_config()
        args = (tmp_path / "fake" / "18200.args").read_text().splitlines()
        assert json.loads(args[args.index("--kv-transfer-config") + 1]) == decode_transfer_config()
        assert "--disable-hybrid-kv-cache-manager" in args  # NIXL pairs only workers with equal HMA settings

        os.killpg(pids["decode1"], signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode != 0
        _wait_for(lambda: not any(_alive(pid) for pid in pids.values()))
        assert "decode1" in proc.stdout.read()
    finally:
        _stop(proc)


def test_worker_death_tolerated_when_asked_and_sigterm_stops_all(tmp_path):
    proc, log_dir = _launch(tmp_path, "disagg_kvbm.sh", STOP_ON_WORKER_EXIT="0", PREFILL_GPUS="4", DECODE_GPUS="5")
    try:
        _wait_for(lambda: len(_pids(log_dir)) == 3)
        pids = _pids(log_dir)
        os.killpg(pids["decode0"], signal.SIGKILL)
        time.sleep(1.5)
        assert proc.poll() is None and _alive(pids["prefill0"]) and _alive(pids["router"])
        os.kill(proc.pid, signal.SIGTERM)  # the script itself, as `kill <pid>` or systemd would
        proc.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in pids.values()))
        env = dict(line.split("=", 1) for line in (tmp_path / "fake" / "18100.env").read_text().split())
        assert env["CUDA_VISIBLE_DEVICES"] == "4"
    finally:
        _stop(proc)


def test_agg_worker_serves_on_http_port_and_survives_a_double_sigterm(tmp_path):
    proc, log_dir = _launch(tmp_path, "agg_kvbm.sh", HTTP_PORT="18300", AGG_GPU="2")
    try:
        _wait_for(lambda: (tmp_path / "fake" / "18300.env").exists() and len(_pids(log_dir)) == 1)
        pids = _pids(log_dir)
        args = (tmp_path / "fake" / "18300.args").read_text().splitlines()
        assert json.loads(args[args.index("--kv-transfer-config") + 1]) == agg_transfer_config()
        env = dict(line.split("=", 1) for line in (tmp_path / "fake" / "18300.env").read_text().split())
        assert env["CUDA_VISIBLE_DEVICES"] == "2" and env["DYN_KVBM_CPU_CACHE_GB"] == "20"
        os.kill(proc.pid, signal.SIGTERM)
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)  # an impatient second Ctrl-C must not orphan the worker
        proc.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in pids.values()))
        assert "all processes stopped" in proc.stdout.read()
    finally:
        _stop(proc)


FAKE_DYNAMO_PYTHON = """#!/usr/bin/env bash
# a stand-in for an interpreter with NVIDIA Dynamo: answers the importability probe, prints kvbm's
# configs with the real interpreter, and runs `-m dynamo.frontend` / `-m dynamo.vllm` as sleeping servers
if [ "$1" = -c ]; then exit 0; fi
if [ "$1" = -m ] && [ "$2" = kvbm.disagg.config ]; then shift 2; exec "$REAL_PYTHON" -m kvbm.disagg.config "$@"; fi
printf '%s\\n' "$@" > "$FAKE_DIR/$$.args"
env | grep -E '^(CUDA_VISIBLE_DEVICES|VLLM_NIXL_SIDE_CHANNEL_PORT|DYN_[A-Z_]+)=' > "$FAKE_DIR/$$.env"
sleep 1000 &
wait
"""


def _dynamo_runs(tmp_path: Path, count: int) -> dict[str, list[list[str]]]:
    fake = tmp_path / "fake"
    _wait_for(lambda: len(list(fake.glob("*.args"))) == count and len(list(fake.glob("*.env"))) == count)
    runs: dict[str, list[list[str]]] = {}
    for path in sorted(fake.glob("*.args")):
        args = path.read_text().splitlines()
        runs.setdefault(args[1], []).append(args)
    return runs


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


@pytest.mark.parametrize("script,workers", [("agg_kvbm.sh", 2), ("disagg_kvbm.sh", 2), ("disagg_kvbm_2p2d.sh", 4)])
def test_dynamo_fleet_topology(tmp_path, script, workers):
    """With Dynamo installed: the frontend with --router-mode kv, kvbm workers (PdConnector on prefill workers),
    each with its own KV event socket, all on file discovery; stopping the script stops them all."""
    python = tmp_path / "python"
    python.write_text(FAKE_DYNAMO_PYTHON)
    python.chmod(0o755)
    proc, log_dir = _launch(tmp_path, script, PYTHON=str(python), REAL_PYTHON=sys.executable, AGG_GPUS="0 1",
                            CPU_ONLY="1")
    try:
        runs = _dynamo_runs(tmp_path, workers + 1)
        (frontend,) = runs["dynamo.frontend"]
        assert _arg(frontend, "--router-mode") == "kv" and _arg(frontend, "--discovery-backend") == "file"
        vllm = runs["dynamo.vllm"]
        assert len(vllm) == workers
        endpoints = {json.loads(_arg(a, "--kv-events-config"))["endpoint"] for a in vllm}
        assert len(endpoints) == workers and all(e.startswith("ipc://") for e in endpoints)
        configs = {}
        for args in vllm:
            mode = _arg(args, "--disaggregation-mode") if "--disaggregation-mode" in args else "agg"
            configs.setdefault(mode, []).append(json.loads(_arg(args, "--kv-transfer-config")))
        if script == "agg_kvbm.sh":
            assert configs == {"agg": [agg_transfer_config()] * 2}
        else:
            assert configs == {"prefill": [pd_transfer_config("cpu")] * (workers // 2),
                               "decode": [decode_transfer_config("cpu")] * (workers // 2)}
        pids = _pids(log_dir)
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        _wait_for(lambda: not any(_alive(pid) for pid in pids.values()))
    finally:
        _stop(proc)
