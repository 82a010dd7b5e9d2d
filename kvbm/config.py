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
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlsplit

PREFIX = "DYN_KVBM_"
LOAD_MODES = ("auto", "sync", "async")
LAYERWISE_MODES = ("auto", "on", "off")
ONBOARD_POLICIES = ("cost", "always", "never")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
#: Upper bounds: beyond them a value is a typo (``1e300``), and letting it
#: through ends in a raw ``OverflowError`` deep inside the allocator or a
#: thread wait instead of a message naming the setting.
MAX_GB = 1e6  # 1 PB
MAX_COUNT = 1 << 40
MAX_SECONDS = 1e7  # ~115 days; threading waits overflow near 9e9
#: A handshake secret shorter than this could be guessed offline from one captured message.
MIN_SECRET_CHARS = 16
MAX_SECRET_BYTES = 4096


class ConfigError(ValueError):
    """A setting is invalid; the message names it and the fix."""


REMOTE_SCHEMES = ("redis", "rediss")
REMOTE_DEFAULT_PORT = 6379
#: Namespace characters: no ``{}`` (a Redis Cluster hash tag would put every key
#: in one slot, so on one node) and no spaces or colons (the key separator).
_NAMESPACE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


@dataclass(frozen=True)
class RemoteTarget:
    """Where G4 lives: one Redis server, or the seed nodes of a Redis Cluster.

    Parsed from ``DYN_KVBM_REMOTE_URL``. ``str()`` hides the password, so the
    target can go into log lines and error messages.
    """

    nodes: tuple[tuple[str, int], ...]
    cluster: bool = False
    tls: bool = False
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    #: rediss:// only: a CA bundle to verify the server with, instead of the system's.
    ca_certs: str | None = None

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        cred = ""
        if self.username or self.password:
            cred = f"{quote(self.username or '', safe='')}{':***' if self.password else ''}@"
        parts = [f"{scheme}://{cred}{_host_port(h, p)}" for h, p in self.nodes]
        if not self.cluster and self.db:
            parts[0] += f"/{self.db}"
        options = [("cluster", "1")] if self.cluster and len(self.nodes) == 1 else []
        options += [("ssl_ca_certs", self.ca_certs)] if self.ca_certs else []
        if options:
            parts[0] += "?" + "&".join(f"{k}={v}" for k, v in options)
        return ",".join(parts)


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _redact_url(raw: str) -> str:
    """``raw`` with any password replaced, for messages about an invalid URL."""
    return re.sub(r"(://[^:@/,]*:)[^@/,]*@", r"\1***@", raw)


def parse_remote_url(name: str, raw: Any) -> RemoteTarget:
    """``redis://[user:password@]host[:port][/db]``, ``rediss://`` for TLS (``?ssl_ca_certs=FILE``
    to trust a private CA); a Redis Cluster is several comma-separated seed URLs or one URL
    with ``?cluster=1``."""
    text = str(raw).strip()
    shown = _redact_url(text)
    example = f"e.g. {name}=redis://:PASSWORD@redis-host:6379 or, for a cluster, " \
              f"{name}=redis://node1:6379,redis://node2:6379"
    nodes: list[tuple[str, int]] = []
    schemes, creds, dbs, cluster, ca_certs = set(), set(), set(), False, None
    for part in text.split(","):
        part = part.strip()
        if "://" not in part:
            raise ConfigError(f"{name}={shown!r}: {_redact_url(part)!r} lacks the redis:// (or rediss:// for TLS) "
                              f"in front; {example}")
        try:
            url = urlsplit(part)
            port = url.port
        except ValueError as e:
            raise ConfigError(f"{name}={shown!r}: {e} in {_redact_url(part)!r}; {example}") from None
        if url.scheme not in REMOTE_SCHEMES:
            raise ConfigError(f"{name}={shown!r}: scheme {url.scheme or '(none)'!r} is not redis:// or rediss:// "
                              f"(TLS); {example}")
        if not url.hostname:
            raise ConfigError(f"{name}={shown!r}: no host in {_redact_url(part)!r}; {example}")
        _check_host_name(name, shown, url.hostname, example)
        if port == 0:
            raise ConfigError(f"{name}={shown!r}: port 0 is not a port; {example}")
        path = url.path.strip("/")
        if path and not path.isdigit():
            raise ConfigError(f"{name}={shown!r}: {url.path!r} is not a database number (/0 .. /15); {example}")
        for key, value in parse_qsl(url.query, keep_blank_values=True):
            if key == "cluster":
                cluster = cluster or _parse_bool(f"{name} option cluster", value)
            elif key == "ssl_ca_certs" and url.scheme == "rediss" and value:
                ca_certs = value
            else:
                raise ConfigError(f"{name}={shown!r}: unknown URL option {key!r} (understood: ?cluster=1, and "
                                  "?ssl_ca_certs=/path/ca.pem with rediss://)")
        if url.fragment:
            raise ConfigError(f"{name}={shown!r}: unexpected '#' in the URL; {example}")
        schemes.add(url.scheme)
        dbs.add(int(path or 0))
        if url.username or url.password:
            creds.add((unquote(url.username or "") or None, unquote(url.password or "") or None))
        nodes.append((url.hostname, port or REMOTE_DEFAULT_PORT))
    if len(schemes) > 1 or len(creds) > 1:
        raise ConfigError(f"{name}={shown!r}: the seed nodes of one cluster must share the scheme and credentials")
    cluster = cluster or len(nodes) > 1
    db = dbs.pop() if len(dbs) == 1 else -1
    if cluster and db != 0:
        raise ConfigError(f"{name}={shown!r}: Redis Cluster has only database 0; drop the /N from the URLs")
    username, password = creds.pop() if creds else (None, None)
    return RemoteTarget(tuple(dict.fromkeys(nodes)), cluster=cluster, tls=schemes.pop() == "rediss", db=db,
                        username=username, password=password, ca_certs=ca_certs)


