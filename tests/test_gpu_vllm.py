"""kvbm inside real vLLM on a GPU: greedy tokens equal to the large-pool oracle (bench/gpu/correctness.py).

Skipped without a CUDA GPU and a CUDA build of vLLM; on the lent H200 it runs
through ``bench/gpu/run.sh OUT correctness`` (docs/gpu-vllm.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
ROOT = Path(__file__).resolve().parent.parent


def test_kvbm_matches_the_large_pool_oracle_on_every_tier(tmp_path):
    pytest.importorskip("vllm")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu" / "correctness.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = {row["config"]: row for row in summary["rows"]}
    assert proc.returncode == 0 and summary["ok"], proc.stdout[-4000:]
    assert rows["kvbm-host-eager"]["differ"] == 0 and rows["kvbm-host-graphs"]["differ"] == 0
    assert rows["kvbm-host-eager"]["negative_control"] == "bites"
