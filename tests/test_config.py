"""load_config: sources, precedence, sizing and error messages (explicit environ only)."""

from __future__ import annotations

import pytest

from kvbm.config import ENV_VARS, ConfigError, KvbmConfig, load_config

CPU_GB = "DYN_KVBM_CPU_CACHE_GB"
CPU_N = "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"
DISK_GB = "DYN_KVBM_DISK_CACHE_GB"
DISK_N = "DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS"
PUB = "DYN_KVBM_LEADER_ZMQ_PUB_PORT"
ACK = "DYN_KVBM_LEADER_ZMQ_ACK_PORT"


def load(env=None, extra=None) -> KvbmConfig:
    return load_config(extra_config=extra, environ=env or {})


def test_does_not_read_process_environment_when_environ_given(monkeypatch):
    monkeypatch.setenv(CPU_GB, "not-a-number")
    monkeypatch.setenv("DYN_KVBM_TYPO", "1")
    cfg = load({CPU_GB: "2"})
    assert cfg.cpu_cache_gb == 2.0


def test_valid_gb():
    cfg = load({CPU_GB: "4"})
    assert cfg.cpu_cache_gb == 4.0
    assert cfg.cpu_cache_override_num_blocks is None
    assert cfg.has_host_tier and not cfg.has_disk_tier
    assert cfg.sources["cpu_cache_gb"] == f"env {CPU_GB}"
    assert load({CPU_GB: " 0.5 "}).cpu_cache_gb == 0.5


def test_valid_block_count():
    cfg = load({CPU_N: "1024"})
    assert cfg.cpu_cache_override_num_blocks == 1024
    assert cfg.cpu_cache_gb is None
    assert cfg.has_host_tier
    assert cfg.host_blocks(123456) == 1024


def test_defaults():
    cfg = load({CPU_GB: "1"})
    assert cfg.leader_zmq_pub_port == 56001
    assert cfg.leader_zmq_ack_port == 56002
    assert cfg.metrics is False
    assert cfg.disk_cache_dir == "/tmp"
    assert cfg.leader_worker_init_timeout_secs == 1800.0


def test_all_settings_parse():
    env = {
        CPU_GB: "8",
        CPU_N: "512",
        DISK_GB: "100",
        DISK_N: "4096",
        "DYN_KVBM_DISK_CACHE_DIR": "/var/cache/kvbm",
        "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER": "true",
        "DYN_KVBM_DISK_ZEROFILL_FALLBACK": "1",
        "DYN_KVBM_DISK_DISABLE_O_DIRECT": "Yes",
        "DYN_KVBM_DISK_PERSIST": "1",
        "DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS": "120",
        "DYN_KVBM_DISK_OFFLOAD_FILTER_MAX_ENTRIES": "5000",
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "60",
        "DYN_KVBM_LEADER_ZMQ_HOST": "10.0.0.1",
        PUB: "7000",
        ACK: "7001",
        "DYN_KVBM_METRICS": "off",
        "DYN_KVBM_METRICS_PORT": "9100",
        "DYN_KVBM_METRICS_HOST": "127.0.0.1",
        "DYN_KVBM_METRICS_HIT_RATE_WINDOW": "50",
        "DYN_KVBM_LOG_SUMMARY_SECS": "0",
        "DYN_KVBM_LOG_LEVEL": "debug",
        "DYN_KVBM_TRACE_FILE": "/tmp/kvbm-trace.jsonl",
    }
    cfg = load(env)
    assert cfg.disk_cache_gb == 100.0 and cfg.has_disk_tier
    assert cfg.cpu_cache_override_num_blocks == 512 and cfg.disk_cache_override_num_blocks == 4096
    assert cfg.disk_cache_dir == "/var/cache/kvbm"
    assert cfg.disable_disk_offload_filter and cfg.disk_zerofill_fallback and cfg.disk_disable_o_direct
    assert cfg.leader_worker_init_timeout_secs == 60.0
    assert cfg.leader_zmq_host == "10.0.0.1"
    assert (cfg.leader_zmq_pub_port, cfg.leader_zmq_ack_port) == (7000, 7001)
    assert cfg.metrics is False and cfg.metrics_port == 9100
    assert cfg.metrics_host == "127.0.0.1" and cfg.metrics_hit_rate_window == 50
    assert cfg.log_summary_secs == 0.0
    assert cfg.trace_file == "/tmp/kvbm-trace.jsonl"
    assert sorted(ENV_VARS) == sorted(env)  # every documented variable is covered here


def test_empty_env_value_is_unset():
    cfg = load({CPU_GB: "2", CPU_N: "", "DYN_KVBM_METRICS": "  "})
    assert cfg.cpu_cache_override_num_blocks is None
    assert cfg.metrics is False


# ---- sizing ----------------------------------------------------------------------