def _check_host_name(name: str, shown: str, host: str, example: str) -> None:
    """A host the resolver can take: otherwise the first connect fails with a raw ``UnicodeError``
    (a label over 63 characters, an empty label) from deep inside the socket library."""
    if ":" in host:  # an IPv6 literal, from [..] in the URL
        return
    try:
        encoded = host.encode("idna")
    except UnicodeError:
        encoded = b""
    if not encoded or len(encoded) > 253 or any(not 0 < len(label) <= 63 for label in encoded.rstrip(b".").split(b".")):
        raise ConfigError(f"{name}={shown!r}: {host!r} is not a valid host name (dot-separated labels of 1 to 63 "
                          f"characters, at most 253 in all); {example}")


def parse_remote_namespace(name: str, raw: Any) -> str:
    text = str(raw).strip()
    if not _NAMESPACE_RE.fullmatch(text):
        raise ConfigError(f"{name}={raw!r}: use 1-64 letters, digits, '_', '.' or '-' (no ':' or braces: they "
                          f"would break key parsing or pin every key to one cluster node), e.g. {name}=kvbm-prod")
    return text


def _parse_ttl(name: str, raw: Any) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a whole number of seconds; e.g. {name}=86400 (a day)") from None
    if not 0 < value <= MAX_SECONDS:
        raise ConfigError(f"{name}={raw!r} must be 1 to {MAX_SECONDS:g} seconds; unset it to keep keys "
                          f"until Redis evicts them, e.g. {name}=86400")
    return value


