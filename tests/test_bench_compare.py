"""``kvbm bench compare``'s own logic without servers: configurations, metrics deltas, table, plots."""

from __future__ import annotations

import pytest

from kvbm.tools.bench.compare import (
    Configuration,
    Outcome,
    _delta,
    _flatten,
    _root_cause,
    _without_pool_override,
    builtin_configurations,
    format_table,
    write_plots,
)
from kvbm.tools.bench.workload import RequestRecord, WorkloadResult


def test_parse_user_configuration():
    c = Configuration.parse("offload=--kv-offloading-size 8 --kv-offloading-backend native")
    assert c.name == "offload" and c.kvbm is None and c.env == {}
    assert c.extra_args == ["--kv-offloading-size", "8", "--kv-offloading-backend", "native"]
    c = Configuration.parse("g2-16=DYN_KVBM_CPU_CACHE_GB=16 --max-num-seqs 8")
    assert c.kvbm == {} and c.env == {"DYN_KVBM_CPU_CACHE_GB": "16"} and c.extra_args == ["--max-num-seqs", "8"]
    c = Configuration.parse("plain-threads=OMP_NUM_THREADS=1")
    assert c.kvbm is None and c.env == {"OMP_NUM_THREADS": "1"}
    c = Configuration.parse("json=--kv-transfer-config '{\"a\": 1}'")
    assert c.extra_args == ["--kv-transfer-config", '{"a": 1}']
    for bad in ("no-equals", "=--x", "bad name=--x"):
        with pytest.raises(ValueError):
            Configuration.parse(bad)


def test_builtin_configurations():
    vllm, host, disk = builtin_configurations(["vllm", "kvbm-host", "kvbm-host+disk"], 4.0)
    assert vllm.kvbm is None
    assert host.kvbm == {"cpu_cache_gb": 4.0}
    assert disk.kvbm == {"cpu_cache_gb": 4.0, "disk_cache_gb": 8.0}  # same G2, G3 twice as big
    (disk,) = builtin_configurations(["kvbm-host+disk"], 2.0, 10.0, "/data/g3")
    assert disk.kvbm == {"cpu_cache_gb": 2.0, "disk_cache_gb": 10.0, "disk_cache_dir": "/data/g3"}
    with pytest.raises(ValueError, match="kvbm-host"):
        builtin_configurations(["kvbm"], 1.0)


PAGE_BEFORE = """# HELP vllm:prompt_tokens_by_source_total x
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"} 1000.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"} 0.0
vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="external_kv_transfer"} 0.0
vllm:prompt_tokens_by_source_created{engine="0",model_name="m",source="local_compute"} 1.7e9
kvbm_onboard_blocks_h2d 5.0
kvbm_host_cache_hit_rate 0.5
"""
PAGE_AFTER = PAGE_BEFORE.replace("} 1000.0", "} 1200.0").replace(
    'source="local_cache_hit"} 0.0', 'source="local_cache_hit"} 300.0').replace(
    'source="external_kv_transfer"} 0.0', 'source="external_kv_transfer"} 500.0').replace(
    "kvbm_onboard_blocks_h2d 5.0", "kvbm_onboard_blocks_h2d 9.0").replace("rate 0.5", "rate 0.75")


def test_metrics_deltas_cover_the_run_only():
    delta = _delta(_flatten(PAGE_BEFORE), _flatten(PAGE_AFTER))
    assert delta["vllm:prompt_tokens_by_source_total{source=local_compute}"] == 200
    assert delta["kvbm_onboard_blocks_h2d"] == 4  # kvbm's untyped reference counters are counters too
    assert delta["kvbm_host_cache_hit_rate"] == 0.75  # gauges keep their final value
    assert not any(k.endswith("_created") for k in delta)
    sources = Outcome(Configuration("x"), vllm=delta).token_sources()
    assert sources == pytest.approx({"computed": 0.2, "g1": 0.3, "external": 0.5})


def test_token_sources_fall_back_to_hit_counters():
    m = {"vllm:prompt_tokens_total": 1000.0, "vllm:prefix_cache_hits_total": 100.0,
         "vllm:external_prefix_cache_hits_total": 600.0}
    assert Outcome(Configuration("x"), vllm=m).token_sources() == pytest.approx(
        {"computed": 0.3, "g1": 0.1, "external": 0.6})
    assert Outcome(Configuration("x")).token_sources() is None


