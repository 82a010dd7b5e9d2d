"""``kvbm bench run`` and ``kvbm bench compare`` against real vLLM servers (the "test" model).

``bench run``: the CSV and the summary agree with what the server did (its
tokenizer's prompt lengths, the requested answer length). ``bench compare``:
two configurations end to end, with the table, CSVs, plots and the metrics
showing kvbm supplying prompt tokens that vLLM alone recomputes.
"""

from __future__ import annotations

import json
import logging

import pytest

from kvbm.tools.bench.server import VllmServer
from kvbm.tools.bench.workload import (
    WorkloadResult,
    WorkloadSpec,
    arrivals,
    opening,
    planned_requests,
    question,
    render_prompt,
)

pytestmark = pytest.mark.slow

ENGINE = ["--block-size", "128", "--max-model-len", "2048", "--enforce-eager", "--seed", "0"]
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
WORKLOAD = ["--num-users", "2", "--num-rounds", "3", "--max-users", "3", "--time", "0", "--qps", "4",
            "--system-prompt", "100", "--chat-history", "300", "--answer-len", "8", "--warmup-users", "2",
            "--no-progress"]


@pytest.fixture
def restore_kvbm_logger():
    """kvbm.tools.cli.main() attaches a stderr handler to the "kvbm" logger; pytest's capture closes that stream."""
    kvbm_logger = logging.getLogger("kvbm")
    saved = (list(kvbm_logger.handlers), kvbm_logger.level, kvbm_logger.propagate)
    yield
    kvbm_logger.handlers[:], kvbm_logger.level, kvbm_logger.propagate = saved


def test_bench_run_csv_and_summary_against_vllm(model_path, tmp_path, capsys, restore_kvbm_logger):
    from transformers import AutoTokenizer

    from kvbm.tools.cli import main

    out = tmp_path / "run.csv"
    with VllmServer(model_path, ENGINE, env=ENV, log_path=tmp_path / "server.log") as server:
        rc = main(["bench", "run", server.url, model_path, *WORKLOAD, "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    spec = WorkloadSpec(num_users=2, num_rounds=3, max_users=3, duration=None, qps=4, system_prompt_words=100,
                        chat_history_words=300, answer_tokens=8, warmup_users=2)
    result = WorkloadResult.read_csv(out)
    recs = result.records
    assert len(recs) == planned_requests(spec)
    assert all(r.generation_tokens == 8 for r in recs)  # ignore_eos: exactly --answer-len tokens
    assert all(0 < r.ttft and 0 < r.generation_time and r.launch_time < r.finish_time for r in recs)
    assert all(r.finish_time - r.launch_time == pytest.approx(r.ttft + r.generation_time, abs=0.05) for r in recs)

    # Prompt tokens are the server's count of exactly the prompt we rendered.
    tok = AutoTokenizer.from_pretrained(model_path)
    for arrival in arrivals(spec):
        first = next(r for r in recs if r.user_id == arrival.user_id and r.question_id == arrival.first_question)
        text = render_prompt([{"role": "user", "content": opening(spec, arrival.user_id)
                               + question(arrival.first_question)}])
        assert first.prompt_tokens == len(tok(text).input_ids)
        later = [r.prompt_tokens for r in recs if r.user_id == arrival.user_id]
        assert all(b >= a + 8 for a, b in zip(later, later[1:]))  # the answer and a question were added

    # The printed summary is the CSV's.
    s = result.summary()
    assert f"{s['requests']:.0f} (0 failed)" in printed
    assert f"TTFT mean:           {s['ttft_mean']:.4f}s" in printed or "TTFT mean" in printed
    assert "input tokens/s" in printed and "output tokens/s" in printed and str(out) in printed


def test_bench_compare_two_configurations(model_path, tmp_path, capsys, restore_kvbm_logger):
    from kvbm.tools.cli import main

    out = tmp_path / "compare"
    workload = ["--num-users", "3", "--num-rounds", "3", "--max-users", "4", "--time", "0", "--qps", "4",
                "--system-prompt", "100", "--chat-history", "900", "--answer-len", "8", "--warmup-users", "4",
                "--no-progress"]
    rc = main(["bench", "compare", model_path, "--configs", "vllm,kvbm-host", "--cpu-cache-gb", "0.05",
               "--gpu-blocks", "20", "--vllm-args=--block-size 128 --max-model-len 2048 --enforce-eager --seed 0",
               "--env", "VLLM_CPU_KVCACHE_SPACE=1", "--out", str(out), *workload])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    lines = printed.splitlines()
    header = lines.index(next(line for line in lines if line.split() == ["vllm", "kvbm-host"]))
    assert lines[header + 2].split()[0] == "requests"  # the table: a column per configuration
    ttft_row = next(line for line in printed.splitlines() if line.startswith("TTFT mean"))
    assert "x)" in ttft_row  # the ratio to the baseline
    assert "working set:" in printed

    rows = {name: WorkloadResult.read_csv(out / f"{name}.csv").records for name in ("vllm", "kvbm-host")}
    assert len(rows["vllm"]) == len(rows["kvbm-host"]) > 0
    # Same prompts on both sides, so the same prompt lengths.
    assert sorted(r.prompt_tokens for r in rows["vllm"]) == sorted(r.prompt_tokens for r in rows["kvbm-host"])

    for name in ("ttft_cdf.png", "ttft_over_time.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(out / name) in printed

    summary = json.loads((out / "summary.json").read_text())
    configs = {c["name"]: c for c in summary["configurations"]}
    assert configs["vllm"]["pool_tokens"] == 20 * 128
    # The users' histories overflow vLLM's 20 blocks: alone it recomputes them, with kvbm they come from G2.
    assert configs["vllm"]["token_sources"]["external"] == 0
    assert configs["kvbm-host"]["token_sources"]["external"] > 0.2
    assert configs["kvbm-host"]["token_sources"]["computed"] < configs["vllm"]["token_sources"]["computed"]
