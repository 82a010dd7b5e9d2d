"""A bad kvbm setting reaches the user as one line, before vLLM starts where kvbm is the entry point
(`kvbm serve`, `kvbm bench compare`, `kvbm demo`), and as one line from inside vLLM's engine otherwise."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvbm.config import ConfigError
from kvbm.preflight import STARTUP_ERROR_FILE_VAR, check_vllm_args, kvbm_extra_configs

ROOT = Path(__file__).resolve().parents[1]
KVBM = {"kv_connector": "DynamoConnector", "kv_role": "kv_both",
        "kv_connector_module_path": "kvbm.vllm_integration.connector"}


def kvbm_cli(args: list[str], env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    return subprocess.run([sys.executable, "-m", "kvbm", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600, env={**clean, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env})


def test_serve_refuses_a_bad_setting_before_vllm_starts(tmp_path):
    """The issue's case: it printed the message after ~26 s inside 266 lines of tracebacks."""
    run = kvbm_cli(["serve", str(tmp_path / "no-model"), "--kv-transfer-config", json.dumps(KVBM)],
                   {"DYN_KVBM_CPU_CACHE_GB": "abc"}, tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr == ("kvbm serve: error: DYN_KVBM_CPU_CACHE_GB='abc' is not a number; set it to e.g. "
                          "DYN_KVBM_CPU_CACHE_GB=4\n")
    assert run.stdout == ""  # vLLM never started (no banner, no engine)


def test_serve_checks_the_extra_config_with_the_environment(tmp_path):
    transfer = {**KVBM, "kv_connector_extra_config": {"cpu_cache_gbs": 2}}
    run = kvbm_cli(["serve", str(tmp_path / "no-model"), f"--kv-transfer-config={json.dumps(transfer)}"], {},
                   tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "kv_connector_extra_config['cpu_cache_gbs'] (did you mean 'cpu_cache_gb'?)" in run.stderr
    assert len(run.stderr.splitlines()) == 1


def test_bench_compare_and_demo_refuse_before_any_server(tmp_path):
    env = {"DYN_KVBM_DISK_FAULT_INJECTION": "seed=nan", "DYN_KVBM_CPU_CACHE_GB": "1"}
    out = tmp_path / "out"
    run = kvbm_cli(["bench", "compare", str(tmp_path / "no-model"), "--out", str(out), "--no-progress"], env, tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith("kvbm bench compare: error: configuration 'kvbm-host': "
                                 "DYN_KVBM_DISK_FAULT_INJECTION='seed=nan': seed=nan is not a finite number")
    assert not out.exists()  # no server log: nothing was started
    run = kvbm_cli(["demo", "--model", str(tmp_path / "no-model"), "--out", str(out), "--no-progress"],
                   {"DYN_KVBM_CPU_CACHE_GB": "-3"}, tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.startswith("kvbm demo: error: configuration 'kvbm-host': DYN_KVBM_CPU_CACHE_GB='-3'")
    assert len(run.stderr.splitlines()) == 1 and not out.exists()


def test_which_connectors_are_checked():
    assert kvbm_extra_configs(KVBM) == [{}]
    assert kvbm_extra_configs({"kv_connector": "DynamoConnector", "kv_connector_extra_config": {"a": 1}}) == [{"a": 1}]
    multi = {"kv_connector": "MultiConnector", "kv_connector_extra_config": {"connectors": [
        {"kv_connector": "NixlConnector"}, {**KVBM, "kv_connector_extra_config": {"cpu_cache_gb": "x"}}]}}
    assert kvbm_extra_configs(multi) == [{"cpu_cache_gb": "x"}]
    with pytest.raises(ConfigError, match=r"kv_connector_extra_config\['cpu_cache_gb'\]='x'"):
        check_vllm_args(["m", "--kv-transfer-config", json.dumps(multi)], {})
    # Not kvbm (or no connector): vLLM alone, nothing of kvbm's to check, whatever the environment.
    assert check_vllm_args(["m", "--kv-transfer-config", '{"kv_connector": "NixlConnector"}'],
                           {"DYN_KVBM_CPU_CACHE_GB": "abc"}) == []
    assert check_vllm_args(["m"], {"DYN_KVBM_CPU_CACHE_GB": "abc"}) == []
    assert check_vllm_args(["m", "--kv-transfer-config", json.dumps(KVBM)],
                           {"DYN_KVBM_CPU_CACHE_GB": "2"})[0].cpu_cache_gb == 2.0


def test_engine_side_error_is_one_line(tmp_path, monkeypatch):
    """Inside vLLM's engine: logged once at ERROR, raised as an exception whose str is the message, left
    for `kvbm serve` in its file; a process that dies of it prints that one line, no traceback."""
    from kvbm.preflight import KvbmStartupError, startup_error

    message = "DYN_KVBM_CPU_CACHE_GB='abc' is not a number; set it to e.g. DYN_KVBM_CPU_CACHE_GB=4"
    handoff = tmp_path / "serve.err"
    monkeypatch.setenv(STARTUP_ERROR_FILE_VAR, str(handoff))
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("kvbm")  # its own handler: other tests may stop kvbm's propagation
    log.addHandler(handler)
    try:
        error = startup_error(ConfigError(message))
    finally:
        log.removeHandler(handler)
    assert str(error) == message and isinstance(error, ConfigError) and isinstance(error, Exception)
    assert [r.getMessage() for r in records] == [f"kvbm: cannot start: {message}"]
    assert handoff.read_text() == message + "\n"
    assert isinstance(error, KvbmStartupError)
    # As vLLM's engine process dies of it (multiprocessing), and as a script does.
    code = ("import multiprocessing as mp\n"
            "from kvbm.preflight import KvbmStartupError\n"
            "def engine():\n"
            f"    raise KvbmStartupError({message!r})\n"
            "if __name__ == '__main__':\n"
            "    p = mp.get_context('fork').Process(target=engine); p.start(); p.join()\n"
            "    assert p.exitcode == 1, p.exitcode\n"
            "    engine()\n")
    script = tmp_path / "engine.py"
    script.write_text(code)
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 1
    assert run.stderr == f"{message}\n{message}\n"  # the engine process, then the script: no traceback


@pytest.mark.slow
def test_serve_prints_an_engine_side_refusal_last_without_tracebacks(tmp_path, model_path):
    """A setting only the engine can judge (a disk directory other users can write): the reason is
    the last line `kvbm serve` prints, and no traceback is printed (there were three, 234 lines)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    run = kvbm_cli(["serve", model_path, "--block-size", "128", "--max-model-len", "1024", "--enforce-eager",
                    "--host", "127.0.0.1", "--port", "0", "--kv-transfer-config", json.dumps(KVBM)],
                   {"DYN_KVBM_DISK_CACHE_GB": "1", "DYN_KVBM_DISK_CACHE_DIR": str(shared),
                    "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "1"}, tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    lines = [line for line in run.stderr.splitlines() if line.strip() and "resource_tracker" not in line]
    last = lines[-1]
    assert last.startswith("kvbm serve: error: ") and "DYN_KVBM_DISK_CACHE_DIR" in last and str(shared) in last
    assert "Traceback" not in run.stdout + run.stderr
