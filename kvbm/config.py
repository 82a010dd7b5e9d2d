"""kvbm's settings: one validated object, built once at startup.

Sources, later wins: ``DYN_KVBM_*`` environment variables, then the same keys
in vLLM's ``kv_connector_extra_config`` (either the exact variable name or its
short lowercase form, e.g. ``cpu_cache_gb``). Every error names the setting
and says how to fix it, because a typo here otherwise surfaces as a
mysterious OOM or an empty cache hours later.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

PREFIX = "DYN_KVBM_"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A setting is invalid; the message names it and the fix."""


@dataclass(frozen=True)
class KvbmConfig:
    cpu_cache_gb: float | None = None
    cpu_cache_override_num_blocks: int | None = None
    disk_cache_gb: float | None = None
    disk_cache_override_num_blocks: int | None = None
    disk_cache_dir: str = "/tmp"
    disable_disk_offload_filter: bool = False
    disk_zerofill_fallback: bool = False
    disk_disable_o_direct: bool = False
    #: Keep G3 across restarts: files named by model identity, an index journal.
    disk_persist: bool = False
    disk_offload_filter_decay_secs: float = 600.0
    disk_offload_filter_max_entries: int = 1_000_000
    leader_worker_init_timeout_secs: float = 1800.0
    leader_zmq_host: str = "127.0.0.1"
    leader_zmq_pub_port: int = 56001
    leader_zmq_ack_port: int = 56002
    metrics: bool = False
    metrics_port: int = 6880
    #: Where /metrics listens. All interfaces by default, as the reference did:
    #: Prometheus usually scrapes from another host or a container.
    metrics_host: str = "0.0.0.0"
    #: kvbm_*_cache_hit_rate cover the last this-many requests' lookups.
    metrics_hit_rate_window: int = 1000
    #: Seconds between one-line cache summaries in the log; 0 turns them off.
    log_summary_secs: float = 30.0
    log_level: str = "INFO"
    #: Append one line per finished request (timestamps, lengths, block hashes;
    #: no text) to this file, for ``kvbm plan``. None: no trace.
    trace_file: str | None = None
    #: Where each value came from, for log lines and error messages.
    sources: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def has_host_tier(self) -> bool:
        return bool(self.cpu_cache_gb) or bool(self.cpu_cache_override_num_blocks)

    @property
    def has_disk_tier(self) -> bool:
        return bool(self.disk_cache_gb) or bool(self.disk_cache_override_num_blocks)

    def host_blocks(self, bytes_per_block_all_ranks: int) -> int:
        """G2 capacity in blocks. Block counts win over GB; GB is the total
        across tensor-parallel ranks (so divide by the bytes of all ranks)."""
        return _blocks(
            self.cpu_cache_override_num_blocks, self.cpu_cache_gb, bytes_per_block_all_ranks,
            "DYN_KVBM_CPU_CACHE_GB",
        )

    def disk_blocks(self, bytes_per_block_all_ranks: int) -> int:
        return _blocks(
            self.disk_cache_override_num_blocks, self.disk_cache_gb, bytes_per_block_all_ranks,
            "DYN_KVBM_DISK_CACHE_GB",
        )


def _blocks(override: int | None, gb: float | None, bytes_per_block: int, var: str) -> int:
    if override:
        return override
    if not gb:
        return 0
    n = int(gb * 1e9) // bytes_per_block
    if n < 1:
        raise ConfigError(
            f"{var}={gb} holds no block: one KV block takes {bytes_per_block} bytes "
            f"({bytes_per_block / 1e9:.6f} GB). Raise {var} or set the block count directly."
        )
    return n


# name -> (parser, field)
def _parse_float(name: str, raw: Any) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {name}=4")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {name}=4") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={raw!r} must be a number >= 0 (GB = 1e9 bytes), e.g. {name}=4")
    return value


def _parse_count(name: str, raw: Any) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of blocks; e.g. {name}=1024") from None
    if value <= 0:
        raise ConfigError(
            f"{name}={raw!r} must be a positive block count; unset it to size by GB instead"
        )
    return value


def _parse_port(name: str, raw: Any) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a port number (1-65535)") from None
    if not 0 < value < 65536:
        raise ConfigError(f"{name}={raw!r} is not a port number (1-65535)")
    return value


