"""kvbm's tier events (:mod:`kvbm.runtime.events`, which documents the Dynamo router contract) in vLLM's schema.

The runtime's recorder decides what to announce; this module gives it vLLM's view of a request
(``request.block_hashes``, tokens, LoRA) and turns its records into vLLM's ``BlockStored`` /
``BlockRemoved``, keeping only the fields the installed vLLM's structs have.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kvbm.core.tiers import Tier
from kvbm.runtime.events import LOOSE_BLOCKS, RequestBlocks, TierEvent
from kvbm.runtime.events import TierEventRecorder as TierRecorder

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.request import Request

    from kvbm.runtime.leader import LeaderRuntime

logger = logging.getLogger(__name__)


def kv_events_enabled(vllm_config: VllmConfig) -> bool:
    """Whether vLLM publishes KV events (``--kv-events-config`` with ``enable_kv_cache_events``)."""
    events = getattr(vllm_config, "kv_events_config", None)
    return bool(events is not None and getattr(events, "enable_kv_cache_events", False))


class TierEventRecorder:
    """The runtime's recorder fed with vLLM's requests, its records returned as vLLM's KV events."""

    def __init__(self, chain: Sequence[Tier], block_size: int, requests: Mapping[str, Request],
                 loose_blocks: int = LOOSE_BLOCKS) -> None:
        from vllm.distributed.kv_events import BlockRemoved, BlockStored
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        #: vLLM's event structs and the fields this release's have (older ones lack medium, lora_name, ...).
        self._schema = {stored: (cls, set(getattr(cls, "__struct_fields__", ())))
                        for stored, cls in ((True, BlockStored), (False, BlockRemoved))}
        self._convert = maybe_convert_block_hash

        def source(req_id: str) -> RequestBlocks | None:
            """None for requests whose tokens alone do not identify their blocks (multimodal, embeddings)."""
            request = requests.get(req_id)
            if request is None or getattr(request, "mm_features", None) or \
                    getattr(request, "prompt_embeds", None) is not None:
                return None
            lora = request.lora_request
            return RequestBlocks(getattr(request, "block_hashes", None) or (), request.all_token_ids,
                                 getattr(lora, "adapter_id", None) if lora is not None else None,
                                 getattr(lora, "name", None) if lora is not None else None)

        self.tiers = TierRecorder(chain, block_size, source, maybe_convert_block_hash, loose_blocks)

    @classmethod
    def attach(cls, vllm_config: VllmConfig, runtime: LeaderRuntime, requests: Mapping[str, Request]
               ) -> TierEventRecorder | None:
        """A recorder listening to ``runtime``'s tiers when vLLM publishes KV events; None (no cost) otherwise."""
        if not kv_events_enabled(vllm_config):
            return None
        try:
            recorder = cls(runtime.chain, runtime.block_size, requests)
        except ImportError as exc:  # a vLLM without the KV event schema kvbm builds on
            logger.warning("kvbm: not publishing KV events for its tiers (this vLLM lacks %s)", exc)
            return None
        runtime.attach_tier_listener(recorder.tiers)
        logger.info("kvbm: publishing KV events for %s",
                    ", ".join(f"{t.name} (medium {recorder.tiers.mediums[t.name]})" for t in runtime.chain))
        return recorder

    def take_events(self) -> list[Any]:
        """vLLM's events since the last call, oldest first (vLLM's scheduler publishes them with G1's)."""
        return [self._vllm(event) for event in self.tiers.take_events()]

    def _vllm(self, event: TierEvent) -> Any:
        cls, known = self._schema[event.stored]
        fields = {"block_hashes": event.block_hashes, "medium": event.medium}
        if event.stored:
            fields.update(parent_block_hash=event.parent_block_hash, token_ids=event.token_ids,
                          block_size=event.block_size, lora_id=event.lora_id, lora_name=event.lora_name)
        return cls(**{k: v for k, v in fields.items() if k in known})