def default_disk_cache_dir() -> str:
    """``$XDG_CACHE_HOME/kvbm``, else ``~/.cache/kvbm``, else ``/var/tmp/kvbm-<uid>``.

    Private by construction: inside the user's home no other user can create
    the directory first (a fixed name in a shared ``/tmp`` or ``/var/tmp`` can
    be pre-created or linked by anyone, which kvbm would then have to refuse);
    it is where the XDG spec puts caches; and it survives a reboot, which
    ``DYN_KVBM_DISK_PERSIST`` needs. Production setups point
    ``DYN_KVBM_DISK_CACHE_DIR`` at a local NVMe drive instead.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    if os.path.isabs(xdg):
        return os.path.join(xdg, "kvbm")
    home = os.path.expanduser("~")
    if os.path.isabs(home) and home != "/":
        return os.path.join(home, ".cache", "kvbm")
    return f"/var/tmp/kvbm-{os.geteuid()}"


@dataclass(frozen=True)
class KvbmConfig:
    cpu_cache_gb: float | None = None
    cpu_cache_override_num_blocks: int | None = None
    disk_cache_gb: float | None = None
    disk_cache_override_num_blocks: int | None = None
    disk_cache_dir: str = field(default_factory=default_disk_cache_dir)
    disable_disk_offload_filter: bool = False
    disk_zerofill_fallback: bool = False
    disk_disable_o_direct: bool = False
    #: Keep G3 across restarts: files named by model identity, an index journal.
    disk_persist: bool = False
    #: Testing only: fail/corrupt this share of G3 block I/O, as (kind, rate) pairs plus ("seed", n).
    disk_fault_injection: tuple[tuple[str, float], ...] = ()
    disk_offload_filter_decay_secs: float = 600.0
    disk_offload_filter_max_entries: int = 1_000_000
    leader_worker_init_timeout_secs: float = 1800.0
    leader_zmq_host: str = "127.0.0.1"
    leader_zmq_pub_port: int = 56001
    leader_zmq_ack_port: int = 56002
    #: TCP handshake only: the shared secret that signs every message (see
    #: kvbm/runtime/wire.py), given directly or as a file; neither: a per-user
    #: secret generated on first use in the private socket directory.
    leader_zmq_secret: str | None = field(default=None, repr=False)
    leader_zmq_secret_file: str | None = None
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
    #: How loads run: "auto" loads from G2 inside the step that matched (the request
    #: is scheduled at once) and from slower tiers asynchronously (it waits; others run);
    #: "sync" / "async" force one way for every tier.
    load_mode: str = "auto"
    #: How an in-step load from the host tier lands: layer by layer ("on": layer i's blocks are
    #: copied while layer i-1 computes, each attention layer waits for its own layer only) or
    #: whole ("off": the forward pass waits for every block first). "auto": layer by layer on
    #: CUDA, whole on CPU (a CPU copy is synchronous: nothing to overlap). Either way it is used
    #: only where vLLM calls its per-layer hooks (see kvbm.runtime.layers). Off by default: on an
    #: H200 a 13K-token hit copied layer by layer runs at the PCIe limit (55.7 GB/s) and hides the
    #: forward behind the copy (load + forward 0.87x of a whole load's with 160 new tokens, 0.62x
    #: with 1,024: bench/layerwise.py), but inside vLLM, on the 8B-shaped perf workload, later turns
    #: were no faster than with whole loads (docs/gpu-vllm.md): not yet shown to pay where it counts.
    layerwise_loads: str = "off"
    #: Load or recompute a matched prefix: "cost" loads a tier's part only where that is
    #: faster than recomputing it (measured rates); "always" / "never" force one way.
    onboard_policy: str = "cost"
    #: Start on a vLLM newer than the supported range (kvbm.vllm_integration.compat) instead of refusing.
    allow_untested_vllm: bool = False
    #: G4, a KV tier shared by servers (Redis or Redis Cluster); None: no G4. Holds the password: not in repr.
    remote_url: RemoteTarget | None = field(default=None, repr=False)
    #: Key prefix: servers with the same namespace (and model identity) share blocks.
    remote_namespace: str = "kvbm"
    #: Seconds a G4 block lives after its last write; None: until Redis evicts it (allkeys-lru).
    remote_ttl_secs: int | None = None
    #: Best-effort bound on what this server writes to G4 (Redis's maxmemory is the hard one).
    remote_budget_gb: float | None = None
    #: Start without G4 when Redis is unreachable (it joins once Redis answers) instead of refusing.
    remote_optional: bool = False
    #: Bound on connecting and on each Redis round trip; past it, G4 counts as down for a while.
    remote_timeout_secs: float = 2.0
    #: G4 values carry a MAC (keyed BLAKE3) under this fleet secret (kvbm.storage.remote), given directly (environment
    #: only: vLLM logs kv_connector_extra_config) or as a file of mode 0600; neither: values are checked
    #: against corruption only, and anyone who can write to Redis can have KV served (warned at startup).
    remote_secret: str | None = field(default=None, repr=False)
    remote_secret_file: str | None = None
    #: Spill every block committed in the tier above into G4, not only repeated ones (the disk filter's policy).
    disable_remote_offload_filter: bool = False
    #: Publish BlockStored/BlockRemoved for G2/G3/G4 in vLLM's KV event stream (when vLLM publishes events:
    #: ``--kv-events-config``), so a KV-aware router credits the prefixes this worker holds in them.
    kv_events: bool = True
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

    @property
    def has_remote_tier(self) -> bool:
        return self.remote_url is not None

    @property
    def blocks_outlive_process(self) -> bool:
        """Blocks are reused by another process (a restarted server's G3, or any server's G4), so
        "the same model" must mean the same weights: the identity fingerprints them."""
        return self.disk_persist or self.has_remote_tier

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
def _parse_number(name: str, raw: Any, example: str) -> float:
    if isinstance(raw, bool):
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {name}={example}")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}={raw!r} is not a number; set it to e.g. {name}={example}") from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{name}={raw!r} must be a number >= 0, e.g. {name}={example}")
    return value


def _parse_gb(name: str, raw: Any) -> float:
    value = _parse_number(name, raw, "4")
    if value > MAX_GB:
        raise ConfigError(f"{name}={raw!r} is more than any machine has (at most {MAX_GB:g} GB = 1e9 bytes each); "
                          f"e.g. {name}=4")
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
    if value > MAX_COUNT:
        raise ConfigError(f"{name}={raw!r} is too large (at most {MAX_COUNT}); e.g. {name}=1024")
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


_FAULT_KINDS = ("read_error", "read_corrupt", "write_error", "write_corrupt")


def _parse_faults(name: str, raw: Any) -> tuple[tuple[str, float], ...]:
    example = f"{name}=read_error=0.02,write_corrupt=0.01,seed=1"
    pairs = []
    for item in str(raw).split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or key not in (*_FAULT_KINDS, "seed", "read_delay_ms"):
            raise ConfigError(
                f"{name}={raw!r}: {item.strip()!r} is not kind=rate; kinds are {', '.join(_FAULT_KINDS)} "
                f"(and seed, read_delay_ms), e.g. {example}. Testing only: unset it in production."
            )
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"{name}={raw!r}: {value!r} is not a number, e.g. {example}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name}={raw!r}: {key}={value.strip()} is not a finite number, e.g. {example}")
        if key == "seed" and not (number.is_integer() and 0 <= number < 2**63):
            raise ConfigError(f"{name}={raw!r}: seed must be a whole number from 0 to 2^63-1, e.g. {example}")
        if key == "read_delay_ms" and not 0.0 <= number <= 10_000:
            raise ConfigError(f"{name}={raw!r}: read_delay_ms must be 0-10000 milliseconds per block read")
        if key not in ("seed", "read_delay_ms") and not 0.0 <= number <= 1.0:
            raise ConfigError(f"{name}={raw!r}: {key} must be a rate between 0 and 1, e.g. {example}")
        pairs.append((key, number))
    return tuple(pairs)


def _parse_log_level(name: str, raw: Any) -> str:
    level = str(raw).strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"{name}={raw!r} is not a log level; use DEBUG, INFO, WARNING or ERROR")
    return level


def _parse_load_mode(name: str, raw: Any) -> str:
    mode = str(raw).strip().lower()
    if mode not in LOAD_MODES:
        raise ConfigError(f"{name}={raw!r} is not a load mode; use one of {', '.join(LOAD_MODES)}")
    return mode


def _parse_layerwise(name: str, raw: Any) -> str:
    mode = str(raw).strip().lower()
    mode = {**dict.fromkeys(_TRUE - {""}, "on"), **dict.fromkeys(_FALSE - {""}, "off")}.get(mode, mode)
    if mode not in LAYERWISE_MODES:
        raise ConfigError(f"{name}={raw!r} is not a layer-wise mode; use auto (layer by layer on CUDA), "
                          "on or off (the forward pass waits for whole loads)")
    return mode


def _parse_onboard_policy(name: str, raw: Any) -> str:
    policy = str(raw).strip().lower()
    if policy not in ONBOARD_POLICIES:
        raise ConfigError(f"{name}={raw!r} is not an onboard policy; use one of {', '.join(ONBOARD_POLICIES)}")
    return policy


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
    if not 0 < value <= MAX_COUNT:
        raise ConfigError(
            f"{name}={raw!r} must be a positive number of requests (at most {MAX_COUNT}), e.g. {name}=1000"
        )
    return value


def _parse_interval(name: str, raw: Any) -> float:
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a number of seconds; e.g. {name}=30 (0 turns it off)") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SECONDS:
        raise ConfigError(
            f"{name}={raw!r} must be seconds from 0 to {MAX_SECONDS:g}, e.g. {name}=30 (0 turns it off)"
        )
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


def _parse_seconds(name: str, raw: Any) -> float:
    """A duration that must pass (timeouts, decay periods): > 0 and bounded."""
    value = _parse_number(name, raw, "1800")
    if value == 0:
        raise ConfigError(f"{name}=0 would time out at once; give seconds > 0, e.g. {name}=1800")
    if value > MAX_SECONDS:
        raise ConfigError(f"{name}={raw!r} is too long (at most {MAX_SECONDS:g} seconds); e.g. {name}=1800")
    return value


def _parse_secret(name: str, raw: Any) -> str:
    secret = str(raw).strip()
    if len(secret) < MIN_SECRET_CHARS or len(secret.encode()) > MAX_SECRET_BYTES:
        raise ConfigError(
            f"{name} must be {MIN_SECRET_CHARS} to {MAX_SECRET_BYTES} characters (a short secret can be "
            f"guessed from one captured message); generate one with e.g. `openssl rand -hex 32`"
        )
    return secret


def read_secret_file(path: str, setting: str, what: str = "the handshake secret",
                     misuse: str = "pose as the leader") -> bytes:
    """A secret from a file only this user (or root) owns and nobody else can read.

    Shared by every ``*_SECRET_FILE`` setting so they follow one rule: a regular file (not a
    symbolic link, which could be swapped; not a FIFO, whose open would wait for a writer, hence
    ``O_NONBLOCK``), mode 0600 or stricter, 16 to 4096 characters. ``what`` names the
    secret and ``misuse`` what a reader of the file could do, for the error messages.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ConfigError(
            f"{setting}={path}: cannot open it ({exc.strerror}); give a regular file of mode 0600 holding "
            f"{what} (not a symbolic link)"
        ) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ConfigError(f"{setting}={path} is not a regular file (a FIFO, socket, device or directory); "
                              f"give a regular file of mode 0600 holding {what}")
        os.set_blocking(fd, True)
        if info.st_uid not in (os.getuid(), 0) or info.st_mode & 0o077:
            raise ConfigError(
                f"{setting}={path} is readable or writable by other users (mode {info.st_mode & 0o777:o}, "
                f"owner uid {info.st_uid}): anyone who reads it can {misuse}. Run `chmod 600 {path}` "
                "as its owner (Kubernetes secrets: defaultMode 0400)"
            )
        raw = os.read(fd, MAX_SECRET_BYTES + 1)
    finally:
        os.close(fd)
    secret = raw.strip()
    if not MIN_SECRET_CHARS <= len(secret) <= MAX_SECRET_BYTES:
        raise ConfigError(
            f"{setting}={path} must hold {MIN_SECRET_CHARS} to {MAX_SECRET_BYTES} bytes of secret; "
            "generate one with e.g. `openssl rand -hex 32 > FILE`"
        )
    return secret


