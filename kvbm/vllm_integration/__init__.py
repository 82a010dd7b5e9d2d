"""Thin adapter from vLLM's KVConnectorBase_V1 to kvbm's leader and workers."""
