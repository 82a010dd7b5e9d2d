"""kvbm's prefill connector: only kvbm claims prefix tokens; vLLM treats it as its MultiConnector."""

from __future__ import annotations

from types import SimpleNamespace

from vllm.config.kv_transfer import KVTransferConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

from kvbm.disagg import connector as prefill
from kvbm.disagg.config import decode_transfer_config, prefill_transfer_config


class Child:
    """A stand-in child connector that claims a fixed number of tokens."""

    def __init__(self, tokens: int | None) -> None:
        self.tokens = tokens
        self.asked = 0

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        self.asked += 1
        return self.tokens, self.tokens is not None and self.tokens > 0


def make(children: list[Child], kvbm_index: int) -> prefill.KvbmPrefillConnector:
    conn = object.__new__(prefill.KvbmPrefillConnector)  # children stubbed: no engine needed
    conn._connectors = children
    conn._kvbm_index = kvbm_index
    conn._requests_to_connector = {}
    return conn


REQUEST = SimpleNamespace(request_id="r1")


def test_nixl_claim_is_ignored_and_kvbm_claim_wins_in_any_order():
    kvbm, nixl = Child(0), Child(512)
    conn = make([kvbm, nixl], 0)
    assert conn.get_num_new_matched_tokens(REQUEST, 0) == (0, False)
    assert conn._requests_to_connector == {} and nixl.asked == 1
    kvbm, nixl = Child(256), Child(512)
    conn = make([nixl, kvbm], 1)  # NIXL listed first: vLLM's MultiConnector would pick it
    assert conn.get_num_new_matched_tokens(REQUEST, 0) == (256, True)
    assert conn._requests_to_connector == {"r1": 1}


def test_a_child_still_looking_up_means_not_yet():
    conn = make([Child(None), Child(0)], 0)
    assert conn.get_num_new_matched_tokens(REQUEST, 0) == (None, False)


def test_vllm_resolves_the_config_to_kvbms_class_and_sees_nixl():
    config = KVTransferConfig(**prefill_transfer_config("cpu"))
    assert KVConnectorFactory.get_connector_class(config) is prefill.KvbmPrefillConnector
    assert config.has_connector("NixlConnector")  # vLLM's NIXL checks apply
    # kvbm and NIXL both declare SupportsHMA: vLLM keeps its hybrid manager on (docs/models.md)
    assert KVConnectorFactory.supports_hma_config(config)
    assert prefill.MultiConnector is prefill.KvbmPrefillConnector
    decode = KVTransferConfig(**decode_transfer_config("cpu"))
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlConnector

    assert KVConnectorFactory.get_connector_class(decode) is NixlConnector  # plain vLLM class