_FIELDS: dict[str, Any] = {
    "cpu_cache_gb": _parse_gb,
    "cpu_cache_override_num_blocks": _parse_count,
    "disk_cache_gb": _parse_gb,
    "disk_cache_override_num_blocks": _parse_count,
    "disk_cache_dir": _parse_str,
    "disable_disk_offload_filter": _parse_bool,
    "disk_zerofill_fallback": _parse_bool,
    "disk_disable_o_direct": _parse_bool,
    "disk_persist": _parse_bool,
    "disk_fault_injection": _parse_faults,
    "disk_offload_filter_decay_secs": _parse_seconds,
    "disk_offload_filter_max_entries": _parse_count,
    "leader_worker_init_timeout_secs": _parse_seconds,
    "leader_zmq_host": _parse_str,
    "leader_zmq_pub_port": _parse_port,
    "leader_zmq_ack_port": _parse_port,
    "leader_zmq_secret": _parse_secret,
    "leader_zmq_secret_file": _parse_str,
    "metrics": _parse_bool,
    "metrics_port": _parse_port,
    "metrics_host": _parse_host,
    "metrics_hit_rate_window": _parse_requests,
    "log_summary_secs": _parse_interval,
    "log_level": _parse_log_level,
    "allow_untested_vllm": _parse_bool,
    "load_mode": _parse_load_mode,
    "layerwise_loads": _parse_layerwise,
    "onboard_policy": _parse_onboard_policy,
    "remote_url": parse_remote_url,
    "remote_namespace": parse_remote_namespace,
    "remote_ttl_secs": _parse_ttl,
    "remote_budget_gb": _parse_gb,
    "remote_optional": _parse_bool,
    "remote_timeout_secs": _parse_seconds,
    "remote_secret": _parse_secret,
    "remote_secret_file": _parse_str,
    "disable_remote_offload_filter": _parse_bool,
    "kv_events": _parse_bool,
    "trace_file": _parse_trace_file,
}

