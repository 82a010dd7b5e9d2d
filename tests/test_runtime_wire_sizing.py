"""Unit tests of the handshake's pure parts: the wire format's checks and the tier-sizing policy."""

from __future__ import annotations

import json
import os

import pytest

from kvbm.config import load_config
from kvbm.runtime import wire
from kvbm.runtime.sizing import (
    G3_FILE_PREFIX,
    Machine,
    SizingError,
    TierPlan,
    TierSizes,
    WorkerLayout,
    check_fits,
    local_bytes_per_block,
    machine_resources,
    own_g3_bytes,
    plan_tiers,
)
from kvbm.runtime.wire import Beacon, Malformed, Status

KEY = b"k" * 32
SESSION, NONCE = "ab" * 16, "cd" * 16
LAYOUT = WorkerLayout(1, 2, 4096, 64, layout="l", pid=123, host="h")
PLAN = TierPlan.configured(load_config({}, environ={"DYN_KVBM_CPU_CACHE_GB": "1"}), TierSizes(4, 8, 8192))
TIER = {"name": "G2", "medium": "host", "capacity": 4, "filter_threshold": None, "shared": False, "sync_load": True,
        "persistent": False}


def status_dict(**changes) -> dict:
    return {**wire.status_message(Status(SESSION, NONCE, LAYOUT, "joined")), **changes}


def beacon_dict(**changes) -> dict:
    return {**wire.beacon_message(Beacon(SESSION, 2, "allocate", PLAN, None, (NONCE,))), **changes}


# ---- frames ------------------------------------------------------------------------
def test_round_trip():
    status = Status(SESSION, NONCE, LAYOUT, "allocating", 0.5, "x")
    assert wire.parse_status(wire.unseal(KEY, wire.seal(KEY, wire.status_message(status)))) == status
    beacon = Beacon(SESSION, 2, "done", PLAN, None, (NONCE,))
    assert wire.parse_beacon(wire.unseal(KEY, wire.seal(KEY, wire.beacon_message(beacon)))) == beacon


@pytest.mark.parametrize("frame, reason", [
    (b"{}", "not a kvbm handshake frame"),
    (wire.MAGIC[:6] + b"01" + b"\0" * 40, "another kvbm version"),
    (wire.seal(b"other-key", {"a": 1}), "bad signature"),
    (wire.seal(KEY, {"a": 1})[:-1] + b"2", "bad signature"),  # tampered payload
    (b"x" * (wire.MAX_MESSAGE_BYTES + 1), "more than"),
])
def test_frames_that_do_not_verify(frame, reason):
    with pytest.raises(Malformed, match=reason):
        wire.unseal(KEY, frame)


def test_signed_but_hostile_payloads():
    """Even a peer with the key (a buggy or compromised one) cannot raise anything but Malformed."""
    for payload in (b"[" * 30_000 + b"]" * 30_000, b"not json", b"[1, 2]", b"\xff\xfe"):
        frame = wire.MAGIC + wire.hmac.new(KEY, payload, wire.hashlib.sha256).digest() + payload
        with pytest.raises(Malformed):
            wire.unseal(KEY, frame)


# ---- fields ------------------------------------------------------------------------
@pytest.mark.parametrize("changes", [
    {"rank": 2}, {"rank": -1}, {"rank": True}, {"rank": "0"}, {"rank": [0]}, {"rank": 1.0},
    {"world_size": 0}, {"world_size": 1 << 17},
    {"bytes_per_block": 0}, {"bytes_per_block": 1 << 41}, {"num_gpu_blocks": 0},
    {"pid": 0}, {"host": "h" * 256}, {"host": None}, {"layout": 5}, {"layout": "x" * 5000},
    {"state": "done"}, {"state": ["ready"]}, {"state": {"a": 1}},
    {"progress": 1.5}, {"progress": float("nan")}, {"progress": True}, {"progress": "50%"},
    {"error": 3}, {"error": "e" * 5000},
    {"session": "AB" * 16}, {"session": "ab" * 17}, {"nonce": None}, {"nonce": 7},
    {"extra": 1},
])
def test_every_status_field_is_checked(changes):
    with pytest.raises(Malformed):
        wire.parse_status(status_dict(**changes))


def test_missing_status_field():
    message = status_dict()
    del message["host"]
    with pytest.raises(Malformed, match="missing or unknown"):
        wire.parse_status(message)


@pytest.mark.parametrize("changes", [
    {"state": "allocating"}, {"plan": None}, {"plan": [1, 2, 3]},
    {"plan": {"chain": [], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": "G2", "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [TIER] * (wire.MAX_TIERS + 1), "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [TIER, TIER], "bytes_per_block_all_ranks": 1, "remote_key": ""}},  # names repeat
    {"plan": {"chain": [{**TIER, "name": "G1"}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "name": "G2/../x"}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "medium": "x" * 17}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "capacity": -1}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "capacity": 0}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "capacity": 1 << 41}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "sync_load": 1}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "filter_threshold": -1}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [{**TIER, "extra": 1}], "bytes_per_block_all_ranks": 1, "remote_key": ""}},
    {"plan": {"chain": [TIER], "bytes_per_block_all_ranks": 0, "remote_key": ""}},
    {"plan": {"chain": [TIER], "bytes_per_block_all_ranks": 1}},
    {"peers": "x"}, {"peers": ["zz"]}, {"peers": [NONCE] * (wire.MAX_PEERS + 1)},
    {"world_size": False}, {"error": {"msg": 1}}, {"session": None},
])
def test_every_beacon_field_is_checked(changes):
    with pytest.raises(Malformed):
        wire.parse_beacon(beacon_dict(**changes))