def result(ttfts: list[float], users: int = 3) -> WorkloadResult:
    recs = [RequestRecord(2000 + i, 16, t, 0.2, i % users, i // users + 1, 100.0 + i, 100.5 + i + t)
            for i, t in enumerate(ttfts)]
    return WorkloadResult(recs, start_time=100.0, end_time=100.0 + len(ttfts) + 1)


def outcomes() -> list[Outcome]:
    base = Outcome(Configuration("vllm"), result([1.0, 1.2, 0.8, 1.0]), pool_tokens=5120, startup_s=20,
                   vllm={"vllm:prompt_tokens_total": 8000.0})
    kvbm = Outcome(Configuration("kvbm-host", kvbm={"cpu_cache_gb": 1}), result([0.2, 0.3, 0.25, 0.25]),
                   pool_tokens=5120, startup_s=25,
                   vllm={"vllm:prompt_tokens_total": 8000.0, "vllm:external_prefix_cache_hits_total": 6000.0},
                   kvbm={"kvbm_onboard_blocks_h2d": 47.0, "kvbm_onboard_blocks_d2d": 0.0,
                         "kvbm_offload_blocks_d2h": 60.0, "kvbm_lookup_blocks_total": 50.0,
                         "kvbm_host_hit_blocks_total": 47.0, "kvbm_disk_hit_blocks_total": 0.0})
    failed = Outcome(Configuration("offload", extra_args=["--kv-offloading-size", "8"]),
                     error="RuntimeError: vLLM server exited with 1\n  server said: ValueError: CPU offloading")
    return [base, kvbm, failed]


def test_table_side_by_side_with_ratios_and_failures():
    table = format_table(outcomes())
    lines = table.splitlines()
    assert lines[0].split() == ["vllm", "kvbm-host", "offload"]
    row = {line[:26].strip(): line[26:].split() for line in lines[2:] if line[:1] not in ("-", " ") or
           line.startswith("  from")}
    assert row["requests"] == ["4", "4", "failed"]
    assert row["TTFT mean"] == ["1.000s", "0.250s", "(0.25x)", "-"]
    assert row["prompt tokens computed"] == ["100.0%", "25.0%", "-"]
    assert row["from kvbm / connector"] == ["0.0%", "75.0%", "-"]
    assert row["kvbm onboard host/disk"] == ["-", "47", "/", "0", "-"]
    assert row["kvbm hit rate host/disk"] == ["-", "94%", "/", "0%", "-"]
    assert "offload: RuntimeError" in table and "server said: ValueError: CPU offloading" in table
    assert "working set: 3 conversations" in table and "vLLM's own KV pool: 5,120 tokens" in table
    assert "everything fits" not in table


def test_floor_keeps_the_whole_pool_and_later_turns_compare_with_it():
    (floor,) = builtin_configurations(["floor"], 4.0)
    assert floor.full_pool and floor.kvbm is None
    assert _without_pool_override(["--max-model-len", "8", "--num-gpu-blocks-override", "40", "-x"]) == [
        "--max-model-len", "8", "-x"]
    assert _without_pool_override(["--num-gpu-blocks-override=40", "-x"]) == ["-x"]
    # 3 users: requests 0-2 are first turns, 3-5 later turns (their TTFTs are what a cache changes)
    base = Outcome(Configuration("vllm"), result([1.0, 1.0, 1.0, 0.8, 0.8, 0.8]))
    kvbm = Outcome(Configuration("kvbm-host", kvbm={}), result([1.0, 1.0, 1.0, 0.11, 0.11, 0.11]))
    flo = Outcome(floor, result([1.0, 1.0, 1.0, 0.1, 0.1, 0.1]))
    lines = format_table([base, kvbm, flo]).splitlines()
    row = {line[:26].strip(): line[26:].split() for line in lines[2:]}
    assert row["later-turn TTFT mean"] == ["0.800s", "0.110s", "(0.14x)", "0.100s", "(0.12x)"]
    assert row["vs floor (mean / p90)"] == ["8.00x", "/", "8.00x", "1.10x", "/", "1.10x", "-"]


def test_table_warns_when_everything_fits_vllms_pool():
    o = outcomes()[:1]
    o[0].pool_tokens = 1_000_000
    assert "offloading cannot help here" in format_table(o)


def test_plots_are_pngs(tmp_path):
    paths = write_plots(outcomes(), tmp_path, "demo")
    assert [p.name for p in paths] == ["ttft_cdf.png", "ttft_over_time.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_root_cause_is_the_servers_last_specific_error():
    log = """(EngineCore pid=1) ERROR 11-29 [core.py:1] Traceback (most recent call last):
(EngineCore pid=1) ERROR 11-29 [core.py:1] ValueError: CPU Offloading is currently only supported on CUDA
RuntimeError: Engine core initialization failed. See root cause above.
"""
    assert _root_cause(log) == "ValueError: CPU Offloading is currently only supported on CUDA"
    assert _root_cause("all good") is None
    # kvbm's own refusal, which `kvbm serve` prints last, is the reason.
    log += "kvbm serve: error: DYN_KVBM_DISK_CACHE_DIR=/tmp/x is writable by other users; fix it\n"
    assert _root_cause(log) == "DYN_KVBM_DISK_CACHE_DIR=/tmp/x is writable by other users; fix it"