ENV_VARS: tuple[str, ...] = tuple(PREFIX + key.upper() for key in _FIELDS)


def env_var(key: str) -> str:
    """The ``DYN_KVBM_*`` variable of a config field, for messages elsewhere
    (this module is the only one that spells the names out)."""
    if key not in _FIELDS:
        raise KeyError(f"no kvbm setting {key!r}")
    return PREFIX + key.upper()


def _unknown_env(name: str) -> str:
    exact = PREFIX + name[len(PREFIX):].upper()
    if exact in ENV_VARS:
        return f"{name} (variable names are case-sensitive: did you mean {exact}?)"
    close = _closest(exact, ENV_VARS)
    return f"{name} (did you mean {close}?)" if close else name


def _closest(name: str, known: tuple[str, ...] | list[str], cutoff: float = 0.75) -> str | None:
    """The known name a typo most likely meant (``DYN_KVBM_CPU_CACHE_GBS`` -> ``DYN_KVBM_CPU_CACHE_GB``)."""
    import difflib

    found = difflib.get_close_matches(name, known, n=1, cutoff=cutoff)
    return found[0] if found else None


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
    # Exact names only: a variable that differs in case (DYN_KVBM_Disk_Cache_GB)
    # would otherwise be silently ignored while the user thinks it is in effect.
    unknown = [_unknown_env(k) for k in environ if k.upper().startswith(PREFIX) and k not in ENV_VARS]
    for key, raw in (extra_config or {}).items():
        short = key[len(PREFIX):].lower() if key.upper().startswith(PREFIX) else key.lower()
        if short not in _FIELDS:
            # Other connectors' keys (e.g. under MultiConnector) are not ours, but one a letter or
            # two from a kvbm key (cpu_cache_gbs) is a typo that would silently drop the setting.
            close = _closest(short, list(_FIELDS), 0.85)
            if key.upper().startswith(PREFIX) or close:
                unknown.append(f"kv_connector_extra_config[{key!r}]" + (f" (did you mean {close!r}?)" if close else ""))
            continue
        name = f"kv_connector_extra_config[{key!r}]"
        if short in ("leader_zmq_secret", "remote_secret"):
            raise ConfigError(
                f"{name}: vLLM prints its kv_transfer_config in the startup log, so a secret there leaks; "
                f"set {env_var(short)} in the environment or {env_var(short + '_file')} "
                "to a file of mode 0600 instead"
            )
        values[short] = _FIELDS[short](name, raw)
        if short == "remote_url" and values[short].password:
            raise ConfigError(
                f"{name}: vLLM prints its kv_transfer_config in the startup log, so the Redis password in this "
                f"URL leaks; set {env_var('remote_url')} in the environment instead"
            )
        sources[short] = name
    if unknown:
        guessed = all("did you mean" in u for u in unknown)
        raise ConfigError(
            f"unknown kvbm setting(s): {', '.join(sorted(unknown))}"
            + ("" if guessed else f". Known: {', '.join(ENV_VARS)}")
        )
    config = KvbmConfig(**values, sources=sources)
    if not (config.has_host_tier or config.has_disk_tier or config.has_remote_tier):
        raise ConfigError(
            "no kvbm cache tier is set: set DYN_KVBM_CPU_CACHE_GB (e.g. 4) or "
            "DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS for the pinned host tier, and/or "
            "DYN_KVBM_DISK_CACHE_GB / DYN_KVBM_DISK_CACHE_OVERRIDE_NUM_BLOCKS for the disk tier, and/or "
            "DYN_KVBM_REMOTE_URL for the tier shared by servers (Redis)"
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
