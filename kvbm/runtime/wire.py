"""The handshake's wire format: signed, size-bounded JSON, validated field by field.

Over TCP anyone who reaches the ports can talk to the leader or, by binding
the ports first, pose as it. So every message is a frame

    MAGIC (8 bytes) | HMAC-SHA256(key, payload) (32 bytes) | payload (UTF-8 JSON)

and a receiver checks, in this order and before looking inside: the size
(at most :data:`MAX_MESSAGE_BYTES`, also enforced by ZMQ's ``MAXMSGSIZE``),
the magic (another kvbm version, or another program), the MAC (a forger
without the secret), then every field's type and range. Whatever fails is
:class:`Malformed`: the caller logs and drops it and carries on; nothing a
peer sends can raise anything else. A MAC does not stop replays of captured
messages (anyone may subscribe to the leader's PUB port over TCP): the
handshake defeats those with per-worker nonces echoed by the leader (see
:mod:`kvbm.runtime.handshake`).

The key: over TCP, a per-deployment secret from ``leader_zmq_secret`` (see config)
or ``..._SECRET_FILE`` (a file of mode 0600), or else one generated on first
use into the per-user 0700 directory that also holds the ``ipc://`` sockets,
so every process of this user on this host agrees without configuration while
other users cannot read it. Over ``ipc://`` the 0700 directory is the access
control and the MAC only guards integrity (a fixed key).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import os
import re
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

from kvbm.config import MAX_COUNT, KvbmConfig, env_var, read_secret_file
from kvbm.core.tiers import Tier, check_chain
from kvbm.runtime.sizing import MAX_BLOCK_BYTES, MAX_WORLD_SIZE, TierPlan, WorkerLayout

logger = logging.getLogger(__name__)

#: Bump with any change to the messages: peers of another version cannot be verified and are dropped.
MAGIC = b"KVBMHS03"
MAX_MESSAGE_BYTES = 64 * 1024
_MAC_BYTES = 32
_IPC_KEY = b"kvbm-handshake-ipc"
_HEX32 = re.compile(r"[0-9a-f]{32}")
MAX_TEXT = 4096
MAX_PEERS = 1024
MAX_TIERS = 16
_WORD = re.compile(r"[A-Za-z0-9_-]{1,16}")  # a tier's name or medium
MAX_FILTER_THRESHOLD = 1 << 31
SECRET_FILE_NAME = "zmq-secret"

LEADER_STATES = ("waiting", "allocate", "done", "failed")
WORKER_STATES = ("joined", "allocating", "ready", "failed")


class Malformed(ValueError):
    """A message that is not an authentic, well-formed handshake message; drop it."""


@dataclass(frozen=True)
class Beacon:
    """The leader's soft state, published every heartbeat."""

    session: str
    world_size: int
    state: str
    #: The tiers every rank allocates (sent from state "allocate" on).
    plan: TierPlan | None = None
    error: str | None = None
    #: Nonces of the workers heard in this session: a worker trusts a beacon
    #: only once it carries its own nonce, so replayed old beacons are inert.
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Status:
    """One worker's soft state, pushed every heartbeat once it heard a leader."""

    session: str
    nonce: str
    layout: WorkerLayout
    state: str
    progress: float | None = None
    error: str | None = None


# ---- frames --------------------------------------------------------------------
def seal(key: bytes, message: dict[str, Any]) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return MAGIC + hmac.new(key, payload, hashlib.sha256).digest() + payload


