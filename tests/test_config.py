"""load_config: sources, precedence, sizing and error messages (explicit environ only)."""

from __future__ import annotations

import os

import pytest

from kvbm.config import ENV_VARS, ConfigError, KvbmConfig, default_disk_cache_dir, load_config

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
    assert cfg.disk_cache_dir == default_disk_cache_dir()
    assert cfg.disk_fault_injection == ()


def test_default_disk_dir_is_private_per_user(monkeypatch, tmp_path):
    """Issue 13 item 5: not the shared /tmp, but the user's cache directory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load({CPU_GB: "1"}).disk_cache_dir == str(tmp_path / "xdg" / "kvbm")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert load({CPU_GB: "1"}).disk_cache_dir == str(tmp_path / "home" / ".cache" / "kvbm")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/not/allowed")  # the XDG spec ignores relative paths
    assert load({CPU_GB: "1"}).disk_cache_dir == str(tmp_path / "home" / ".cache" / "kvbm")
    monkeypatch.setenv("HOME", "/")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert load({CPU_GB: "1"}).disk_cache_dir == f"/var/tmp/kvbm-{os.geteuid()}"


def test_disk_fault_injection_setting():
    cfg = load({CPU_GB: "1", "DYN_KVBM_DISK_FAULT_INJECTION": "read_error=0.1, write_corrupt=0.05,seed=7"})
    assert cfg.disk_fault_injection == (("read_error", 0.1), ("write_corrupt", 0.05), ("seed", 7.0))
    slow = load({CPU_GB: "1", "DYN_KVBM_DISK_FAULT_INJECTION": "read_delay_ms=40"})
    assert slow.disk_fault_injection == (("read_delay_ms", 40.0),)
    for bad in ["read_eror=0.1", "read_error", "read_error=2", "read_error=x", "read_delay_ms=-1",
                "seed=nan", "seed=inf", "seed=1.5", "seed=-1", "read_error=nan", "read_delay_ms=inf"]:
        with pytest.raises(ConfigError, match="DYN_KVBM_DISK_FAULT_INJECTION"):
            load({CPU_GB: "1", "DYN_KVBM_DISK_FAULT_INJECTION": bad})
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
        "DYN_KVBM_DISK_FAULT_INJECTION": "read_error=0.5",
        "DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS": "120",
        "DYN_KVBM_DISK_OFFLOAD_FILTER_MAX_ENTRIES": "5000",
        "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "60",
        "DYN_KVBM_LEADER_ZMQ_HOST": "10.0.0.1",
        PUB: "7000",
        ACK: "7001",
        "DYN_KVBM_LEADER_ZMQ_SECRET": "s" * 32,
        "DYN_KVBM_LEADER_ZMQ_SECRET_FILE": "/etc/kvbm/zmq-secret",
        "DYN_KVBM_METRICS": "off",
        "DYN_KVBM_METRICS_PORT": "9100",
        "DYN_KVBM_METRICS_HOST": "127.0.0.1",
        "DYN_KVBM_METRICS_HIT_RATE_WINDOW": "50",
        "DYN_KVBM_LOG_SUMMARY_SECS": "0",
        "DYN_KVBM_LOG_LEVEL": "debug",
        "DYN_KVBM_ALLOW_UNTESTED_VLLM": "1",
        "DYN_KVBM_LOAD_MODE": "Sync",
        "DYN_KVBM_LAYERWISE_LOADS": "Off",
        "DYN_KVBM_ONBOARD_POLICY": "always",
        "DYN_KVBM_REMOTE_URL": "rediss://kvbm:pw@redis.example:6380/2",
        "DYN_KVBM_REMOTE_NAMESPACE": "prod-kv",
        "DYN_KVBM_REMOTE_TTL_SECS": "86400",
        "DYN_KVBM_REMOTE_BUDGET_GB": "50",
        "DYN_KVBM_REMOTE_OPTIONAL": "1",
        "DYN_KVBM_REMOTE_TIMEOUT_SECS": "0.5",
        "DYN_KVBM_REMOTE_SECRET": "r" * 32,
        "DYN_KVBM_REMOTE_SECRET_FILE": "/etc/kvbm/g4-secret",
        "DYN_KVBM_DISABLE_REMOTE_OFFLOAD_FILTER": "true",
        "DYN_KVBM_TRACE_FILE": "/tmp/kvbm-trace.jsonl",
        "DYN_KVBM_KV_EVENTS": "false",
    }
    cfg = load(env)
    assert cfg.kv_events is False
    assert cfg.has_remote_tier and cfg.remote_url.nodes == (("redis.example", 6380),)
    assert cfg.remote_url.tls and cfg.remote_url.db == 2 and not cfg.remote_url.cluster
    assert (cfg.remote_url.username, cfg.remote_url.password) == ("kvbm", "pw")
    assert cfg.remote_namespace == "prod-kv" and cfg.remote_ttl_secs == 86400 and cfg.remote_budget_gb == 50
    assert cfg.remote_optional is True and cfg.remote_timeout_secs == 0.5 and cfg.disable_remote_offload_filter
    assert cfg.remote_secret == "r" * 32 and cfg.remote_secret_file == "/etc/kvbm/g4-secret"
    assert "r" * 32 not in repr(cfg)
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
    assert cfg.allow_untested_vllm is True and cfg.load_mode == "sync" and cfg.onboard_policy == "always"
    assert cfg.layerwise_loads == "off"
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
        assert "DYN_KVBM_REMOTE_URL" in msg


def test_g4_alone_is_a_valid_tier_setup():
    config = load_config(environ={"DYN_KVBM_REMOTE_URL": "redis://127.0.0.1:6379"})
    assert config.has_remote_tier and not config.has_host_tier and not config.has_disk_tier
    assert config.blocks_outlive_process  # shared by servers: the identity fingerprints the weights


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


@pytest.mark.parametrize("typo, meant", [("DYN_KVBM_CPU_CACH_GB", CPU_GB), ("DYN_KVBM_CPU_CACHE_GIB", CPU_GB),
                                         ("DYN_KVBM_CPU_CACHE_GBS", CPU_GB), ("DYN_KVBM_METRIC", "DYN_KVBM_METRICS")])
def test_unknown_env_variable(typo, meant):
    """One suggestion, the closest known name, not a line of all 36."""
    msg = _error({CPU_GB: "1", typo: "4"})
    assert f"{typo} (did you mean {meant}?)" in msg
    assert "Known:" not in msg


def test_unknown_env_variable_far_from_any_lists_the_known_ones():
    msg = _error({CPU_GB: "1", "DYN_KVBM_XYZZY": "4"})
    assert "DYN_KVBM_XYZZY" in msg and "did you mean" not in msg and f"Known: {CPU_GB}" in msg


def test_misspelt_extra_config_key_is_an_error_with_the_closest_key():
    """An unprefixed key a letter away from a kvbm key was silently dropped (the setting not in effect);
    keys of other connectors sharing the extra config are still left alone."""
    msg = _error({}, {"cpu_cache_gbs": 2})
    assert "kv_connector_extra_config['cpu_cache_gbs'] (did you mean 'cpu_cache_gb'?)" in msg
    msg = _error({CPU_GB: "1"}, {"DYN_KVBM_DISK_CACHE_GBS": 2})
    assert "did you mean 'disk_cache_gb'?" in msg
    assert load({CPU_GB: "1"}, {"backends": ["UCX"], "lmcache.chunk_size": 256}).cpu_cache_gb == 1.0


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


def test_load_mode_is_validated():
    assert load({CPU_GB: "1"}).load_mode == "auto"
    with pytest.raises(ConfigError, match="DYN_KVBM_LOAD_MODE.*auto, sync, async"):
        load({CPU_GB: "1", "DYN_KVBM_LOAD_MODE": "fast"})
    assert load({CPU_GB: "1"}).onboard_policy == "cost"
    with pytest.raises(ConfigError, match="DYN_KVBM_ONBOARD_POLICY.*cost, always, never"):
        load({CPU_GB: "1", "DYN_KVBM_ONBOARD_POLICY": "maybe"})


def test_layerwise_loads_is_validated():
    assert load({CPU_GB: "1"}).layerwise_loads == "off"
    for raw, mode in (("on", "on"), ("1", "on"), ("true", "on"), ("no", "off"), ("OFF", "off"), ("Auto", "auto")):
        assert load({CPU_GB: "1", "DYN_KVBM_LAYERWISE_LOADS": raw}).layerwise_loads == mode
    assert load({CPU_GB: "1"}, {"layerwise_loads": False}).layerwise_loads == "off"
    with pytest.raises(ConfigError, match="DYN_KVBM_LAYERWISE_LOADS.*auto.*on or off"):
        load({CPU_GB: "1", "DYN_KVBM_LAYERWISE_LOADS": "sometimes"})


# ---- hostile and mistyped values ---------------------------------------------------


@pytest.mark.parametrize("name", ["DYN_KVBM_Disk_Cache_GB", "dyn_kvbm_disk_cache_gb", "DYN_KVBM_cpu_cache_gb"])
def test_variable_names_differing_in_case_are_refused(name):
    msg = _error({CPU_GB: "1", name: "4"})
    assert name in msg and "case-sensitive" in msg
    assert name.upper() in msg  # the right spelling


@pytest.mark.parametrize("var, value", [
    (CPU_GB, "1e300"), (DISK_GB, "1e7"),
    ("DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS", "1e10"),
    ("DYN_KVBM_DISK_OFFLOAD_FILTER_DECAY_SECS", "1e300"),
    ("DYN_KVBM_LOG_SUMMARY_SECS", "1e10"),
    (CPU_N, "9" * 30), ("DYN_KVBM_DISK_OFFLOAD_FILTER_MAX_ENTRIES", str(1 << 50)),
    ("DYN_KVBM_METRICS_HIT_RATE_WINDOW", "9" * 40),
])
def test_huge_values_are_clear_errors(var, value):
    env = {CPU_GB: "1", var: value}
    assert var in _error(env)  # a ConfigError naming the variable, not an OverflowError later


def test_largest_accepted_values_still_size_and_wait():
    """The bounds keep every later computation finite: sizing in blocks and thread waits."""
    import threading

    config = load({CPU_GB: "1000000", "DYN_KVBM_LEADER_WORKER_INIT_TIMEOUT_SECS": "1e7"})
    assert config.host_blocks(1) == 10**15
    threading.Event().wait(min(config.leader_worker_init_timeout_secs, 0.001))  # no OverflowError


def test_secret_settings():
    config = load({CPU_GB: "1", "DYN_KVBM_LEADER_ZMQ_SECRET": "  " + "s" * 20 + "  "})
    assert config.leader_zmq_secret == "s" * 20
    assert "s" * 20 not in repr(config)
    assert "DYN_KVBM_LEADER_ZMQ_SECRET" in _error({CPU_GB: "1", "DYN_KVBM_LEADER_ZMQ_SECRET": "short"})


REMOTE = "DYN_KVBM_REMOTE_URL"


def test_remote_url_forms():
    cfg = load({CPU_GB: "1"})
    assert not cfg.has_remote_tier and cfg.remote_namespace == "kvbm" and cfg.remote_ttl_secs is None
    target = load({CPU_GB: "1", REMOTE: "redis://127.0.0.1"}).remote_url
    assert target.nodes == (("127.0.0.1", 6379),) and not target.cluster and not target.tls
    target = load({CPU_GB: "1", REMOTE: "redis://:p%40ss@h1:7000,redis://:p%40ss@h2:7001"}).remote_url
    assert target.cluster and target.nodes == (("h1", 7000), ("h2", 7001)) and target.password == "p@ss"
    target = load({CPU_GB: "1", REMOTE: "redis://h1:7000?cluster=1"}).remote_url
    assert target.cluster and target.nodes == (("h1", 7000),)
    target = load({CPU_GB: "1", REMOTE: "rediss://h:7000?ssl_ca_certs=/etc/ca.pem"}).remote_url
    assert target.tls and target.ca_certs == "/etc/ca.pem" and str(target) == "rediss://h:7000?ssl_ca_certs=/etc/ca.pem"
    target = load({CPU_GB: "1", REMOTE: "redis://[::1]:7000"}).remote_url
    assert target.nodes == (("::1", 7000),) and str(target) == "redis://[::1]:7000"
    # str() (log lines, messages) hides the password; so does repr of the config
    target = load({CPU_GB: "1", REMOTE: "redis://user:secret@h:1/3"}).remote_url
    assert str(target) == "redis://user:***@h:1/3" and "secret" not in repr(target)
    assert "hunter2" not in repr(load({CPU_GB: "1", REMOTE: "redis://:hunter2@h"}))


@pytest.mark.parametrize("url, needle", [
    ("http://h:6379", "not redis:// or rediss://"),
    ("h:6379", "lacks the redis://"),
    ("redis://:6379", "no host"),
    ("redis://h:notaport", "Port"),
    ("redis://h:70000", "out of range"),
    ("redis://h:0", "port 0"),
    ("redis://h/abc", "database number"),
    ("redis://h?timeout=1", "unknown URL option"),
    ("redis://h?ssl_ca_certs=/etc/ca.pem", "with rediss://"),
    ("redis://h?cluster=maybe", "not a boolean"),
    ("redis://h1/1,redis://h2/1", "only database 0"),
    ("redis://:a@h1,redis://:b@h2", "share the scheme and credentials"),
    ("redis://h1,rediss://h2", "share the scheme"),
])
def test_remote_url_errors(url, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load({CPU_GB: "1", REMOTE: url})
    assert REMOTE in str(err.value)


def test_remote_url_error_hides_the_password():
    with pytest.raises(ConfigError) as err:
        load({CPU_GB: "1", REMOTE: "redis://:topsecret@h:notaport"})
    assert "topsecret" not in str(err.value) and "***" in str(err.value)


def test_remote_password_not_in_extra_config():
    with pytest.raises(ConfigError, match=f"startup log.*{REMOTE}"):
        load({CPU_GB: "1"}, extra={"remote_url": "redis://:pw@h"})
    assert load({CPU_GB: "1"}, extra={"remote_url": "redis://h"}).remote_url.nodes == (("h", 6379),)


@pytest.mark.parametrize("var, value, needle", [
    ("DYN_KVBM_REMOTE_NAMESPACE", "a:b", "no ':' or braces"),
    ("DYN_KVBM_REMOTE_NAMESPACE", "{tag}", "no ':' or braces"),
    ("DYN_KVBM_REMOTE_NAMESPACE", "x" * 65, "1-64"),
    ("DYN_KVBM_REMOTE_TTL_SECS", "0", "1 to"),
    ("DYN_KVBM_REMOTE_TTL_SECS", "1.5", "whole number"),
    ("DYN_KVBM_REMOTE_BUDGET_GB", "-1", ">= 0"),
    ("DYN_KVBM_REMOTE_OPTIONAL", "perhaps", "not a boolean"),
    ("DYN_KVBM_REMOTE_TIMEOUT_SECS", "0", "time out at once"),
])
def test_remote_setting_errors(var, value, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        load({CPU_GB: "1", REMOTE: "redis://h", var: value})
    assert var in str(err.value)
