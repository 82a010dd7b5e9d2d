"""The prefill worker's connector: kvbm for prefix reuse, vLLM's NixlConnector for P→D.

A prefill worker in disaggregated serving does two things with KV blocks:

* **reuse** — a prompt that repeats an earlier prefix (the next turn of a
  conversation) should not be prefilled again: kvbm onboards those blocks from
  its host (G2) / disk (G3) tiers into the worker's KV cache;
* **hand off** — once the prompt is prefilled, the decode worker pulls the
  request's KV blocks over NIXL (vLLM's ``NixlConnector``).

vLLM's ``MultiConnector`` runs both: every child sees every step, stores go to
all children, and *loads* come from the first child whose
``get_num_new_matched_tokens`` claims tokens. :class:`KvbmPrefillConnector`
narrows that last rule: only the kvbm child may claim tokens. NIXL is still
asked but its claim is ignored — on a prefill worker NIXL would only claim for a "read back the
decoder's KV" request, and reusing KV is kvbm's job here. (Every child is still
called, as MultiConnector does: a connector may keep per-request state there.) Because kvbm's
onboard writes into the request's own blocks, the blocks NIXL later offers the
decoder (``request_finished`` → ``remote_block_ids``) are exactly the blocks
kvbm filled plus the ones the prefill computed.

Why the class is also exported as ``MultiConnector``: vLLM decides several
things by the *literal* connector name — whether NIXL is configured
(``KVTransferConfig.has_connector``), and whether the hybrid KV cache manager
must be turned off because a child (kvbm) does not support it
(``KVConnectorFactory.supports_hma_config``). Under any other name those
checks go wrong and the server refuses to start. So the prefill worker's
config names ``"kv_connector": "MultiConnector"`` with
``"kv_connector_module_path": "kvbm.disagg.connector"``, which resolves to this
class; see :func:`kvbm.disagg.config.prefill_transfer_config`.

Decode workers run plain ``NixlConnector`` (docs/disaggregated.md says why).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.multi_connector import MultiConnector as VllmMultiConnector

from kvbm.vllm_integration import compat
from kvbm.vllm_integration.connector import DynamoConnector

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


class KvbmPrefillConnector(VllmMultiConnector):
    """vLLM's MultiConnector in which only kvbm may load KV (prefix reuse).

    Configure with ``kv_connector_extra_config.connectors`` = a kvbm child
    (``DynamoConnector``) and a NIXL child, as for vLLM's MultiConnector.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        kvbm = [i for i, c in enumerate(self._connectors) if isinstance(c, DynamoConnector)]
        if len(kvbm) != 1:
            names = [type(c).__name__ for c in self._connectors]
            raise ValueError(
                "kvbm's prefill connector needs exactly one kvbm child (DynamoConnector) in "
                f"kv_connector_extra_config.connectors; got {names}. See docs/disaggregated.md."
            )
        self._kvbm_index = kvbm[0]
        if role == KVConnectorRole.SCHEDULER:
            compat.recompute_failed_loads(vllm_config, "kvbm prefill connector")  # NIXL loads nothing here
            logger.info(
                "kvbm prefill connector: children %s; prefix loads from %s only",
                [type(c).__name__ for c in self._connectors], type(self._connectors[self._kvbm_index]).__name__,
            )

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        """kvbm's match, after giving every child its call.

        Every child is called (a connector may keep per-request state there),
        a child still looking up (``None``) makes the whole answer "not yet",
        and the request is bound to the kvbm child only when kvbm claims tokens.
        """
        answer: tuple[int | None, bool] = (0, False)
        for i, child in enumerate(self._connectors):
            tokens, load_async = child.get_num_new_matched_tokens(request, num_computed_tokens)
            if tokens is None:
                return None, False
            if i == self._kvbm_index:
                if tokens > 0:
                    self._requests_to_connector[request.request_id] = i
                    answer = (tokens, load_async)
            elif tokens > 0:
                logger.debug(
                    "kvbm prefill connector: ignoring %s's claim of %d tokens for %s (prefix reuse is kvbm's)",
                    type(child).__name__, tokens, request.request_id,
                )
        return answer


# vLLM keys config checks on the literal name "MultiConnector" (module docstring).
MultiConnector = KvbmPrefillConnector

__all__ = ["KvbmPrefillConnector", "MultiConnector"]