def unseal(key: bytes, frame: bytes) -> dict[str, Any]:
    """The verified JSON object of a frame; raises :class:`Malformed` otherwise."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise Malformed(f"{len(frame)} bytes, more than {MAX_MESSAGE_BYTES}")
    if not frame.startswith(MAGIC[:6]):
        raise Malformed("not a kvbm handshake frame (another program on these ports?)")
    if not frame.startswith(MAGIC):
        raise Malformed(f"handshake format {frame[6:8]!r}, this kvbm speaks {MAGIC[6:]!r}: another kvbm version")
    mac, payload = frame[len(MAGIC) : len(MAGIC) + _MAC_BYTES], frame[len(MAGIC) + _MAC_BYTES :]
    if not hmac.compare_digest(mac, hmac.new(key, payload, hashlib.sha256).digest()):
        raise Malformed("bad signature (a sender without this deployment's secret)")
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        raise Malformed("signed but not JSON") from None
    if not isinstance(message, dict):
        raise Malformed("signed but not a JSON object")
    return message


# ---- messages ------------------------------------------------------------------
def beacon_message(beacon: Beacon) -> dict[str, Any]:
    message = asdict(beacon)
    message["peers"] = list(beacon.peers)
    if message["plan"] is not None:
        message["plan"]["chain"] = list(message["plan"]["chain"])  # JSON's own types, as a peer parses them
    return message


def status_message(status: Status) -> dict[str, Any]:
    return {**asdict(status.layout), "session": status.session, "nonce": status.nonce, "state": status.state,
            "progress": status.progress, "error": status.error}


_BEACON_KEYS = {"session", "world_size", "state", "plan", "error", "peers"}
_STATUS_KEYS = {"session", "nonce", "state", "progress", "error", *WorkerLayout.__dataclass_fields__}
_PLAN_KEYS = set(TierPlan.__dataclass_fields__)
_TIER_KEYS = set(Tier.__dataclass_fields__)


def parse_beacon(message: dict[str, Any]) -> Beacon:
    _keys(message, _BEACON_KEYS, "beacon")
    state = _choice(message, "state", LEADER_STATES)
    plan = message["plan"]
    if plan is None:
        if state in ("allocate", "done"):
            raise Malformed(f"beacon in state {state!r} without a tier plan")
    else:
        plan = _plan(plan)
    peers = message["peers"]
    if not isinstance(peers, list) or len(peers) > MAX_PEERS or not all(_is_hex32(p) for p in peers):
        raise Malformed("peers is not a list of nonces")
    return Beacon(
        _hex32(message, "session"), _int(message, "world_size", 1, MAX_WORLD_SIZE), state, plan,
        _text(message, "error"), tuple(peers),
    )


def _plan(plan: Any) -> TierPlan:
    if not isinstance(plan, dict):
        raise Malformed("plan is not an object")
    _keys(plan, _PLAN_KEYS, "plan")
    tiers = plan["chain"]
    if not isinstance(tiers, list) or not 1 <= len(tiers) <= MAX_TIERS:
        raise Malformed(f"chain is not a list of 1 to {MAX_TIERS} tiers")
    chain = tuple(_tier(tier) for tier in tiers)
    try:
        check_chain(chain)
    except ValueError as exc:
        raise Malformed(f"chain: {exc}") from None
    return TierPlan(chain, _int(plan, "bytes_per_block_all_ranks", 1, MAX_BLOCK_BYTES * MAX_WORLD_SIZE),
                    "" if plan["remote_key"] == "" else _hex32(plan, "remote_key"))


def _tier(tier: Any) -> Tier:
    if not isinstance(tier, dict):
        raise Malformed("a tier is not an object")
    _keys(tier, _TIER_KEYS, "tier")
    for key in ("name", "medium"):
        if not isinstance(tier[key], str) or not _WORD.fullmatch(tier[key]):
            raise Malformed(f"tier {key} is not a word of at most 16 letters, digits, '_' or '-'")
    for key in ("shared", "sync_load", "persistent"):
        if type(tier[key]) is not bool:
            raise Malformed(f"tier {key} is not true or false")
    threshold = tier["filter_threshold"]
    return Tier(name=tier["name"], medium=tier["medium"], capacity=_int(tier, "capacity", 0, MAX_COUNT),
                filter_threshold=None if threshold is None else _int(tier, "filter_threshold", 0,
                                                                     MAX_FILTER_THRESHOLD),
                shared=tier["shared"], sync_load=tier["sync_load"], persistent=tier["persistent"])


def parse_status(message: dict[str, Any]) -> Status:
    _keys(message, _STATUS_KEYS, "worker status")
    world = _int(message, "world_size", 1, MAX_WORLD_SIZE)
    layout = WorkerLayout(
        rank=_int(message, "rank", 0, world - 1), world_size=world,
        bytes_per_block=_int(message, "bytes_per_block", 1, MAX_BLOCK_BYTES),
        num_gpu_blocks=_int(message, "num_gpu_blocks", 1, MAX_COUNT),
        layout=_text(message, "layout", optional=False), pid=_int(message, "pid", 1, 1 << 32),
        host=_text(message, "host", optional=False, limit=255),
    )
    progress = message["progress"]
    if progress is not None and (type(progress) not in (int, float) or not 0 <= progress <= 1):
        raise Malformed("progress is not a fraction")
    return Status(
        _hex32(message, "session"), _hex32(message, "nonce"), layout, _choice(message, "state", WORKER_STATES),
        None if progress is None else float(progress), _text(message, "error"),
    )


def _keys(message: dict[str, Any], expected: set[str], what: str) -> None:
    if message.keys() != expected:
        odd = sorted(set(message) ^ expected)[:5]
        raise Malformed(f"{what} with missing or unknown fields {odd}")


def _int(message: dict[str, Any], key: str, low: int, high: int) -> int:
    value = message[key]
    if type(value) is not int or not low <= value <= high:  # bool is an int: excluded by the exact type
        raise Malformed(f"{key} is not an integer in [{low}, {high}]")
    return value


def _text(message: dict[str, Any], key: str, *, optional: bool = True, limit: int = MAX_TEXT) -> Any:
    value = message[key]
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > limit:
        raise Malformed(f"{key} is not a string of at most {limit} characters")
    return value


def _choice(message: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = message[key]
    if value not in choices:  # hashable check first: a list here must not raise TypeError
        raise Malformed(f"{key} is not one of {choices}")
    return value


def _is_hex32(value: Any) -> bool:
    return isinstance(value, str) and _HEX32.fullmatch(value) is not None


def _hex32(message: dict[str, Any], key: str) -> str:
    value = message[key]
    if not _is_hex32(value):
        raise Malformed(f"{key} is not a 32-digit hex id")
    return value


def new_id() -> str:
    return secrets.token_hex(16)


def clip(text: str) -> str:
    """Keep our own free text within what peers accept."""
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


# ---- keys ----------------------------------------------------------------------
def handshake_key(config: KvbmConfig, tcp: bool, private_dir: str) -> bytes:
    """The HMAC key of this deployment (see the module docstring for where it comes from)."""
    if config.leader_zmq_secret is not None:
        secret = config.leader_zmq_secret.encode()
    elif config.leader_zmq_secret_file is not None:
        secret = read_secret_file(config.leader_zmq_secret_file, env_var("leader_zmq_secret_file"))
    elif tcp:
        secret = _per_user_secret(private_dir)
    else:
        return _IPC_KEY
    return hashlib.sha256(b"kvbm-handshake-key|" + secret).digest()


def _per_user_secret(private_dir: str) -> bytes:
    """Read, or create once, ``<private_dir>/zmq-secret``; concurrent creators agree on one file."""
    path = os.path.join(private_dir, SECRET_FILE_NAME)
    if not os.path.lexists(path):
        fd, tmp = tempfile.mkstemp(dir=private_dir, prefix=".zmq-secret-")  # 0600, O_EXCL
        try:
            os.write(fd, secrets.token_hex(32).encode() + b"\n")
            os.fsync(fd)
            os.close(fd)
            try:
                os.link(tmp, path)  # atomic: readers never see half a secret; the first creator wins
                logger.info(
                    "kvbm: generated the TCP handshake secret %s (mode 0600); processes of this user on this host "
                    "share it. Workers on other hosts need the same secret: set %s or %s on every host",
                    path, env_var("leader_zmq_secret"), env_var("leader_zmq_secret_file"),
                )
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
    return read_secret_file(path, f"the generated handshake secret (set {env_var('leader_zmq_secret_file')} "
                                  "to use another file)")


class DropLog:
    """Log dropped messages without letting a flood of them flood the log: the
    first of each reason at once, then a count at most every ``every_s``."""

    def __init__(self, who: str, every_s: float = 10.0) -> None:
        self.who = who
        self.every_s = every_s
        self.total = 0
        self.reasons: dict[str, int] = {}
        self._pending = 0
        self._last = -math.inf

    def drop(self, reason: str) -> None:
        self.total += 1
        first = reason not in self.reasons
        self.reasons[reason] = self.reasons.get(reason, 0) + 1
        self._pending += 1
        now = time.monotonic()
        if first or now - self._last >= self.every_s:
            logger.warning("%s: dropped %d handshake message(s); latest: %s", self.who, self._pending, reason)
            self._pending, self._last = 0, now

    def summary(self) -> str:
        if not self.total:
            return ""
        top = max(self.reasons, key=lambda r: self.reasons[r])
        return (
            f" ({self.total} message(s) were dropped, most often: {top}. A different secret (set "
            f"{env_var('leader_zmq_secret')} or {env_var('leader_zmq_secret_file')} identically everywhere) "
            "or another kvbm version on the other side?)"
        )
