"""kvbm.disagg.nixl: vLLM's NixlConnector unchanged, NIXL's progress thread paced on request.

Each case runs in a fresh interpreter: the pacing replaces a class in NIXL's
bindings for the whole process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("nixl._api", reason="nixl is not installed: run scripts/setup_nixl.sh")

PROBE = """
import nixl._api as api
import kvbm.disagg.nixl as kn
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector
config = api.nixlBind.nixlAgentConfig()
config.pthrDelay = 0  # what NIXL's Python API always sets
agent = api.nixl_agent("kvbm-test", api.nixl_agent_config(num_threads=1))
print(config.pthrDelay, kn.NixlConnector is NixlConnector, agent.name)
"""


def probe(delay: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KVBM_NIXL_PROGRESS_DELAY_US"}
    if delay is not None:
        env["KVBM_NIXL_PROGRESS_DELAY_US"] = delay
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)


def test_delay_paces_every_new_agent():
    result = probe("750")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].split() == ["750", "True", "kvbm-test"]


def test_unset_changes_nothing():
    result = probe(None)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1].split() == ["0", "True", "kvbm-test"]


def test_bad_value_names_the_variable():
    result = probe("soon")
    assert result.returncode != 0
    assert "KVBM_NIXL_PROGRESS_DELAY_US='soon'" in result.stderr