def test_gb_to_blocks_is_total_across_ranks():
    cfg = load({CPU_GB: "4"})
    # GB = 1e9 bytes, not GiB.
    assert cfg.host_blocks(1_000_000) == 4000
    # Two TP ranks of 1 MB each: the same 4 GB hold half as many blocks.
    assert cfg.host_blocks(2 * 1_000_000) == 2000
    # Floors, never over-allocates.
    assert cfg.host_blocks(3_000_000) == 1333
    assert load({CPU_GB: "0.5"}).host_blocks(1_000_000) == 500


def test_block_override_wins_over_gb():
    cfg = load({CPU_GB: "4", CPU_N: "77"})
    assert cfg.host_blocks(1_000_000) == 77


def test_disk_blocks():
    cfg = load({CPU_GB: "1", DISK_GB: "3"})
    assert cfg.disk_blocks(1_000_000) == 3000
    assert load({CPU_GB: "1", DISK_N: "5"}).disk_blocks(1) == 5
    assert load({CPU_GB: "1"}).disk_blocks(1_000_000) == 0


def test_gb_too_small_for_one_block():
    cfg = load({CPU_GB: "0.000001"})  # 1000 bytes
    with pytest.raises(ConfigError) as err:
        cfg.host_blocks(4096)
    assert CPU_GB in str(err.value)
    assert load({CPU_GB: "0.000004096"}).host_blocks(4096) == 1


def test_disk_gb_too_small_for_one_block():
    cfg = load({CPU_GB: "1", DISK_GB: "0.000001"})
    with pytest.raises(ConfigError) as err:
        cfg.disk_blocks(4096)
    assert DISK_GB in str(err.value)


# ---- extra_config ----------------------------------------------------------------


@pytest.mark.parametrize("key", [CPU_GB, "cpu_cache_gb", "CPU_CACHE_GB", CPU_GB.lower()])
def test_extra_config_wins_over_env(key):
    cfg = load({CPU_GB: "4"}, {key: 16})
    assert cfg.cpu_cache_gb == 16.0
    assert cfg.sources["cpu_cache_gb"] == f"kv_connector_extra_config[{key!r}]"


def test_extra_config_alone_is_enough():
    cfg = load({}, {"cpu_cache_override_num_blocks": 256, "metrics": True, "metrics_port": "9000"})
    assert cfg.cpu_cache_override_num_blocks == 256
    assert cfg.metrics is True
    assert cfg.metrics_port == 9000


def test_extra_config_ignores_other_connectors_keys():
    extra = {
        "cpu_cache_gb": 2,
        "kv_role": "kv_both",
        "nixl_backend": "UCX",
        "lmcache.chunk_size": 256,
        "DYN_OTHER_THING": "x",  # DYN_ but not DYN_KVBM_
    }
    cfg = load({"DYN_OTHER_SETTING": "1", "PATH": "/bin"}, extra)
    assert cfg.cpu_cache_gb == 2.0


def test_extra_config_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        load({}, {"cpu_cache_gb": "lots"})
    assert "kv_connector_extra_config['cpu_cache_gb']" in str(err.value)


def test_extra_config_unknown_dyn_kvbm_key_is_an_error():
    with pytest.raises(ConfigError) as err:
        load({CPU_GB: "1"}, {"DYN_KVBM_CPU_CACHE_GIGS": 3})
    assert "DYN_KVBM_CPU_CACHE_GIGS" in str(err.value)


# ---- errors ----------------------------------------------------------------------


def _error(env, extra=None) -> str:
    with pytest.raises(ConfigError) as err:
        load(env, extra)
    return str(err.value)


@pytest.mark.parametrize("value", ["-1", "-0.5"])
def test_negative_gb(value):
    msg = _error({CPU_GB: value})
    assert CPU_GB in msg
    assert value in msg


@pytest.mark.parametrize("var", [CPU_GB, DISK_GB, "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"])
def test_non_numeric(var):
    env = {CPU_GB: "1", var: "four"}
    msg = _error(env)
    assert var in msg
    assert "'four'" in msg


@pytest.mark.parametrize("value", ["nan", "NaN"])
def test_nan_gb(value):
    assert CPU_GB in _error({CPU_GB: value})


def test_infinite_gb_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        load({CPU_GB: "inf"}).host_blocks(1_000_000)
    assert CPU_GB in str(err.value)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "many"])
@pytest.mark.parametrize("var", [CPU_N, DISK_N])
def test_bad_block_count(var, value):
    env = {CPU_GB: "1", var: value}
    assert var in _error(env)


def test_zero_blocks_message():
    msg = _error({CPU_N: "0"})
    assert CPU_N in msg
    assert "positive" in msg


@pytest.mark.parametrize(
    "var", ["DYN_KVBM_METRICS", "DYN_KVBM_DISK_ZEROFILL_FALLBACK", "DYN_KVBM_DISABLE_DISK_OFFLOAD_FILTER"]
)
def test_non_bool(var):
    msg = _error({CPU_GB: "1", var: "maybe"})
    assert var in msg
    assert "boolean" in msg