def test_waiting_and_failed_beacons_need_no_sizes():
    assert wire.parse_beacon(beacon_dict(state="waiting", plan=None)).plan is None
    assert wire.parse_beacon(beacon_dict(state="failed", plan=None, error="why")).error == "why"


def test_the_beacon_carries_the_chain_tier_by_tier():
    """A tier of a medium kvbm's own chain never names travels as it is (tests/test_chain.py)."""
    from kvbm.core.tiers import Tier

    plan = TierPlan((*PLAN.chain, Tier("G9", "mem", 8, filter_threshold=3, sync_load=True)), 8192)
    parsed = wire.parse_beacon(json.loads(json.dumps(beacon_dict(plan=wire.beacon_message(
        Beacon(SESSION, 2, "allocate", plan, None, ()))["plan"]))))
    assert parsed.plan == plan and [t.name for t in parsed.plan.chain] == ["G2", "G3", "G9"]
    assert plan.blocks_on("host") == 4 and plan.settings_sizes() == TierSizes(4, 8, 8192)


def test_clip_keeps_our_own_text_acceptable():
    long = wire.clip("e" * 10_000)
    assert len(long) == wire.MAX_TEXT
    assert wire.parse_status(status_dict(error=long)).error == long


def test_drop_log_summarises(caplog):
    drops = wire.DropLog("kvbm test")
    for _ in range(100):
        drops.drop("bad signature (x)")
    assert drops.total == 100
    assert len([r for r in caplog.records if "dropped" in r.getMessage()]) == 1  # not a hundred lines
    assert "bad signature" in drops.summary() and "DYN_KVBM_LEADER_ZMQ_SECRET" in drops.summary()
    assert json.dumps(wire.DropLog("quiet").summary()) == '""'


# ---- sizing --------------------------------------------------------------------------
def config(**values):
    return load_config({"leader_worker_init_timeout_secs": 60, **values}, environ={})


def test_plan_tiers_totals_over_ranks_and_counts_win():
    layouts = [WorkerLayout(0, 2, 1000, 64), WorkerLayout(1, 2, 3000, 64)]
    assert plan_tiers(config(cpu_cache_gb=0.001, disk_cache_gb=0.002), layouts) == TierSizes(250, 500, 4000)
    assert plan_tiers(config(cpu_cache_override_num_blocks=7), layouts) == TierSizes(7, 0, 4000)


def test_plan_tiers_refuses_what_kvbm_cannot_address():
    with pytest.raises(SizingError, match="DYN_KVBM_CPU_CACHE_GB"):
        plan_tiers(config(cpu_cache_gb=1e6), [WorkerLayout(0, 1, 1, 64)])


MACHINE = Machine(memory=10_000_000, disk=50_000_000)


def test_check_fits_accepts_what_fits():
    check_fits(config(cpu_cache_gb=1), TierSizes(100, 500, 10_000), 100_000, MACHINE, "host h")
    check_fits(config(cpu_cache_gb=1), TierSizes(10**9, 10**9, 1), 1, Machine(None, None), "host h")  # unknown


def test_check_fits_refuses_memory_beyond_the_host():
    with pytest.raises(SizingError) as err:
        check_fits(config(cpu_cache_gb=1), TierSizes(101, 0, 100_000), 100_000, MACHINE, "host h")
    assert "DYN_KVBM_CPU_CACHE_GB" in str(err.value) and "host h" in str(err.value)
    with pytest.raises(SizingError, match="DYN_KVBM_CPU_CACHE_OVERRIDE_NUM_BLOCKS"):
        check_fits(config(cpu_cache_override_num_blocks=101), TierSizes(101, 0, 1), 100_000, MACHINE, "h")


def test_check_fits_refuses_disk_beyond_free_space():
    with pytest.raises(SizingError) as err:
        check_fits(config(disk_cache_gb=1), TierSizes(0, 501, 1), 100_000, MACHINE, "host h")
    assert "DYN_KVBM_DISK_CACHE_GB" in str(err.value) and "DYN_KVBM_DISK_CACHE_DIR" in str(err.value)


def test_local_ranks_are_summed():
    layouts = [WorkerLayout(0, 3, 10, 1, host="a"), WorkerLayout(1, 3, 20, 1, host="a"),
               WorkerLayout(2, 3, 40, 1, host="b")]
    assert local_bytes_per_block(layouts, "a") == 30 and local_bytes_per_block(layouts, "c") == 0


def test_machine_resources_reads_this_host(tmp_path):
    machine = machine_resources(str(tmp_path / "not" / "yet"))  # the nearest existing parent
    assert machine.memory and machine.memory > 0
    assert machine.disk and machine.disk > 0
    assert machine_resources(str(tmp_path), need_disk=False).disk is None


def test_kvbm_files_count_as_room(tmp_path):
    with open(tmp_path / f"{G3_FILE_PREFIX}old.bin", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 8 << 20)
    with open(tmp_path / "someone-elses.bin", "wb") as f:
        os.posix_fallocate(f.fileno(), 0, 4 << 20)
    (tmp_path / f"{G3_FILE_PREFIX}link.bin").symlink_to(tmp_path / "someone-elses.bin")
    # kvbm's own file is reused or reclaimed, so its space counts as room; others' never do.
    assert own_g3_bytes(str(tmp_path)) == 8 << 20
    assert own_g3_bytes(str(tmp_path / "missing")) == 0
