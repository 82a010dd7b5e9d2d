"""``get_consolidator_endpoints``: the hook NVIDIA Dynamo's vLLM worker calls when kvbm is its connector.

Dynamo 1.6 (``dynamo.vllm.main.setup_vllm_engine``) imports this module whenever the
``--kv-transfer-config`` names ``DynamoConnector`` (directly or inside ``PdConnector``)
and asks for ``(vllm_endpoint, bind_endpoint, connect_endpoint)``: the ZMQ endpoints of
a *KV event consolidator*, a process that would merge vLLM's G1 events with the block
manager's own and republish them; Dynamo's event publisher then subscribes to
``connect_endpoint`` instead of vLLM. A falsy answer means "no consolidator": Dynamo
subscribes to vLLM's own event stream (``--kv-events-config``'s endpoint).

kvbm answers None on purpose. Its tier events (G2 "CPU", G3 "DISK", G4 "REMOTE") are
returned by the scheduler-side connector's ``take_events()``, and vLLM's scheduler
publishes them in the same batch as its own G1 events (kvbm.runtime.events).
So the one stream Dynamo already reads carries every tier, in step order, with no
extra process, port or copy — and nothing to merge: Dynamo's router indexes each
medium separately, so a block in G1 and G2 is meant to appear in both.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig


def get_consolidator_endpoints(vllm_config: VllmConfig) -> tuple[str, str, str] | None:
    """None: no consolidator; kvbm's events travel in vLLM's own KV event stream (module docstring)."""
    return None
