"""vLLM's ``NixlConnector``, unchanged, loaded through kvbm so NIXL's idle spin can be capped.

NIXL runs a progress thread per agent that polls its transfer backend in a
loop; NIXL's Python API hard-codes the pause between polls to zero, so every
NIXL-enabled vLLM worker keeps one core at 100 % even when idle. On a GPU
host with cores to spare that buys latency; on a small CPU-only host (four
workers on two cores) it starves the workers themselves — requests slow down
many times over and health checks time out.

Set ``KVBM_NIXL_PROGRESS_DELAY_US`` (microseconds between polls, e.g. 1000)
and load the connector as
``{"kv_connector": "NixlConnector", "kv_connector_module_path": "kvbm.disagg.nixl"}``:
importing this module then makes every NIXL agent created in the process use
that pause. Unset (the default) nothing is changed, and the class is vLLM's
own either way — the connector name stays ``NixlConnector``, which vLLM's
config checks look for. The launch scripts set it in CPU mode.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

DELAY_ENV = "KVBM_NIXL_PROGRESS_DELAY_US"
_applied: int | None = None


def apply_progress_delay(delay_us: int | None = None) -> int | None:
    """Make NIXL agents created from now on pause ``delay_us`` between progress polls.

    ``None`` reads :data:`DELAY_ENV`. Returns the delay in force (None: NIXL's
    default). Idempotent; a missing or incompatible NIXL only logs.
    """
    global _applied
    if delay_us is None:
        raw = os.environ.get(DELAY_ENV, "").strip()
        if not raw:
            return _applied
        try:
            delay_us = int(raw)
        except ValueError:
            raise ValueError(f"{DELAY_ENV}={raw!r} is not a whole number of microseconds, e.g. 1000") from None
    if delay_us < 0:
        raise ValueError(f"{DELAY_ENV} must be >= 0 microseconds, got {delay_us}")
    if _applied is not None:
        return _applied
    # vLLM sets this before its first NIXL import (a UCX leak work-around) and
    # cannot once NIXL is loaded; do the same, since we may import NIXL first.
    os.environ.setdefault("UCX_RCACHE_MAX_UNRELEASED", "1024")
    try:
        import nixl._api as nixl_api
    except ImportError:
        logger.debug("kvbm: NIXL not importable; %s ignored", DELAY_ENV)
        return None
    bindings = nixl_api.nixlBind
    base = bindings.nixlAgentConfig
    field = base.__dict__.get("pthrDelay")
    if not isinstance(field, property):
        logger.warning("kvbm: this NIXL has no settable pthrDelay; %s ignored", DELAY_ENV)
        return None

    class _PacedAgentConfig(base):  # type: ignore[misc, valid-type]
        """NIXL's agent config whose progress-thread pause is at least ``delay_us``."""

        @property
        def pthrDelay(self) -> int:  # noqa: N802 (NIXL's name)
            return field.__get__(self)

        @pthrDelay.setter
        def pthrDelay(self, value: int) -> None:  # noqa: N802
            field.__set__(self, max(int(value), delay_us))

    bindings.nixlAgentConfig = _PacedAgentConfig
    _applied = delay_us
    from kvbm.logs import ensure_log_handler

    ensure_log_handler()  # a decode worker runs no other kvbm code that would
    logger.info("kvbm: NIXL progress threads pause %d us between polls (%s)", delay_us, DELAY_ENV)
    return delay_us


apply_progress_delay()

# Imported after the patch on purpose: vLLM's NIXL modules load NIXL lazily,
# but nothing may create an agent before the config class is replaced.
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector  # noqa: E402

__all__ = ["DELAY_ENV", "NixlConnector", "apply_progress_delay"]
