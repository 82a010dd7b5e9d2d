"""``PdConnector``: kvbm + NIXL in one worker, under the name NVIDIA Dynamo's disaggregated flow uses.

Dynamo 1.6 configures a kvbm prefill worker as ``PdConnector`` from ``kvbm.vllm_integration.connector``
with a ``DynamoConnector`` and a ``NixlConnector`` child in ``kv_connector_extra_config.connectors``
(``python -m kvbm.disagg.config pd`` prints the JSON), and treats it as a vLLM ``MultiConnector``
(``dynamo.vllm.kv_connector_protocols``: its PD protocol is that of the one PD-capable child, NIXL,
and it turns the hybrid KV cache manager off when a child lacks support). This class is that
MultiConnector, with the rule kvbm's own prefill connector (:mod:`kvbm.disagg.connector`) has for loads:

* a request that asks for a **remote prefill** (``kv_transfer_params.do_remote_prefill``,
  Dynamo's decode side) loads from the NIXL child: the prefill worker computed that KV
  for this request, and NIXL's handshake waits for the read;
* any other request loads its prefix **from kvbm** (G2/G3/G4), never from NIXL.

Every child still sees every call, stores go to all children (kvbm keeps what a prefill
computes), ``request_finished`` returns NIXL's ``kv_transfer_params`` for the decoder, and
``take_events()`` carries kvbm's tier events (MultiConnector chains its children's).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector

from kvbm.vllm_integration import compat

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def _is_kvbm(connector: object) -> bool:
    """kvbm's DynamoConnector, told by its class's name: connector.py exposes PdConnector, so
    importing it here would make the two files import each other."""
    cls = type(connector)
    return cls.__name__ == "DynamoConnector" and cls.__module__ == "kvbm.vllm_integration.connector"


def wants_remote_prefill(request: Request) -> bool:
    """Whether the request's KV was prefilled elsewhere and must be pulled (Dynamo's decode side)."""
    params = getattr(request, "kv_transfer_params", None) or {}
    return bool(params.get("do_remote_prefill"))


class PdConnector(MultiConnector):
    """vLLM's MultiConnector over a kvbm child and a NIXL child; loads per :func:`wants_remote_prefill`."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        kvbm = [i for i, c in enumerate(self._connectors) if _is_kvbm(c)]
        if len(kvbm) != 1 or len(self._connectors) < 2:
            names = [type(c).__name__ for c in self._connectors]
            raise ValueError(
                "PdConnector needs exactly one DynamoConnector child and a NIXL child in "
                f"kv_connector_extra_config.connectors; got {names}. Example: "
                '{"connectors": [{"kv_connector": "DynamoConnector", "kv_connector_module_path": '
                '"kvbm.vllm_integration.connector"}, {"kv_connector": "NixlConnector", "kv_role": "kv_both"}]}'
            )
        self._kvbm_index = kvbm[0]
        if role == KVConnectorRole.SCHEDULER:
            compat.recompute_failed_loads(vllm_config, "kvbm PdConnector")
            logger.info("kvbm PdConnector: children %s", [type(c).__name__ for c in self._connectors])

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """Every child is asked; the remote-prefill child answers for remote prefills, kvbm otherwise."""
        remote = wants_remote_prefill(request)
        answer: tuple[int | None, bool] = (0, False)
        for i, child in enumerate(self._connectors):
            tokens, load_async = child.get_num_new_matched_tokens(request, num_computed_tokens)
            if tokens is None:
                return None, False
            if not tokens or (i == self._kvbm_index) == remote or answer[0]:
                continue
            self._requests_to_connector[request.request_id] = i
            answer = (tokens, load_async)
        return answer


__all__ = ["PdConnector", "wants_remote_prefill"]
