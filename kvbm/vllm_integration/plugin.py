"""vLLM plugin hook: registers ``DynamoConnector`` by name.

Installed as a ``vllm.general_plugins`` entry point, so
``{"kv_connector":"DynamoConnector","kv_role":"kv_both"}`` works without
``kv_connector_module_path``. vLLM calls this in every process it starts.
"""

from __future__ import annotations


def register() -> None:
    # vLLM starts its engine and worker processes with spawn, which loses the
    # AMX permission of the parent; this hook runs in each of them.
    from kvbm.platform import prepare_cpu_process

    prepare_cpu_process()
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if "DynamoConnector" not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(
            "DynamoConnector", "kvbm.vllm_integration.connector", "DynamoConnector"
        )
