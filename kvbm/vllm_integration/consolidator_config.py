"""``get_consolidator_endpoints``: the hook NVIDIA Dynamo's vLLM worker calls when kvbm is its connector.

Dynamo 1.6 (``dynamo.vllm.main.setup_vllm_engine``) imports this module whenever the
``--kv-transfer-config`` names ``DynamoConnector`` (directly or inside ``PdConnector``) and asks
for the ZMQ endpoints ``(vllm_endpoint, bind_endpoint, connect_endpoint)`` of a *KV event
consolidator*, a process that would merge vLLM's G1 events with the block manager's own; a falsy
answer means none: Dynamo subscribes to vLLM's own event stream. kvbm answers None on purpose:
vLLM's scheduler publishes kvbm's tier events (``take_events()``, kvbm.runtime.events) in the
same batch as its own G1 events, so the one stream Dynamo already reads carries every tier, in
step order, with no extra process, port or copy — and nothing to merge: Dynamo's router indexes
each medium separately, so a block in G1 and G2 is meant to appear in both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def get_consolidator_endpoints(vllm_config: VllmConfig) -> tuple[str, str, str] | None:
    """None: no consolidator; kvbm's events travel in vLLM's own KV event stream (module docstring)."""
    return None
