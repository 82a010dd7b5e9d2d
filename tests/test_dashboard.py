"""The shipped deploy/ files: Grafana dashboard, Prometheus config, docker-compose.

Every dashboard expression may only use series kvbm really exports (the
names come from the exporter's registry, not from a list in the test), and
counters are only ever plotted through rate(). promtool validates the
Prometheus config and, as recording rules, every dashboard expression.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from kvbm.core.planner import Planner
from kvbm.core.tiers import standard_chain
from kvbm.metrics import REFERENCE_COUNTERS, CacheMetrics, exported_series, make_registry

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
OBS = DEPLOY / "observability"
DASHBOARD = OBS / "grafana_dashboards" / "kvbm.json"
PROMETHEUS_CONFIG = OBS / "prometheus.yml"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
             "offset", "inf", "nan"}


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(dash: dict) -> list[dict]:
    out = []
    for panel in dash["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows nest their panels
    return out


def expressions(dash: dict) -> list[str]:
    return [t["expr"] for p in all_panels(dash) for t in p.get("targets", []) if t.get("expr")]


def series_in(expr: str) -> set[str]:
    """Metric names an expression selects (a small PromQL scanner)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)  # label lists
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\()?", text):
        name, call = match.group(1), match.group(2)
        if not call and name not in _KEYWORDS:
            names.add(name)
    return names


def exported() -> set[str]:
    planner = Planner(standard_chain(4, 8), 4)
    return exported_series(make_registry(CacheMetrics(planner)))


def test_scanner_finds_series_not_functions_or_labels():
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(kvbm_lookup_seconds_bucket{job="x"}[1m]))) '
            '/ on (instance) group_left () kvbm_block_size_bytes > 0')
    assert series_in(expr) == {"kvbm_lookup_seconds_bucket", "kvbm_block_size_bytes"}


def test_dashboard_uses_only_series_kvbm_exports():
    names = exported()
    used = set()
    for expr in expressions(dashboard()):
        found = series_in(expr)
        assert found, f"no series in {expr!r}"
        assert found <= names, f"{expr!r} uses series kvbm does not export: {sorted(found - names)}"
        used |= found
    # The reference dashboard's six counters are all there, under their exact names.
    assert set(REFERENCE_COUNTERS) <= used
    assert {"kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate", "kvbm_transfer_bytes_total",
            "kvbm_tier_used_blocks"} <= used


def test_counters_are_plotted_as_rates():
    counters = set(REFERENCE_COUNTERS) | {n for n in exported() if n.endswith(("_total", "_bucket"))}
    for expr in expressions(dashboard()):
        for name in series_in(expr) & counters:
            total = len(re.findall(rf"\b{name}\b", expr))
            rated = len(re.findall(rf"\b(?:rate|increase|irate)\(\s*{name}\b", expr))
            assert rated == total, f"counter {name} not under rate() in {expr!r}"


def test_dashboard_layout():
    dash = dashboard()
    assert dash["title"] == "KVBM Dashboard"
    rows = [p["title"] for p in dash["panels"] if p["type"] == "row"]
    for row in ("Cache Hit", "Offload", "Onboard", "Bandwidth", "Tier usage"):
        assert row in rows
    assert rows.index("Cache Hit") < rows.index("Offload") < rows.index("Onboard")
    ids = [p["id"] for p in all_panels(dash)]
    assert len(ids) == len(set(ids))
    assert any(v["type"] == "datasource" and v["name"] == "datasource" for v in dash["templating"]["list"])
    for panel in all_panels(dash):
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
            assert panel["targets"], panel["title"]


def test_prometheus_config_scrapes_kvbm_every_two_seconds():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    kvbm = jobs["kvbm-metrics"]
    assert kvbm["scrape_interval"] == "2s"
    assert kvbm["static_configs"][0]["targets"] == ["host.docker.internal:6880"]  # the default port


def test_compose_file_wires_the_shipped_files():
    compose = yaml.safe_load((DEPLOY / "docker-observability.yml").read_text())
    services = compose["services"]
    assert {"prometheus", "grafana"} <= set(services)
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (DEPLOY / source).exists(), f"{source} is mounted but missing"
    env = dict(item.split("=", 1) for item in services["grafana"]["environment"])
    assert env["GF_SECURITY_ADMIN_USER"] == "dynamo" and env["GF_SECURITY_ADMIN_PASSWORD"] == "dynamo"
    assert "host.docker.internal:host-gateway" in services["prometheus"]["extra_hosts"]
    providers = yaml.safe_load((OBS / "grafana_dashboards" / "dashboard-providers.yml").read_text())
    assert providers["providers"][0]["options"]["path"] == "/etc/grafana/provisioning/dashboards"
    datasources = yaml.safe_load((OBS / "grafana-datasources.yml").read_text())
    assert datasources["datasources"][0]["url"] == "http://prometheus:9090"


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not installed (Debian/Ubuntu: apt-get install prometheus)")
    return path


def test_promtool_accepts_the_config():
    result = subprocess.run([promtool(), "check", "config", str(PROMETHEUS_CONFIG)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_every_dashboard_expression(tmp_path):
    """Each expression as a recording rule: promtool parses it as PromQL."""
    rules = [{"record": f"kvbm:dashboard_expr_{i}", "expr": expr.replace("$__rate_interval", "1m")}
             for i, expr in enumerate(expressions(dashboard()))]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "kvbm-dashboard", "rules": rules}]}))
    result = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