def _parse_bool(name: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{name}={raw!r} is not a boolean; use true/false or 1/0")


def _parse_str(name: str, raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        raise ConfigError(f"{name} is empty; unset it to use the default")
    return text


def _parse_log_level(name: str, raw: Any) -> str:
    level = str(raw).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{name}={raw!r} is not a log level; use DEBUG, INFO, WARNING or ERROR")
    return level


def _parse_host(name: str, raw: Any) -> str:
    host = _parse_str(name, raw)
    if "://" in host or "/" in host or any(c.isspace() for c in host):
        raise ConfigError(
            f"{name}={raw!r} is not a bind address; give an IP or host name only, "
            f"e.g. {name}=127.0.0.1 (this host only) or {name}=0.0.0.0 (all interfaces)"
        )
    return host


def _parse_requests(name: str, raw: Any) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of requests; e.g. {name}=1000") from None
    if value <= 0:
        raise ConfigError(f"{name}={raw!r} must be a positive number of requests, e.g. {name}=1000")
    return value


def _parse_interval(name: str, raw: Any) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds; e.g. {name}=30 (0 turns it off)") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={raw!r} must be seconds >= 0, e.g. {name}=30 (0 turns it off)")
    return value


def _parse_trace_file(name: str, raw: Any) -> str:
    path = os.path.abspath(os.path.expanduser(_parse_str(name, raw)))
    if os.path.isdir(path):
        raise ConfigError(f"{name}={raw!r} is a directory; give a file path, e.g. {name}={path}/kvbm-trace.jsonl")
    if not os.path.isdir(os.path.dirname(path)):
        raise ConfigError(
            f"{name}={raw!r}: directory {os.path.dirname(path)} does not exist; create it or point {name} "
            "at a file in an existing directory"
        )
    return path


def _parse_positive_float(name: str, raw: Any) -> float:
    value = _parse_float(name, raw)
    if value == 0:
        raise ConfigError(f"{name}=0 would time out at once; give seconds > 0, e.g. {name}=1800")
    return value


_FIELDS: dict[str, Any] = {
    "cpu_cache_gb": _parse_float,
    "cpu_cache_override_num_blocks": _parse_count,
    "disk_cache_gb": _parse_float,
    "disk_cache_override_num_blocks": _parse_count,
    "disk_cache_dir": _parse_str,
    "disable_disk_offload_filter": _parse_bool,
    "disk_zerofill_fallback": _parse_bool,
    "disk_disable_o_direct": _parse_bool,
    "disk_persist": _parse_bool,
    "disk_offload_filter_decay_secs": _parse_positive_float,
    "disk_offload_filter_max_entries": _parse_count,
    "leader_worker_init_timeout_secs": _parse_positive_float,
    "leader_zmq_host": _parse_str,
    "leader_zmq_pub_port": _parse_port,
    "leader_zmq_ack_port": _parse_port,
    "metrics": _parse_bool,
    "metrics_port": _parse_port,
    "metrics_host": _parse_host,
    "metrics_hit_rate_window": _parse_requests,
    "log_summary_secs": _parse_interval,
    "log_level": _parse_log_level,
    "trace_file": _parse_trace_file,
}

ENV_VARS: tuple[str, ...] = tuple(PREFIX + key.upper() for key in _FIELDS)


def env_var(key: str) -> str:
    """The variable of a setting (``cpu_cache_gb`` -> ``DYN_KVBM_CPU_CACHE_GB``), for
    messages and recommendations elsewhere: the names are spelled only here."""
    if key not in _FIELDS:
        raise KeyError(f"no kvbm setting {key!r}")
    return PREFIX + key.upper()


def load_config(
    extra_config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> KvbmConfig:
    """Build and validate the config; raises :class:`ConfigError` on any bad value."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, parse in _FIELDS.items():
        var = PREFIX + key.upper()
        raw = environ.get(var)
        if raw is not None and raw.strip() != "":
            values[key] = parse(var, raw)
            sources[key] = f"env {var}"
    unknown = [k for k in environ if k.startswith(PREFIX) and k[len(PREFIX):].lower() not in _FIELDS]
    for key, raw in (extra_config or {}).items():
        short = key[len(PREFIX):].lower() if key.upper().startswith(PREFIX) else key.lower()
        if short not in _FIELDS:
            if key.upper().startswith(PREFIX):
                unknown.append(f"kv_connector_extra_config[{key!r}]")
            continue  # other connectors' keys (e.g. under MultiConnector) are not ours
        name = f"kv_connector_extra_config[{key!r}]"
        values[short] = _FIELDS[short](name, raw)
        sources[short] = name
    if unknown:
        raise ConfigError(
            f"unknown kvbm setting(s): {', '.join(sorted(unknown))}. "
            f"Known: {', '.join(ENV_VARS)}"
        )
    config = KvbmConfig(**values, sources=sources)
    if not config.has_host_tier and not config.has_disk_tier:
        raise ConfigError(
            "no kvbm cache tier is set: set DYN_KVBM_CPU_CACHE_GB (e.g. 4) or "
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS for the pinned host tier, and/or "
            "DYN_KVBM_DISK_CACHE_GB / DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS for the disk tier"
        )
    if config.leader_zmq_pub_port == config.leader_zmq_ack_port:
        raise ConfigError(
            "DYN_KVBM_LEADER_ZMQ_PUB_PORT and DYN_KVBM_LEADER_ZMQ_ACK_PORT are both "
            f"{config.leader_zmq_pub_port}; give them different ports"
        )
    if config.metrics and config.metrics_port in (config.leader_zmq_pub_port, config.leader_zmq_ack_port):
        raise ConfigError(
            f"DYN_KVBM_METRICS_PORT={config.metrics_port} is also a kvbm ZMQ port "
            "(DYN_KVBM_LEADER_ZMQ_PUB_PORT / DYN_KVBM_LEADER_ZMQ_ACK_PORT); give the metrics another port"
        )
    return config
