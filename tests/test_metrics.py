"""kvbm's metrics: hit rate window, exporter over real HTTP, series names and values.

The planner here is the real one, driven through a request's life (store,
spill to disk, onboard), so the exported values come from real bookkeeping.
The end-to-end check through vLLM and a real Prometheus is in
test_metrics_prometheus.py.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text

from kvbm.config import load_config
from kvbm.core.hashing import engine_root
from kvbm.core.planner import Planner
from kvbm.core.tiers import standard_chain
from kvbm.metrics import (
    DIRECTIONS,
    DISK_ERROR_KINDS,
    REFERENCE_COUNTERS,
    CacheMetrics,
    HitRateWindow,
    LatencyHistogram,
    MetricsExporter,
    MetricsServerError,
    exported_series,
    make_registry,
    metrics_port,
)
from kvbm.vllm_integration.metadata import KvbmWorkerMetadata

BS = 4
ROOT = engine_root("metrics-test|bs=4")
TOKENS = list(range(1000, 1000 + 4 * BS + 1))  # 4 full blocks before the last token


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---- hit rate window ---------------------------------------------------------------


def test_window_rates_are_hits_over_blocks_looked_up():
    w = HitRateWindow(10)
    assert (w.rate("G2"), w.rate("G3")) == (0.0, 0.0)  # nothing looked up yet
    w.add(requests=2, looked=8, hits={"G2": 2, "G3": 4})
    assert w.rate("G2") == pytest.approx(0.25)
    assert w.rate("G3") == pytest.approx(0.5)


def test_window_forgets_old_requests():
    w = HitRateWindow(3)
    w.add(1, 4, {"G2": 4})  # a perfect host hit...
    for _ in range(3):
        w.add(1, 4, {})  # ...then three misses push it out
    assert w.requests == 3
    assert w.rate("G2") == 0.0
    w.add(1, 4, {"G3": 4})
    assert w.requests == 3 and w.rate("G3") == pytest.approx(1 / 3)


def test_window_keeps_whole_steps():
    w = HitRateWindow(3)
    w.add(5, 10, {"G2": 5})  # one step admitted more requests than the window: kept whole
    assert w.requests == 5 and w.rate("G2") == 0.5
    w.add(3, 6, {"G2": 0})  # three newer requests fill the window alone
    assert w.requests == 3 and w.rate("G2") == 0.0


def test_window_size_must_be_positive():
    with pytest.raises(ValueError):
        HitRateWindow(0)


def test_histogram_buckets_are_cumulative():
    h = LatencyHistogram((0.001, 0.01))
    for seconds in (0.0005, 0.002, 0.003, 5.0):
        h.observe(seconds)
    assert h.cumulative() == [("0.001", 1.0), ("0.01", 3.0), ("+Inf", 4.0)]
    assert h.count == 4 and h.sum == pytest.approx(5.0055)


# ---- a planner with real traffic ---------------------------------------------------


def traffic(world_size: int = 1) -> Planner:
    """Request A stores 4 blocks in G2 (then spilled to G3); request B onboards them from G2."""
    planner = Planner(standard_chain(8, 16, disk_filter_threshold=None), BS, world_size)
    planner.add_request("A", ROOT)
    assert planner.match("A", TOKENS, 0) == 0
    planner.on_alloc("A", [10, 11, 12, 13, 14], 0)
    planner.on_scheduled("A", TOKENS, [10, 11, 12, 13, 14], True, len(TOKENS))
    plan = planner.take_plan()
    planner.on_worker_report(stored={plan.store.batch_id: world_size})
    (spill,) = planner.take_plan().spills  # committed G2 blocks go on to G3 (no filter here)
    planner.on_worker_report(stored={spill.batch_id: world_size})
    planner.on_finished("A")
    planner.add_request("B", ROOT)
    assert planner.match("B", TOKENS, 0) == 4 * BS
    planner.on_alloc("B", [20, 21, 22, 23, 24], 4 * BS)
    planner.take_plan()
    planner.on_worker_report(finished_loads=["B"])
    return planner


@pytest.fixture
def metrics() -> CacheMetrics:
    planner = traffic()
    m = CacheMetrics(planner, window=100, world_size=1, block_bytes=4096)
    m.on_step()
    m.observe_lookup(0.0002)
    m.on_worker_report({"G1->G2": 4 * 4096, "G2->G1": 4 * 4096}, {"G1->G2": 0.5, "G2->G1": 0.25},
                       {"G3": {"checksum": 1}})
    return m


def scrape(url: str, openmetrics: bool = False) -> str:
    headers = {"Accept": "application/openmetrics-text; version=1.0.0"} if openmetrics else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as response:
        return response.read().decode()


def samples(families) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


@pytest.fixture
def exporter(metrics):
    exp = MetricsExporter(metrics, "127.0.0.1", free_port())
    yield exp
    exp.close()


def test_exporter_serves_reference_names_with_real_values(exporter):
    url = f"http://127.0.0.1:{exporter.port}/metrics"
    values = samples(parse_text(scrape(url)))
    # The reference's exact series names (no _total), as its dashboards query them.
    assert values[("kvbm_matched_tokens", ())] == 4 * BS
    assert values[("kvbm_offload_blocks_d2h", ())] == 4
    assert values[("kvbm_offload_blocks_h2d", ())] == 4  # host -> disk (spilled)
    assert values[("kvbm_offload_blocks_d2d", ())] == 0
    assert values[("kvbm_onboard_blocks_h2d", ())] == 4
    assert values[("kvbm_onboard_blocks_d2d", ())] == 0
    # A looked up 4 blocks (no hit), B looked up 4 (all in G2): 4 / 8.
    assert values[("kvbm_host_cache_hit_rate", ())] == 0.5
    assert values[("kvbm_disk_cache_hit_rate", ())] == 0.0
    assert values[("kvbm_lookup_requests_total", ())] == 2
    assert values[("kvbm_host_hit_blocks_total", ())] == 4
    assert values[("kvbm_transfer_bytes_total", (("direction", "offload_d2h"),))] == 4 * 4096
    assert values[("kvbm_transfer_seconds_total", (("direction", "onboard_h2d"),))] == 0.25
    assert values[("kvbm_disk_errors_total", (("kind", "checksum"),))] == 1
    assert values[("kvbm_tier_used_blocks", (("tier", "host"),))] == 4
    assert values[("kvbm_tier_used_blocks", (("tier", "disk"),))] == 4
    assert values[("kvbm_tier_capacity_blocks", (("tier", "disk"),))] == 16
    assert values[("kvbm_evicted_blocks_total", (("tier", "host"),))] == 0
    assert values[("kvbm_block_size_bytes", ())] == 4096
    assert values[("kvbm_lookup_seconds_count", ())] == 1
    assert values[("kvbm_lookup_seconds_bucket", (("le", "0.00025"),))] == 1


def test_openmetrics_scrape_is_valid(exporter):
    """Prometheus negotiates OpenMetrics with prometheus_client: its strict parser must accept the output."""
    text = scrape(f"http://127.0.0.1:{exporter.port}/metrics", openmetrics=True)
    values = samples(parse_openmetrics(text))
    assert values[("kvbm_offload_blocks_d2h", ())] == 4
    assert values[("kvbm_onboard_blocks_h2d", ())] == 4
    assert values[("kvbm_lookup_requests_total", ())] == 2


def test_exported_series_names(metrics):
    names = exported_series(make_registry(metrics))
    assert set(REFERENCE_COUNTERS) <= names
    assert {"kvbm_host_cache_hit_rate", "kvbm_disk_cache_hit_rate", "kvbm_transfer_bytes_total",
            "kvbm_transfer_seconds_total", "kvbm_evicted_blocks_total", "kvbm_tier_used_blocks",
            "kvbm_tier_capacity_blocks", "kvbm_disk_errors_total", "kvbm_disk_filter_rejections_total",
            "kvbm_lookup_seconds_bucket", "kvbm_lookup_seconds_sum", "kvbm_lookup_seconds_count"} <= names
    assert not any(name.endswith("_created") for name in names)
    assert not any(f"{name}_total" in names for name in REFERENCE_COUNTERS)  # one name per counter


def test_every_direction_and_error_kind_is_always_exported(metrics):
    """Series exist from the start (zero), so dashboards and rate() never see gaps."""
    values = samples(parse_text(scrape_registry(metrics)))
    for direction in DIRECTIONS:
        assert ("kvbm_transfer_bytes_total", (("direction", direction),)) in values
    for kind in DISK_ERROR_KINDS:
        assert ("kvbm_disk_errors_total", (("kind", kind),)) in values


def scrape_registry(metrics: CacheMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(make_registry(metrics)).decode()


def test_uses_its_own_registry(exporter):
    assert not any(name.startswith("kvbm_") for name in REGISTRY._names_to_collectors)


def test_absent_tier_exports_zero_capacity():
    m = CacheMetrics(Planner(standard_chain(4, 0), BS), window=10)
    values = samples(parse_text(scrape_registry(m)))
    assert values[("kvbm_tier_capacity_blocks", (("tier", "disk"),))] == 0
    assert values[("kvbm_tier_capacity_blocks", (("tier", "host"),))] == 4


# ---- workers' reports --------------------------------------------------------------


def test_worker_metadata_sums_over_ranks():
    a = KvbmWorkerMetadata(transfer_bytes={"G1->G2": 100}, transfer_seconds={"G1->G2": 0.5},
                           errors={"G3": {"read": 1}}, bad_slots={"G3": {1}}, stored={7: 1})
    b = KvbmWorkerMetadata(transfer_bytes={"G1->G2": 50, "G3->G1": 7}, stored={7: 1},
                           transfer_seconds={"G1->G2": 0.25}, errors={"G3": {"read": 2, "write": 1}},
                           bad_slots={"G3": {2}})
    total = a.aggregate(b)
    assert isinstance(total, KvbmWorkerMetadata)
    assert total.transfer_bytes == {"G1->G2": 150, "G3->G1": 7}
    assert total.transfer_seconds == {"G1->G2": 0.75}
    assert total.errors == {"G3": {"read": 3, "write": 1}}
    assert total.bad_slots == {"G3": {1, 2}} and total.stored == {7: 2}
    assert KvbmWorkerMetadata().is_empty()
    assert not KvbmWorkerMetadata(transfer_bytes={"G1->G2": 1}).is_empty()


def test_rank_seconds_are_averaged_so_bandwidth_is_the_engines():
    """Two ranks each copy 1 GB in 1 s in parallel: 2 GB moved in 1 s of wall time."""
    m = CacheMetrics(traffic(world_size=2), world_size=2)
    m.on_worker_report({"G1->G2": 2_000_000_000}, {"G1->G2": 2.0}, {})
    moved, busy, _ = m.snapshot()
    assert moved["offload_d2h"] / busy["offload_d2h"] == 2e9


def test_unknown_worker_keys_are_ignored():
    m = CacheMetrics(traffic(), world_size=1)
    m.on_worker_report({"sideways": 5, "G1->G7": 3}, {}, {"G3": {"gremlins": 1}})
    moved, _, errors = m.snapshot()
    assert "sideways" not in moved and "G1->G7" not in moved and "gremlins" not in errors


# ---- exporter errors ---------------------------------------------------------------


def test_port_in_use_names_the_variable(metrics):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(MetricsServerError) as err:
            MetricsExporter(metrics, "127.0.0.1", port)
    message = str(err.value)
    assert "DYN_KVBM_METRICS_PORT" in message and str(port) in message and "in use" in message


@pytest.mark.parametrize("host", ["192.0.2.1", "no-such-host.invalid"])
def test_bad_bind_address_names_the_variable(metrics, host):
    with pytest.raises(MetricsServerError) as err:
        MetricsExporter(metrics, host, free_port())
    assert "DYN_KVBM_METRICS_HOST" in str(err.value)


def test_binds_only_where_told_and_releases_the_port(metrics):
    port = free_port()
    exp = MetricsExporter(metrics, "127.0.0.1", port)
    try:
        assert exp._server.server_address[0] == "127.0.0.1"
        assert "kvbm_matched_tokens" in scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        exp.close()
    again = MetricsExporter(metrics, "127.0.0.1", port)  # free again once closed
    again.close()


def test_data_parallel_engines_get_their_own_ports():
    config = load_config(environ={"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_METRICS_PORT": "7000"})
    assert metrics_port(config) == 7000
    assert metrics_port(config, 2) == 7002
    high = load_config(environ={"DYN_KVBM_CPU_CACHE_GB": "1", "DYN_KVBM_METRICS_PORT": "65535"})
    with pytest.raises(MetricsServerError) as err:
        metrics_port(high, 1)
    assert "DYN_KVBM_METRICS_PORT" in str(err.value)


# ---- the log line ------------------------------------------------------------------


def test_summary_line(metrics):
    line = metrics.summary()
    assert "hit rate (last 2 requests) G2 50.0% G3 0.0% of 8 blocks looked up" in line
    assert "matched 16 tokens" in line
    assert "G2 4/8 used" in line and "G3 4/16 used" in line
    assert "disk errors: checksum 1" in line


def test_half_sent_connections_hold_no_threads_forever(metrics):
    """300 connections that never finish their request: threads stay bounded, the exporter closes them
    itself, and a real scrape gets through while they are open."""
    exp = MetricsExporter(metrics, "127.0.0.1", free_port(), max_connections=16, request_timeout_s=1.0)
    threads = threading.active_count()
    stalled = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", exp.port))
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # the headers never end
            stalled.append(sock)
        time.sleep(0.5)
        assert threading.active_count() <= threads + 16 + 2
        assert "kvbm_matched_tokens" in scrape(f"http://127.0.0.1:{exp.port}/metrics")
        for sock in stalled:  # each one closed by the exporter: evicted at once or timed out
            sock.settimeout(10)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
        deadline = time.monotonic() + 10
        while threading.active_count() > threads + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert threading.active_count() <= threads + 1
    finally:
        for sock in stalled:
            sock.close()
        exp.close()


def test_stalled_connections_are_one_debug_line_not_a_traceback(metrics, capfd):
    """Clients that connect and send nothing until the exporter times them out: each costs one
    debug line in kvbm's log, nothing on stderr (socketserver printed a 15-line traceback each)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign]
    log = logging.getLogger("kvbm.metrics")  # its own handler: other tests may stop kvbm's propagation
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False  # nor to a stream handler another test left on "kvbm"
    exp = MetricsExporter(metrics, "127.0.0.1", free_port(), request_timeout_s=0.3)
    try:
        # The server's own path for a failed connection, as it runs when a read times out ...
        try:
            raise TimeoutError("timed out")
        except TimeoutError:
            exp._server.handle_error(None, ("127.0.0.1", 4242))
        # ... and real stalled clients, closed by the read timeout or by the deadline sweep.
        stalled = [socket.create_connection(("127.0.0.1", exp.port)) for _ in range(4)]
        for sock in stalled:
            sock.settimeout(10)
            try:
                assert sock.recv(1) == b""
            except ConnectionResetError:
                pass
            sock.close()
        assert "kvbm_matched_tokens" in scrape(f"http://127.0.0.1:{exp.port}/metrics")
    finally:
        exp.close()
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err
    lines = [r.getMessage() for r in records]
    assert "kvbm metrics: closed the connection from 127.0.0.1:4242: timed out" in lines
    assert all("\n" not in line for line in lines)