@pytest.mark.parametrize("value", ["0", "65536", "-1", "http", "80.5"])
@pytest.mark.parametrize("var", [PUB, ACK, "DYN_KVBM_METRICS_PORT"])
def test_bad_port(var, value):
    assert var in _error({CPU_GB: "1", var: value})


def test_zero_timeout():
    var = "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS"
    assert var in _error({CPU_GB: "1", var: "0"})


def test_no_tier_set():
    for env in ({}, {CPU_GB: "0"}, {"DYN_KVBM_METRICS": "1"}):
        msg = _error(env)
        assert CPU_GB in msg
        assert CPU_N in msg


@pytest.mark.parametrize("env", [{DISK_GB: "10"}, {DISK_N: "100"}])
def test_disk_only_is_a_valid_tier_setup(env):
    config = load_config(environ=env)
    assert config.has_disk_tier and not config.has_host_tier


def test_disk_persist_and_filter_settings():
    config = load_config(environ={
        CPU_GB: "1", DISK_GB: "2", "DYN_KVBM_DISK_PERSIST": "true",
        "DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS": "30",
        "DYN_KVBM_DISK_OFFLOAD_FILTER_MAX_ENTRIES": "1000",
    })
    assert config.disk_persist
    assert config.disk_offload_filter_decay_secs == 30
    assert config.disk_offload_filter_max_entries == 1000
    assert "DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS" in _error(
        {CPU_GB: "1", "DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS": "0"})


def test_equal_zmq_ports():
    msg = _error({CPU_GB: "1", PUB: "6000", ACK: "6000"})
    assert PUB in msg and ACK in msg
    assert "6000" in msg
    # Also when one of them is left at its default.
    msg = _error({CPU_GB: "1", PUB: "56002"})
    assert PUB in msg and ACK in msg


@pytest.mark.parametrize("typo", ["DYN_KVBM_CPU_CACH_GB", "DYN_KVBM_CPU_CACHE_GIB", "DYN_KVBM_METRIC"])
def test_unknown_env_variable(typo):
    msg = _error({CPU_GB: "1", typo: "4"})
    assert typo in msg
    assert CPU_GB in msg  # the list of known settings points to the right spelling


def test_unknown_env_variable_even_without_a_tier():
    # The typo is the real problem: report it, not "no tier".
    msg = _error({"DYN_KVBM_CPU_CACH_GB": "4"})
    assert "DYN_KVBM_CPU_CACH_GB" in msg
    assert "unknown" in msg


def test_empty_string_setting():
    var = "DYN_KVBM_LEADER_ZMQ_HOST"
    assert var in _error({CPU_GB: "1"}, {var: "  "})


def test_config_error_is_value_error():
    assert issubclass(ConfigError, ValueError)


# ---- metrics and log summary -------------------------------------------------------

METRICS_HOST = "DYN_KVBM_METRICS_HOST"
WINDOW = "DYN_KVBM_METRICS_HIT_RATE_WINDOW"
SUMMARY = "DYN_KVBM_LOG_SUMMARY_SECS"


def test_metrics_defaults():
    cfg = load({CPU_GB: "1"})
    assert cfg.metrics_port == 6880
    assert cfg.metrics_host == "0.0.0.0"  # reachable by a Prometheus on another host or in a container
    assert cfg.metrics_hit_rate_window == 1000
    assert cfg.log_summary_secs == 30.0


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "::", "localhost", "10.1.2.3"])
def test_metrics_host_accepts_addresses(host):
    assert load({CPU_GB: "1", METRICS_HOST: host}).metrics_host == host


@pytest.mark.parametrize("host", ["http://127.0.0.1", "127.0.0.1/32", "a b"])
def test_metrics_host_rejects_urls(host):
    msg = _error({CPU_GB: "1", METRICS_HOST: host})
    assert METRICS_HOST in msg and "127.0.0.1" in msg


@pytest.mark.parametrize("value", ["0", "-5", "1.5", "lots"])
def test_bad_hit_rate_window(value):
    msg = _error({CPU_GB: "1", WINDOW: value})
    assert WINDOW in msg and "requests" in msg


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("2.5", 2.5), ("600", 600.0)])
def test_log_summary_interval(value, expected):
    assert load({CPU_GB: "1", SUMMARY: value}).log_summary_secs == expected


@pytest.mark.parametrize("value", ["-1", "inf", "soon"])
def test_bad_log_summary_interval(value):
    msg = _error({CPU_GB: "1", SUMMARY: value})
    assert SUMMARY in msg and "0 turns it off" in msg


def test_metrics_port_must_differ_from_zmq_ports():
    msg = _error({CPU_GB: "1", "DYN_KVBM_METRICS": "1", "DYN_KVBM_METRICS_PORT": "56001"})
    assert "DYN_KVBM_METRICS_PORT" in msg and PUB in msg
    # Metrics off: the port is unused, so no clash.
    assert load({CPU_GB: "1", "DYN_KVBM_METRICS_PORT": "56001"}).metrics_port == 56001
