"""What goes wrong with Redis, in G4's words: fault kinds, set-up errors, small safe calls.

Classifies a redis-py or socket exception into one of the counted error kinds
(see :mod:`kvbm.storage.kinds`), turns a set-up failure into a
:class:`RemoteSetupError` that names the setting to fix, and wraps the few
calls whose failure only means "unknown" (CONFIG GET, INFO, closing). Shared
by the store, its node routing and the doctor's probe.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

import redis
from redis.exceptions import RedisClusterException, RedisError

from kvbm.config import ConfigError, RemoteTarget, env_var

logger = logging.getLogger(__name__)

__all__ = [
    "FAULTS", "RemoteSetupError", "advice", "check_ca_file", "cluster_enabled", "config_value", "error_kind",
    "quietly", "setup_error",
]


class RemoteSetupError(ConfigError):
    """G4 cannot be used as configured; the message names the setting and the fix.

    ``unreachable`` tells "no answer" (which may heal, so ``remote_optional``
    may start without G4) from wrong credentials or a wrong kind of server (which never heal).
    """

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def error_kind(e: BaseException) -> str:
    text = str(e)
    if isinstance(e, (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
                      redis.exceptions.NoPermissionError)) or text.startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
        return "auth"
    if isinstance(e, redis.exceptions.BusyLoadingError) or text.startswith(("LOADING", "BUSY", "MASTERDOWN",
                                                                              "TRYAGAIN", "CLUSTERDOWN")):
        return "busy"
    if isinstance(e, (redis.exceptions.TimeoutError, TimeoutError)):
        return "timeout"
    if isinstance(e, (redis.exceptions.ConnectionError, OSError)):
        return "connection"
    if isinstance(e, redis.exceptions.AskError) or text.startswith(("MOVED", "ASK")):
        return "moved"
    if isinstance(e, getattr(redis.exceptions, "OutOfMemoryError", ())) or text.startswith("OOM") \
            or "maxmemory" in text:
        return "oom"
    if isinstance(e, redis.exceptions.ReadOnlyError) or text.startswith("READONLY"):
        return "readonly"
    if isinstance(e, redis.exceptions.ResponseError):
        return "response"
    return "other"


#: What a Redis call may raise on network, server or cluster trouble (never a kvbm bug).
FAULTS = (RedisError, RedisClusterException, OSError)


def advice(kind: str) -> str:
    return {
        "oom": " (Redis is full and may not evict: set `maxmemory-policy allkeys-lru`)",
        "moved": " (the cluster topology changed; refreshing it)",
        "readonly": " (a replica: point the URL at the primary, or the cluster is failing over)",
    }.get(kind, "")


def config_value(client: redis.Redis, name: str) -> str | None:
    """A CONFIG GET value, or None where CONFIG is disabled (often so on managed Redis)."""
    try:
        conf = client.config_get(name)
    except FAULTS:
        return None
    value = conf.get(name.encode(), conf.get(name))
    return value.decode() if isinstance(value, bytes) else value


def cluster_enabled(client: redis.Redis) -> bool:
    try:
        return bool(client.info("cluster").get("cluster_enabled"))
    except FAULTS:
        return False


def quietly(fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception:  # closing a broken connection: nothing left to do
        logger.debug("kvbm: G4 close failed", exc_info=True)


def check_ca_file(target: RemoteTarget) -> None:
    """A missing CA bundle is a setting to fix, not an unreachable Redis (which may heal)."""
    path = target.ca_certs
    if path is not None and not (os.path.isfile(path) and os.access(path, os.R_OK)):
        why = "is not a readable file" if os.path.exists(path) else "does not exist"
        raise RemoteSetupError(
            f"{env_var('remote_url')}={target}: the CA bundle ssl_ca_certs={path} {why}; give the path of the "
            "PEM file of the CA that signed the Redis server's certificate, or drop ?ssl_ca_certs= to trust "
            "the system's CAs")


def setup_error(target: RemoteTarget, e: BaseException) -> RemoteSetupError:
    """What a set-up failure means for the user, naming the setting to fix."""
    var, optional = env_var("remote_url"), env_var("remote_optional")
    cause: BaseException = e
    if isinstance(e, redis.exceptions.RedisClusterException):  # "cannot be connected": the reason is inside
        while cause.__cause__ is not None:
            cause = cause.__cause__
    kind = error_kind(cause)
    text = str(cause) or type(cause).__name__
    if target.ca_certs and (target.ca_certs in text or any(
            isinstance(c, (FileNotFoundError, PermissionError, IsADirectoryError)) for c in _causes(e))):
        return RemoteSetupError(
            f"{var}={target}: cannot load the CA bundle ssl_ca_certs={target.ca_certs} ({text}); give a readable "
            "PEM file of the CA that signed the Redis server's certificate")
    if kind == "auth" or ("AUTH" in text and "password" in text):
        return RemoteSetupError(
            f"{var}={target}: Redis refused the credentials ({text}); put the right password in the URL "
            f"(redis://:PASSWORD@host:port, or redis://USER:PASSWORD@host:port with ACL users), or drop it if "
            "the server has none")
    if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text:
        return RemoteSetupError(
            f"{var}={target}: the server's TLS certificate is not trusted ({text}); give its CA bundle with "
            "?ssl_ca_certs=/path/ca.pem in the URL (or have the certificate name this host)")
    if "wrong version number" in text or "WRONG_VERSION_NUMBER" in text:
        return RemoteSetupError(f"{var}={target}: TLS to a server that speaks plain TCP ({text}); use redis:// "
                                "for a server without TLS")
    if kind in ("connection", "timeout", "busy"):
        return RemoteSetupError(
            f"{var}={target}: cannot reach Redis ({text}). Check the host and port, that redis-server runs "
            f"and listens there (its `bind` and `protected-mode`), and firewalls; or set {optional}=1 to "
            "start without G4 until Redis answers", unreachable=True)
    if "cluster" in text.lower():
        return RemoteSetupError(
            f"{var}={target}: {text}; for a single Redis server give one URL without ?cluster=1")
    return RemoteSetupError(f"{var}={target}: Redis answered with an error: {text}")


def _causes(e: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__
